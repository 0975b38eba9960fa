"""LoRA merge/export: the merged model gives the base+adapter logits and keeps every other trained module."""

from __future__ import annotations

import torch

from vlbridge.cli import main
from vlbridge.factory import load_pretrained
from vlbridge.recipe import parse_recipe
from vlbridge.testing import tiny_model
from vlbridge.training.stages import apply_stage


def perturb_trainable(model) -> None:
    """Give LoRA B matrices (zero at init) and other trainable weights non-trivial values."""
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn(p.shape, generator=generator))


def test_merged_model_matches_base_plus_adapter(tmp_path, recipe_tree, red_image):
    model, tokenizer, processor = tiny_model("llama", "convnext")
    stage = parse_recipe(recipe_tree()).train.stages[1]  # llm: lora, connector + tower: full
    apply_stage(model, stage, parse_recipe(recipe_tree()).train.lora)
    perturb_trainable(model)
    model.eval()
    batch = processor([[{"role": "user", "content": "<image>\nWhat color is the circle?"}]], [[red_image]])
    with_adapter = model(**batch).logits

    model.save_pretrained(tmp_path / "adapter", tokenizer)
    assert main(["export", str(tmp_path / "adapter"), str(tmp_path / "merged"), "--merge-lora"]) == 0
    assert not (tmp_path / "merged" / "adapters").exists()
    merged, _ = load_pretrained(tmp_path / "merged")
    assert not merged.lora_groups()
    torch.testing.assert_close(merged(**batch).logits, with_adapter, rtol=1e-5, atol=1e-5)
    for name in ("connector", "vision_tower"):  # trained non-LoRA modules survive the merge exactly
        for (k, a), (_, b) in zip(
            model.get_group(name).state_dict().items(),
            merged.get_group(name).state_dict().items(),
            strict=True,
        ):
            assert torch.equal(a, b), k
    reloaded, _ = load_pretrained(tmp_path / "adapter")
    assert torch.equal(reloaded(**batch).logits, with_adapter)
