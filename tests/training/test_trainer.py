"""The training loop end to end on a tiny recipe: stages, freezing, LoRA, checkpoints, results."""

from __future__ import annotations

import json

import torch
import yaml
from safetensors.torch import load_file

from vlbridge.eval.after_training import evaluate_and_report
from vlbridge.factory import load_pretrained
from vlbridge.recipe import parse_recipe
from vlbridge.training.checkpointing import latest_checkpoint
from vlbridge.training.run import run_training
from vlbridge.training.stages import apply_stage


def test_two_stage_run_writes_model_checkpoints_and_results(recipe_tree):
    tree = recipe_tree(save_every=3)
    tree["train"]["tensorboard"] = True
    recipe = parse_recipe(tree)
    summary = run_training(recipe, evaluate=evaluate_and_report)
    run_dir = recipe.run_dir
    assert summary["global_steps"] == 10
    assert summary["samples_seen"] == 4 * 4 + 6 * 4 * 2
    results = json.loads((run_dir / "results.json").read_text())
    assert set(results["per_type"]) == {"color", "shape", "count", "exist", "position"}
    assert all(row["majority_baseline"] is not None for row in results["per_type"].values())
    assert results["train_seconds"] > 0 and 0.0 <= results["accuracy"] <= 1.0
    assert (run_dir / "examples" / "example-0.png").is_file()
    assert parse_recipe(yaml.safe_load((run_dir / "recipe.yaml").read_text())) == recipe  # resolved recipe
    assert list((run_dir / "logs").glob("events.out.tfevents.*"))  # TensorBoard scalars
    assert latest_checkpoint(run_dir).name == "step-00000009"  # keep_checkpoints=2: steps 6 and 9 remain
    assert len(list((run_dir / "checkpoints").iterdir())) == 2
    assert (run_dir / "model" / "adapters" / "llm" / "adapter_config.json").is_file()


def test_stage_freezes_what_it_does_not_name(recipe_tree):
    recipe = parse_recipe(recipe_tree())
    from vlbridge.testing import tiny_model

    model, _, _ = tiny_model("llama", "convnext")
    align, finetune = recipe.train.stages
    reports = {r.name: r for r in apply_stage(model, align, recipe.train.lora)}
    assert reports["llm"].trainable == 0 and reports["vision_tower"].trainable == 0
    assert reports["connector"].trainable == reports["connector"].total > 0
    reports = {r.name: r for r in apply_stage(model, finetune, recipe.train.lora)}
    llm_trainable = {n for n, p in model.language_model.named_parameters() if p.requires_grad}
    assert llm_trainable and all("lora_" in n for n in llm_trainable)
    assert all(("q_proj" in n or "v_proj" in n) for n in llm_trainable)
    assert reports["vision_tower"].trainable == reports["vision_tower"].total


def test_frozen_modules_do_not_change(recipe_tree):
    tree = recipe_tree(steps=(3, 1))
    recipe = parse_recipe(tree)
    run_training(recipe)
    model, _ = load_pretrained(recipe.run_dir / "model")
    fresh = parse_recipe(tree | {"output_dir": str(recipe.run_dir) + "-init"})
    fresh.train.stages[0].steps = 1
    fresh.train.stages[0].lr = 1e-12  # a near-no-op run gives the initial weights
    fresh.train.stages = fresh.train.stages[:1]
    run_training(fresh)
    init_llm = load_file(str(fresh.run_dir / "model" / "llm" / "model.safetensors"))
    trained_llm = load_file(str(recipe.run_dir / "model" / "llm" / "model.safetensors"))
    for key, value in init_llm.items():  # LoRA lives in adapters/; the base LLM weights stay frozen
        assert torch.equal(value, trained_llm[key]), key
    assert model.lora_groups()["llm"] is not None
