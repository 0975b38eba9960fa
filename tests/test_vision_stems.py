"""The conv stem for ViT towers: same grid and width as the patchify convolution it replaces, saved with
the checkpoint (BatchNorm statistics included), token merging unchanged on top of it, clear errors."""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError
from torch import nn

from vlbridge import testing as kit
from vlbridge.config import VisionTowerConfig
from vlbridge.errors import ConfigError
from vlbridge.testing import tiny_model, train_batch
from vlbridge.vision_stems import ConvStem

TOWERS = ["clip_vision_model", "siglip_vision_model"]


def frontend(stem: str = "conv", patch: int = 4, **extra) -> dict:
    vision = {"stem": stem, "config": {"patch_size": patch}}
    return {"type": "llava", "connector": {"merge": 1}, "vision": vision, **extra}


def build(tower: str, stem: str = "conv", patch: int = 4, **extra):
    return tiny_model("llama", tower, frontend=frontend(stem, patch, **extra))


def pixels(n: int = 2) -> torch.Tensor:
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("tower", TOWERS)
def test_conv_stem_keeps_the_grid_and_the_width(tower):
    plain, _, _ = build(tower, stem="patch")
    stemmed, _, _ = build(tower)
    x = pixels()
    want, grid = plain.frontend.vision_tower(x)
    got, stem_grid = stemmed.frontend.vision_tower(x)
    assert got.shape == want.shape and stem_grid == grid == (8, 8)
    stem = stemmed.frontend.vision_tower.model.embeddings.patch_embedding
    assert isinstance(stem, ConvStem)
    convs = [m for m in stem if isinstance(m, nn.Conv2d)]
    assert [c.stride for c in convs] == [(2, 2), (2, 2)]  # patch 4 = two stride-2 convolutions
    assert convs[-1].out_channels == plain.frontend.vision_tower.hf_config.hidden_size
    # CLIP's pre-LayerNorm goes (it would blow the stem's near-zero background up to full-size tokens)
    tower = stemmed.frontend.vision_tower.model
    assert isinstance(getattr(tower, "pre_layrnorm", nn.Identity()), nn.Identity)
    assert plain.frontend.layout.num_image_tokens() == stemmed.frontend.layout.num_image_tokens()


def test_stem_is_translation_equivariant_on_its_own_stride():
    """Shifting the image by one patch shifts the stem's feature map by one cell (away from the border)."""
    stem = ConvStem(patch_size=4, hidden_size=16).eval()
    x = torch.zeros(1, 3, 32, 32)
    x[:, :, 12:18, 12:18] = 1.0
    shifted = torch.roll(x, shifts=(4, 4), dims=(2, 3))
    a, b = stem(x), stem(shifted)
    torch.testing.assert_close(b[:, :, 4:7, 4:7], a[:, :, 3:6, 3:6])


@pytest.mark.parametrize("tower", TOWERS)
def test_round_trip_keeps_the_stem_and_its_batchnorm_statistics(tower, red_image, tmp_path):
    vl = build(tower)
    model = vl[0]
    batch = train_batch(vl, red_image)
    model.train()
    model(**batch)  # moves the BatchNorm running statistics off their initial values
    model.eval()
    norm = next(m for m in model.frontend.vision_tower.modules() if isinstance(m, nn.BatchNorm2d))
    assert not torch.equal(norm.running_mean, torch.zeros_like(norm.running_mean))
    loaded = kit.assert_save_load_round_trip(vl, batch, red_image, tmp_path / "ckpt")
    loaded_norm = next(m for m in loaded.frontend.vision_tower.modules() if isinstance(m, nn.BatchNorm2d))
    assert torch.equal(loaded_norm.running_mean, norm.running_mean)
    assert loaded.config.frontend.vision.stem == "conv"


def test_token_merging_runs_on_a_conv_stem_tower(red_image):
    turbo = {"type": "turbo", "r": [8], "min_tokens": 0}
    merged = tiny_model("llama", "clip_vision_model", frontend=frontend(), reducers=[turbo])
    assert merged[0].frontend.layout.num_image_tokens() == 64 - 8  # 65 tokens with CLS; 8 merged in block 0
    logits = merged[0](**train_batch(merged, red_image)).logits
    assert torch.isfinite(logits).all()


def test_conv_stem_needs_a_vit_tower():
    with pytest.raises(ConfigError, match="patchify convolution"):
        tiny_model("llama", "resnet", frontend={"type": "llava", "vision": {"stem": "conv"}})


def test_conv_stem_needs_a_power_of_two_patch():
    with pytest.raises(ConfigError, match="power of"):
        build("clip_vision_model", patch=6, image={"size": 36})


def test_conv_stem_refuses_a_pretrained_tower():
    with pytest.raises(ValidationError, match="trained from scratch"):
        VisionTowerConfig(name_or_path="openai/clip-vit-base-patch16", stem="conv")
