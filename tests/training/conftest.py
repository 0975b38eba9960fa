"""A tiny two-stage recipe (align: connector only; finetune: LoRA on the LLM) on a few shapes scenes."""

from __future__ import annotations

import pytest

from vlbridge.testing import tiny_recipe_model


def tiny_recipe_tree(run_dir, *, steps=(4, 6), save_every: int = 0, lora_dropout: float = 0.1) -> dict:
    return {
        "name": "tiny",
        "output_dir": str(run_dir),
        "seed": 3,
        "model": tiny_recipe_model(128),
        "tokenizer": {"train_vocab_size": 300},
        "data": {
            "train": {"type": "shapes", "n": 48, "questions_per_image": 2},
            "eval": {"type": "shapes", "split": "test", "n": 10},
        },
        "train": {
            "save_every": save_every,
            "lora": {"r": 4, "alpha": 8, "dropout": lora_dropout, "target_modules": ["q_proj", "v_proj"]},
            "stages": [
                {
                    "name": "align",
                    "modules": {"connector": "full"},
                    "steps": steps[0],
                    "batch_size": 4,
                    "lr": 1e-3,
                },
                {
                    "name": "finetune",
                    "modules": {"llm": "lora", "connector": "full", "vision_tower": "full"},
                    "steps": steps[1],
                    "batch_size": 4,
                    "grad_accum": 2,
                    "lr": 1e-3,
                    "warmup_steps": 2,
                    "module_lr": {"vision_tower": 1e-4},
                },
            ],
        },
        "eval": {"batch_size": 8, "max_new_tokens": 3},
    }


@pytest.fixture
def recipe_tree(tmp_path):
    return lambda **kw: tiny_recipe_tree(tmp_path / "run", **kw)
