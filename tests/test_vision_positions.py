"""Sine-cosine position tables for from-scratch ViTs: the rows encode (row, column), the table survives the
model build and stays trainable, checkpoints keep the trained table, and misuse is refused clearly."""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError

from vlbridge import testing as kit
from vlbridge.config import VisionTowerConfig
from vlbridge.errors import ConfigError
from vlbridge.testing import tiny_model, train_batch
from vlbridge.vision_positions import sincos_2d

TOWERS = {"clip_vision_model": 1, "siglip_vision_model": 0}  # tower -> CLS rows in its position table


def build(tower: str, position_init: str = "sincos"):
    frontend = {"type": "llava", "vision": {"position_init": position_init}}
    return tiny_model("llama", tower, frontend=frontend)


def table(vl) -> torch.Tensor:
    return vl[0].frontend.vision_tower.model.embeddings.position_embedding.weight


def test_rows_encode_row_and_column_separately():
    side, dim = 6, 32
    pos = sincos_2d(side, dim).view(side, side, dim)
    assert pos.shape == (side, side, dim) and pos.abs().max() <= 1
    # the first half depends on the row only, the second on the column only
    assert torch.equal(pos[:, :, : dim // 2], pos[:, :1, : dim // 2].expand(-1, side, -1))
    assert torch.equal(pos[:, :, dim // 2 :], pos[:1, :, dim // 2 :].expand(side, -1, -1))
    assert len({tuple(r.tolist()) for r in pos.view(-1, dim)}) == side * side
    # every patch's most similar other patch is a grid neighbour, so attention sees locality from the start
    flat = pos.view(-1, dim)
    sims = (flat @ flat.T).fill_diagonal_(float("-inf"))
    nearest = sims.argmax(dim=1)
    index = torch.arange(side * side)
    steps = (index // side - nearest // side).abs() + (index % side - nearest % side).abs()
    assert steps.tolist() == [1] * side * side


@pytest.mark.parametrize("tower", TOWERS)
def test_the_table_survives_the_model_build(tower):
    vl = build(tower)
    weight = table(vl)
    cls = TOWERS[tower]
    side = int((weight.shape[0] - cls) ** 0.5)
    torch.testing.assert_close(weight[cls:], sincos_2d(side, weight.shape[1]))
    assert not weight[:cls].any()  # the CLS token gets no position
    assert weight.requires_grad
    assert not torch.equal(table(build(tower, "learned"))[cls:], weight[cls:])


def test_training_moves_the_table_and_a_checkpoint_keeps_the_trained_rows(red_image, tmp_path):
    vl = build("clip_vision_model")
    model = vl[0]
    batch = train_batch(vl, red_image)
    model.train()
    model(**batch).loss.backward()
    assert table(vl).grad[1:].abs().sum() > 0
    with torch.no_grad():
        table(vl).add_(0.1 * torch.randn_like(table(vl)))  # stands in for an optimiser step
    model.eval()
    loaded = kit.assert_save_load_round_trip(vl, batch, red_image, tmp_path / "ckpt")
    assert torch.equal(loaded.frontend.vision_tower.model.embeddings.position_embedding.weight, table(vl))
    assert loaded.config.frontend.vision.position_init == "sincos"


def test_sincos_needs_a_vit_tower():
    with pytest.raises(ConfigError, match="position table"):
        build("resnet")


def test_sincos_needs_a_width_divisible_by_four():
    with pytest.raises(ConfigError, match="multiple of 4"):
        sincos_2d(4, 30)


def test_sincos_refuses_a_pretrained_tower():
    with pytest.raises(ValidationError, match="position_init='sincos'.*trained from scratch"):
        VisionTowerConfig(name_or_path="openai/clip-vit-base-patch16", position_init="sincos")
