"""LLaVA-style front-end: vision tower -> feature layer -> connector -> spliced at `<image>` tokens."""

from __future__ import annotations

import torch
from pydantic import Field

from ..config import ConnectorConfig, FrontendConfig, ImageConfig, VisionTowerConfig
from ..connectors import Connector
from ..errors import ConfigError
from ..registry import FRONTENDS
from ..vision_towers import TowerSpec, VisionTower
from .base import IMAGE_TOKEN, TowerFrontend
from .layout import ImageLayout, TowerShrink


class LlavaConfig(FrontendConfig):
    type: str = "llava"
    vision: VisionTowerConfig = Field(default_factory=VisionTowerConfig)
    connector: ConnectorConfig = Field(default_factory=ConnectorConfig)
    image: ImageConfig = Field(default_factory=ImageConfig)


@FRONTENDS.register("llava", config=LlavaConfig)
class LlavaFrontend(TowerFrontend):
    """The baseline: a transformers vision backbone and a projector (linear or 2-layer GELU MLP)."""

    config: LlavaConfig

    def __init__(self, config: LlavaConfig, *args, **kwargs) -> None:
        super().__init__(config, *args, **kwargs)
        dense = self.spec.tokens(self.tower_size) // config.connector.merge**2
        self.connector = Connector(config.connector, self.spec.width, self.text_hidden_size, dense)

    @classmethod
    def image_layout(cls, config: LlavaConfig, shrink: TowerShrink | None = None) -> ImageLayout:
        spec = TowerSpec.from_config(config.vision)
        size = spec.input_size(config.image)
        if shrink is None:
            tokens = spec.tokens(size) // config.connector.merge**2
        elif config.connector.merge > 1 or config.connector.position_embedding:
            raise ConfigError(
                "a tower reducer (turbo, tome) merges vision tokens, so they no longer form a grid; it "
                "cannot be combined with frontend.connector.merge > 1 or connector.position_embedding "
                "(both need the tower's full grid): set merge: 1 and position_embedding: false"
            )
        else:
            tokens = shrink(spec, size)
        return ImageLayout(spec.image_processor(config.image, size), IMAGE_TOKEN, (IMAGE_TOKEN,), tokens)

    def group_paths(self) -> dict[str, str]:
        return {**super().group_paths(), "connector": "connector"}

    def reducible_tower(self, reducer: str) -> tuple[VisionTower, int]:
        return self.vision_tower, self.tower_size

    def encode(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.connector(*self.tower_features(pixel_values))  # [N_img, T_img, D]
