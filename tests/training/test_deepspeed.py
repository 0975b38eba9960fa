"""DeepSpeed ZeRO (`train.distributed: deepspeed`) on CPU ranks (gloo): two ranks train as one process with
twice the gradient accumulation through both stages of the tiny recipe, a killed rank's run resumes to the
uninterrupted weights, each rank holds half of the gradients and optimizer state, and the recipe's
DeepSpeed settings are checked before anything runs."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml
from run_kit import RANK_ENV, kill_a_rank_after, run_metrics, run_weights, torchrun

from vlbridge.errors import ConfigError
from vlbridge.factory import load_pretrained
from vlbridge.recipe import parse_recipe
from vlbridge.training.run import run_training

TORCHRUN = torchrun()
ENV = os.environ | RANK_ENV


def launch(tree: dict, name: str, tmp_path: Path, *flags: str) -> subprocess.Popen:
    """`torchrun --standalone --nproc-per-node 2 -m vlbridge.cli train` on the recipe `tree`."""
    tree = tree | {"output_dir": str(tmp_path / name)}
    recipe = tmp_path / f"{name}.yaml"
    recipe.write_text(yaml.safe_dump(tree))
    command = [TORCHRUN, "--standalone", "--nproc-per-node", "2", "-m", "vlbridge.cli", "train", str(recipe)]
    return subprocess.Popen([*command, "--no-eval", *flags], env=ENV, stderr=subprocess.PIPE, text=True)


def finish(run: subprocess.Popen) -> None:
    _, err = run.communicate(timeout=600)
    assert run.returncode == 0, err[-3000:]


def single_process(tree: dict, run_dir: Path) -> dict:
    """The same recipe in this process, without DeepSpeed, every stage with twice the accumulation."""
    tree = tree | {"output_dir": str(run_dir), "train": dict(tree["train"])}
    del tree["train"]["distributed"]
    tree["train"]["stages"] = [
        stage | {"grad_accum": stage.get("grad_accum", 1) * 2} for stage in tree["train"]["stages"]
    ]
    return run_training(parse_recipe(tree))


def assert_same_run(sharded: Path, whole: Path, steps: int) -> None:
    zero, one = run_metrics(sharded), run_metrics(whole)
    assert [m["step"] for m in zero] == [m["step"] for m in one] == list(range(1, steps + 1))
    assert [m["lr"] for m in zero] == [m["lr"] for m in one]  # the trainer's schedule reaches DeepSpeed
    assert max(abs(a["loss"] - b["loss"]) for a, b in zip(zero, one, strict=True)) < 1e-4
    expected, got = run_weights(whole / "model"), run_weights(sharded / "model")
    assert expected.keys() == got.keys()
    assert max((expected[k] - got[k]).abs().max().item() for k in expected) < 1e-5


@pytest.mark.slow
def test_zero2_ranks_train_as_one_process_and_a_killed_rank_resumes_to_the_same_weights(
    tmp_path, recipe_tree
):
    """ZeRO-2 on two ranks through both stages (a new DeepSpeed engine per stage) against one process with
    twice the gradient accumulation: the same loss and learning rate at every step, the same final weights,
    half the gradients and optimizer state per rank. Then the same run, one rank killed after its mid-stage
    checkpoint, resumed: bit-identical final weights; so are those of a run resumed at the stage boundary."""
    tree = recipe_tree(steps=(2, 6), save_every=2)
    tree["train"] |= {
        "distributed": {"type": "deepspeed", "zero_stage": 2},
        "log_every": 1,
        "keep_checkpoints": 4,
    }
    straight = launch(tree, "straight", tmp_path)
    summary = single_process(tree, tmp_path / "single")
    finish(straight)

    assert_same_run(tmp_path / "straight", tmp_path / "single", steps=8)
    rank = json.loads((tmp_path / "straight" / "results.json").read_text())["rank_state_bytes"]
    for stage, held in summary["rank_state_bytes"].items():
        for kind in ("gradients", "optimizer"):
            assert rank[stage][kind] <= 0.55 * held[kind], (stage, kind, rank[stage][kind], held[kind])
        # ZeRO-2 keeps every weight, plus the fp32 master partition of the trained ones
        assert held["parameters"] < rank[stage]["parameters"] <= 1.5 * held["parameters"]
    model, _ = load_pretrained(tmp_path / "straight" / "model")  # the consolidated model: a usual checkpoint
    assert sum(p.numel() for p in model.parameters()) > 0

    killed = launch(tree, "killed", tmp_path)
    checkpoint = tmp_path / "killed" / "checkpoints" / "step-00000004"  # finetune, 2 of its 6 steps done
    kill_a_rank_after(killed, checkpoint)
    assert not (tmp_path / "killed" / "model").exists(), "the run finished before it could be killed"
    files = sorted(p.name for p in (checkpoint / "deepspeed" / "state").iterdir())
    assert files == [
        "mp_rank_00_model_states.pt",
        "zero_pp_rank_0_mp_rank_00_optim_states.pt",
        "zero_pp_rank_1_mp_rank_00_optim_states.pt",
    ]

    finish(launch(tree, "killed", tmp_path, "--resume"))
    assert_identical(tmp_path / "straight" / "model", tmp_path / "killed" / "model")

    # from the checkpoint at the end of the first stage: its engine reads it and takes no step, the next
    # stage's engine starts from the weights it left in the module
    boundary = tmp_path / "boundary" / "checkpoints"
    boundary.mkdir(parents=True)
    shutil.copytree(tmp_path / "straight" / "checkpoints" / "step-00000002", boundary / "step-00000002")
    finish(launch(tree, "boundary", tmp_path, "--resume"))
    assert_identical(tmp_path / "straight" / "model", tmp_path / "boundary" / "model")


def assert_identical(expected_dir: Path, got_dir: Path) -> None:
    expected, got = run_weights(expected_dir), run_weights(got_dir)
    assert expected.keys() == got.keys()
    different = [k for k in expected if not torch.equal(expected[k], got[k])]
    assert not different, f"{len(different)} tensors differ after resume, e.g. {different[:3]}"


@pytest.mark.slow
def test_zero3_ranks_train_as_one_process(tmp_path, recipe_tree):
    """ZeRO-3 (every parameter partitioned, gathered per module as it runs) through both stages, on an LLM
    whose output embeddings are its input embeddings (one parameter on every rank, also those built empty)."""
    tree = recipe_tree(steps=(1, 2))
    tree["model"]["llm"]["config"]["tie_word_embeddings"] = True
    tree["train"] |= {"distributed": {"type": "deepspeed", "zero_stage": 3}, "log_every": 1}
    sharded = launch(tree, "zero3", tmp_path)
    summary = single_process(tree, tmp_path / "single")
    finish(sharded)
    assert_same_run(tmp_path / "zero3", tmp_path / "single", steps=3)
    rank = json.loads((tmp_path / "zero3" / "results.json").read_text())["rank_state_bytes"]
    for stage, held in summary["rank_state_bytes"].items():
        assert rank[stage]["parameters"] <= 0.65 * held["parameters"]  # half, plus the fp32 masters' half


def deepspeed_recipe(recipe_tree, tmp_path: Path, ds_json: dict | None = None, **section):
    tree = recipe_tree()
    if ds_json is not None:
        (tmp_path / "ds.json").write_text(json.dumps(ds_json))
        section["config_file"] = str(tmp_path / "ds.json")
    tree["train"]["distributed"] = {"type": "deepspeed", **section}
    return parse_recipe(tree)


def test_a_config_file_may_not_set_what_the_recipe_decides(tmp_path, recipe_tree):
    with pytest.raises(ConfigError, match="sets optimizer, scheduler, which vlbridge takes from the recipe"):
        deepspeed_recipe(
            recipe_tree, tmp_path, {"optimizer": {"type": "Adam"}, "scheduler": {"type": "WarmupLR"}}
        )
    with pytest.raises(ConfigError, match="sets gradient_accumulation_steps.*set the stage's grad_accum"):
        deepspeed_recipe(recipe_tree, tmp_path, {"gradient_accumulation_steps": 4})
    with pytest.raises(ConfigError, match="zero_optimization.stage=3 but the recipe's zero_stage is 2"):
        deepspeed_recipe(recipe_tree, tmp_path, {"zero_optimization": {"stage": 3}})
    with pytest.raises(ConfigError, match="cannot read it"):
        deepspeed_recipe(recipe_tree, tmp_path, config_file=str(tmp_path / "missing.json"))
    with pytest.raises(ConfigError, match=r"train.distributed.zero_stag: Extra inputs are not permitted"):
        deepspeed_recipe(recipe_tree, tmp_path, zero_stag=3)
    with pytest.raises(ConfigError, match=r"train.distributed.zero_stage: Input should be 1, 2 or 3"):
        deepspeed_recipe(recipe_tree, tmp_path, zero_stage=0)
    recipe = deepspeed_recipe(
        recipe_tree, tmp_path, {"zero_optimization": {"overlap_comm": False}}, zero_stage=3
    )
    assert recipe.train.distributed.zero_stage == 3


def test_deepspeed_checks_its_own_sections_before_the_run(tmp_path, recipe_tree, monkeypatch):
    """An unknown key inside a DeepSpeed section is refused by DeepSpeed's own validation, at setup."""
    from vlbridge.training.zero import DeepSpeed

    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    recipe = deepspeed_recipe(recipe_tree, tmp_path, {"zero_optimization": {"overlap_com": False}})
    engine = DeepSpeed(recipe.train.distributed, SimpleNamespace(mixed_precision="no"))
    with pytest.raises(ConfigError, match="(?s)DeepSpeed refuses the config of stage 'align'.*overlap_com"):
        engine.check_config(recipe.train.stages)
    good = deepspeed_recipe(recipe_tree, tmp_path, {"zero_optimization": {"overlap_comm": False}})
    DeepSpeed(good.train.distributed, SimpleNamespace(mixed_precision="no")).check_config(good.train.stages)


def test_without_deepspeed_the_engine_says_how_to_install_it(tmp_path, recipe_tree, monkeypatch):
    from vlbridge.training.distributed import engine_for

    monkeypatch.setitem(sys.modules, "deepspeed", None)  # `import deepspeed` raises ImportError
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    recipe = deepspeed_recipe(recipe_tree, tmp_path)
    with pytest.raises(ConfigError, match=r"pip install 'vlbridge\[deepspeed\]'"):
        engine_for(recipe.train.distributed, SimpleNamespace(mixed_precision="no"))
