"""`train.gradient_checkpointing` recomputes the LLM's layers and the tower's blocks: the same gradients."""

from __future__ import annotations

import copy

import pytest
import torch

from vlbridge.lora import lora_config, wrap
from vlbridge.recipe import parse_recipe
from vlbridge.testing import TINY_TOWER_CONFIGS, tiny_model, train_batch
from vlbridge.training.run import run_training


def gradients(model, batch) -> dict[str, torch.Tensor]:
    model.zero_grad()
    torch.manual_seed(0)  # the same dropout masks (ADEM's tower adapters) in both runs
    model(**batch).loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("frontend", ["llava", "adem_vl", "solo"])
def test_checkpointed_gradients_equal_plain_ones_under_lora(red_image, frontend):
    vl = tiny_model("qwen2", "clip_vision_model", frontend={"type": frontend})
    model = vl[0].train()
    for p in model.parameters():
        p.requires_grad_(True)
    model.set_group("llm", wrap(model.get_group("llm"), lora_config(2, 4, 0.0, ["q_proj", "v_proj"]), "llm"))
    batch = train_batch(vl, red_image)
    plain = gradients(model, batch)
    parts = model.activation_checkpointing()
    assert parts == (["llm", "vision_tower"] if frontend != "solo" else ["llm"])
    recomputed = gradients(model, batch)
    assert plain.keys() == recomputed.keys() and any("lora_B" in n for n in plain)
    for name, grad in plain.items():
        torch.testing.assert_close(recomputed[name], grad, atol=1e-6, rtol=1e-5, msg=name)


def test_a_recipe_turns_it_on(tmp_path, recipe_tree, capsys):
    tree = copy.deepcopy(recipe_tree(steps=(1, 2)))
    tree["model"]["frontend"]["vision"] = {
        "model_type": "clip_vision_model",
        "config": TINY_TOWER_CONFIGS["clip_vision_model"],
    }
    tree["train"]["gradient_checkpointing"] = True
    run_training(parse_recipe(tree))
    assert "activation checkpointing: llm, vision_tower" in capsys.readouterr().out
