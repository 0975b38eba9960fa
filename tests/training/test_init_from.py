"""`init_from` fine-tunes an imported transformers LLaVA checkpoint from a recipe, p-MoD routers included."""

from __future__ import annotations

import pytest
import torch

from vlbridge.factory import load_pretrained
from vlbridge.recipe import parse_recipe
from vlbridge.testing import write_tiny_llava_hf
from vlbridge.training.run import run_training


def recipe_tree(tmp_path, **init) -> dict:
    return {
        "name": "finetune",
        "output_dir": str(tmp_path / "run"),
        "init_from": {"path": str(tmp_path / "llava"), **init},
        "data": {"train": {"type": "shapes", "n": 16, "questions_per_image": 1}},
        "train": {
            "lora": {"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]},
            "stages": [
                {
                    "name": "tune",
                    "modules": {"llm": "lora", "connector": "full", "routers": "full"},
                    "steps": 3,
                    "batch_size": 4,
                    "lr": 1e-2,
                }
            ],
        },
    }


def test_an_imported_llava_fine_tunes_with_lora_and_trains_pmod_routers(tmp_path):
    write_tiny_llava_hf(tmp_path / "llava", "llama", num_hidden_layers=3)
    pmod = {"type": "pmod", "schedule": "explicit", "ratios": [None, 0.5, None]}  # layer 1 keeps half
    recipe = parse_recipe(recipe_tree(tmp_path, reducers=[pmod]))
    imported, _ = load_pretrained(tmp_path / "llava")
    run_training(recipe)
    tuned, processor = load_pretrained(recipe.run_dir / "model")
    assert [r.type for r in tuned.config.reducers] == ["pmod"]
    assert tuned.lora_groups()  # the LLM's adapters, saved beside its untouched base weights
    before = imported.frontend.connector.proj[0].weight
    assert not torch.equal(tuned.frontend.connector.proj[0].weight, before)  # the connector trained
    assert tuned.reducers[0].routers["1"].weight.abs().sum() > 0
    batch = processor([[{"role": "user", "content": processor.place_images("What color?", 1)}]], [[_image()]])
    assert tuned.generate(**batch, max_new_tokens=3, do_sample=False).shape == (1, 3)


def test_model_and_init_from_together_are_refused(tmp_path):
    tree = recipe_tree(tmp_path) | {"model": {}}
    with pytest.raises(Exception, match="exactly one of them"):
        parse_recipe(tree)


def _image():
    from PIL import Image

    return Image.new("RGB", (32, 32), (20, 200, 20))
