"""FSDP2 (`train.distributed: fsdp`) on CPU ranks (gloo): two "nodes" equal one process, a killed rank's
run resumes to the uninterrupted weights, and the final model is the usual checkpoint."""

from __future__ import annotations

import json
import os
import socket
import subprocess
from pathlib import Path

import pytest
import torch
import yaml
from run_kit import RANK_ENV, kill_a_rank_after, run_metrics, run_weights, torchrun

from vlbridge.data.formats import load_source
from vlbridge.errors import ConfigError
from vlbridge.factory import load_pretrained
from vlbridge.recipe import parse_recipe
from vlbridge.testing import tiny_model
from vlbridge.training.distributed import fix_structure, shard_units
from vlbridge.training.run import build, run_training

pytestmark = pytest.mark.slow

TORCHRUN = torchrun()
ENV = os.environ | RANK_ENV


def write_recipe(tree: dict, path: Path) -> Path:
    path.write_text(yaml.safe_dump(tree))
    return path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_two_nodes_with_fsdp_train_as_one_process(tmp_path, recipe_tree):
    """Two `torchrun --nnodes 2` launches (c10d rendezvous), one rank each, against one process that sees
    the same global batch (twice the gradient accumulation): the same loss at every step and the same
    final weights, with each rank holding half of the parameters, gradients and optimizer state."""
    tree = recipe_tree(steps=(3, 4)) | {"output_dir": str(tmp_path / "nodes")}
    tree["train"] |= {"distributed": "fsdp", "log_every": 1}
    recipe = write_recipe(tree, tmp_path / "nodes.yaml")
    port = free_port()
    node = [TORCHRUN, "--nnodes", "2", "--nproc-per-node", "1", "--rdzv-backend", "c10d"]
    node += ["--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "two-nodes"]
    node += ["-m", "vlbridge.cli", "train", str(recipe), "--no-eval"]
    launches = [subprocess.Popen(node, env=ENV, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    for launch in launches:
        _, err = launch.communicate(timeout=600)
        assert launch.returncode == 0, err[-3000:]

    single = recipe_tree(steps=(3, 4)) | {"output_dir": str(tmp_path / "single")}
    single["train"]["log_every"] = 1
    for stage in single["train"]["stages"]:
        stage["grad_accum"] = stage.get("grad_accum", 1) * 2
    summary = run_training(parse_recipe(single))

    sharded, whole = run_metrics(tmp_path / "nodes"), run_metrics(tmp_path / "single")
    assert [m["step"] for m in sharded] == [m["step"] for m in whole] == list(range(1, 8))
    assert max(abs(a["loss"] - b["loss"]) for a, b in zip(sharded, whole, strict=True)) < 1e-4
    expected, got = run_weights(tmp_path / "single" / "model"), run_weights(tmp_path / "nodes" / "model")
    assert expected.keys() == got.keys()
    assert max((expected[k] - got[k]).abs().max().item() for k in expected) < 1e-5

    rank = json.loads((tmp_path / "nodes" / "results.json").read_text())["rank_state_bytes"]
    for stage, held in summary["rank_state_bytes"].items():
        for kind in ("parameters", "gradients", "optimizer"):
            assert rank[stage][kind] <= 0.55 * held[kind], (stage, kind, rank[stage][kind], held[kind])
    # the consolidated model is an ordinary checkpoint
    model, _ = load_pretrained(tmp_path / "nodes" / "model")
    assert sum(p.numel() for p in model.parameters()) > 0


def test_a_killed_rank_resumes_from_sharded_checkpoints_to_the_uninterrupted_weights(tmp_path, recipe_tree):
    steps = (4, 12)

    def launch(name: str, *flags: str) -> subprocess.Popen:
        tree = recipe_tree(steps=steps, save_every=4) | {"output_dir": str(tmp_path / name)}
        tree["train"]["distributed"] = "fsdp"
        recipe = write_recipe(tree, tmp_path / f"{name}.yaml")
        command = [TORCHRUN, "--standalone", "--nproc-per-node", "2", "-m", "vlbridge.cli", "train"]
        return subprocess.Popen(
            [*command, str(recipe), "--no-eval", *flags], env=ENV, stderr=subprocess.PIPE, text=True
        )

    straight = launch("straight")
    assert straight.wait(timeout=600) == 0, straight.stderr.read()[-3000:]

    killed = launch("killed")
    checkpoint = tmp_path / "killed" / "checkpoints" / "step-00000008"
    kill_a_rank_after(killed, checkpoint)
    assert not (tmp_path / "killed" / "model").exists(), "the run finished before it could be killed"
    assert sorted(p.name for p in (checkpoint / "shards").iterdir()) == [
        ".metadata",
        "__0_0.distcp",
        "__1_0.distcp",
    ]

    resumed = launch("killed", "--resume")
    assert resumed.wait(timeout=600) == 0, resumed.stderr.read()[-3000:]
    expected, got = run_weights(tmp_path / "straight" / "model"), run_weights(tmp_path / "killed" / "model")
    assert expected.keys() == got.keys()
    different = [k for k in expected if not torch.equal(expected[k], got[k])]
    assert not different, f"{len(different)} tensors differ after resume, e.g. {different[:3]}"


def test_units_are_the_llm_decoder_layers_and_the_vision_blocks():
    model, _, _ = tiny_model("llama", "clip_vision_model")
    units = shard_units(model)
    kinds = sorted({type(u).__name__ for u in units})
    assert kinds == ["CLIPEncoderLayer", "LlamaDecoderLayer"]
    layers = model.language_model.config.num_hidden_layers
    blocks = model.frontend.vision_tower.model.config.num_hidden_layers
    assert len(units) == layers + blocks


def test_lora_in_one_stage_and_full_in_another_is_refused_under_fsdp(recipe_tree):
    tree = recipe_tree()
    tree["train"]["stages"][0]["modules"] = {"llm": "full", "connector": "full"}  # stage 2 has llm: lora
    recipe = parse_recipe(tree | {"train": tree["train"] | {"distributed": "fsdp"}})
    model, _, _ = tiny_model()
    with pytest.raises(ConfigError, match="'llm' is trained with LoRA in one stage and in full in another"):
        fix_structure(model, recipe.train, recipe.seed)


def test_ranks_but_the_main_build_a_pretrained_llm_from_its_config_alone(tmp_path, recipe_tree):
    """Under FSDP only the main process reads the LLM's weights; the others build on the meta device and
    get their shards from it, so the weights file is not even opened there."""
    from transformers import AutoConfig, AutoModelForCausalLM

    tree = recipe_tree()
    llm = tree["model"]["llm"]
    AutoModelForCausalLM.from_config(AutoConfig.for_model("llama", **llm["config"])).save_pretrained(
        tmp_path / "llm"
    )
    (tmp_path / "llm" / "model.safetensors").unlink()
    tree["model"]["llm"] = {"name_or_path": str(tmp_path / "llm")}
    recipe = parse_recipe(tree)
    stage_data = [load_source(recipe.data.train)] * 2
    model, _, _ = build(recipe, stage_data, None, "cpu", meta=True)
    assert {p.device.type for p in model.parameters()} == {"meta"}
    with pytest.raises(OSError):  # the main process does read the weights
        build(recipe, stage_data, None, "cpu")
