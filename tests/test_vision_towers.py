"""The tower geometry read from configs (`TowerSpec`) is what the built towers return."""

from __future__ import annotations

import pytest
import torch

from vlbridge.config import VisionTowerConfig
from vlbridge.errors import ConfigError
from vlbridge.testing import TINY_TOWER_CONFIGS
from vlbridge.vision_towers import TowerSpec, VisionTower

RESNET_FIRST_STRIDE = {**TINY_TOWER_CONFIGS["resnet"], "downsample_in_first_stage": True}
CASES = [
    (tower, config, select, layer, size)
    for tower, config in [*TINY_TOWER_CONFIGS.items(), ("resnet", RESNET_FIRST_STRIDE)]
    for select in (["patch", "cls_patch"] if tower == "clip_vision_model" else ["patch"])
    for layer in (0, 1, -1, -2)
    for size in (32, 37, 64)
]


@pytest.mark.parametrize(("tower", "config", "select", "layer", "size"), CASES)
def test_grid_width_and_count_from_the_config_match_the_built_tower(tower, config, select, layer, size):
    cfg = VisionTowerConfig(model_type=tower, config=config, feature_layer=layer, feature_select=select)
    spec = TowerSpec.from_config(cfg)
    built = VisionTower(spec).eval()
    if spec.family.layout == "tokens" and size != config["image_size"]:
        built.model.config.image_size = size  # ViTs run other sizes with interpolated positions
        forward = built.model.forward
        built.model.forward = lambda **kw: forward(**kw, interpolate_pos_encoding=True)
    with torch.no_grad():
        features, grid = built(torch.zeros(2, 3, size, size))
    assert spec.grid(size) == grid
    assert features.shape[1:] == (spec.tokens(size), spec.width)


def test_a_feature_layer_outside_the_tower_names_the_valid_range():
    cfg = VisionTowerConfig(model_type="resnet", config=TINY_TOWER_CONFIGS["resnet"], feature_layer=5)
    with pytest.raises(
        ConfigError, match=r"feature_layer=5 is outside .* 3 hidden states; pick one in \[-3, 2\]"
    ):
        _ = TowerSpec.from_config(cfg).grid(32)
