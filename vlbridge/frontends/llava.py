"""LLaVA-style front-end: vision tower -> feature layer -> connector -> spliced at `<image>` tokens."""

from __future__ import annotations

from collections.abc import Callable

import torch
from pydantic import Field
from transformers import PretrainedConfig

from ..config import ConnectorConfig, FrontendConfig, ImageConfig, VisionTowerConfig
from ..connectors import Connector
from ..errors import ConfigError
from ..image_processing import ImageProcessor
from ..registry import FRONTENDS
from ..vision_towers import VisionTower
from .base import Frontend, probe_tower, tower_image_processor, tower_input_size


class LlavaConfig(FrontendConfig):
    type: str = "llava"
    vision: VisionTowerConfig = Field(default_factory=VisionTowerConfig)
    connector: ConnectorConfig = Field(default_factory=ConnectorConfig)
    image: ImageConfig = Field(default_factory=ImageConfig)


@FRONTENDS.register("llava", config=LlavaConfig)
class LlavaFrontend(Frontend):
    """The baseline: a transformers vision backbone and a projector (linear or 2-layer GELU MLP)."""

    config: LlavaConfig

    def __init__(self, config: LlavaConfig, text_config: PretrainedConfig, *, load_weights: bool = True):
        super().__init__(config, text_config)
        self.vision_tower = VisionTower(config.vision, load_weights=load_weights)
        size = tower_input_size(self.vision_tower, config.image)
        self._processor = tower_image_processor(self.vision_tower, config.image, size)
        features, self._grid = probe_tower(self.vision_tower, size)
        self._tokens_per_image = features.shape[1] // config.connector.merge**2
        self.connector = Connector(
            config.connector, features.shape[-1], self.text_hidden_size, self._tokens_per_image
        )

    @property
    def image_processor(self) -> ImageProcessor:
        return self._processor

    def num_image_tokens(self, pixels: torch.Tensor | None = None) -> int:
        return self._tokens_per_image

    def group_paths(self) -> dict[str, str]:
        return {"vision_tower": "vision_tower.model", "connector": "connector"}

    def reduce_tower(self, patch: Callable[[VisionTower], None], reducer: str) -> int:
        connector = self.config.connector
        if connector.merge > 1 or connector.position_embedding:
            raise ConfigError(
                f"reducer {reducer!r} merges vision tokens, so they no longer form a grid; it cannot be "
                "combined with frontend.connector.merge > 1 or connector.position_embedding (both need the "
                "tower's full grid): set merge: 1 and position_embedding: false"
            )
        dense = self._tokens_per_image
        patch(self.vision_tower)
        features, _ = probe_tower(self.vision_tower, self.image_processor.size)
        self._tokens_per_image = features.shape[1]
        return dense

    def resolved_config(self) -> LlavaConfig:
        resolved = self.config.model_copy(deep=True)
        resolved.vision = self.vision_tower.resolved_config()
        resolved.image.size = self.image_processor.size
        resolved.image.mean, resolved.image.std = self.image_processor.mean, self.image_processor.std
        return resolved

    def encode(self, pixel_values: torch.Tensor) -> torch.Tensor:
        dtype = next(self.vision_tower.parameters()).dtype
        features, grid = self.vision_tower(pixel_values.to(dtype))  # [N_img, N, C]
        return self.connector(features, grid)  # [N_img, T_img, D]
