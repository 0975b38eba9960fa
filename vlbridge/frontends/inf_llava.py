"""INF-LLaVA front-end: high-resolution images through a base-resolution tower, at LLaVA's token count.

An image processed to n*r pixels is cut into n² local crops and n² strided global sub-images, which go
through the tower in one batched call with a low-resolution view; the DEM (dual_perspective.py) merges
the two stitched high-resolution maps back onto the tower's g x g grid, blends them with the
low-resolution features, and the connector projects the g² tokens into the LLM.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator

from ..config import ConnectorConfig, FrontendConfig, ImageConfig, VisionTowerConfig
from ..connectors import Connector
from ..errors import ConfigError
from ..registry import FRONTENDS
from ..vision_towers import TowerSpec
from .base import IMAGE_TOKEN, TowerFrontend
from .dual_perspective import (
    DEFAULT_HEADS,
    DEM_VARIANTS,
    DualPerspectiveEnhancement,
    dual_crop,
    interleave,
    tile,
)
from .layout import ImageLayout, TowerShrink


class InfLlavaConfig(FrontendConfig):
    """LLaVA's sections plus the cropping and enhancement options.

    `image.size` is the base resolution r the tower sees (default: the tower's own); images are
    processed to `crops_per_side * r` pixels.
    """

    type: str = "inf_llava"
    vision: VisionTowerConfig = Field(default_factory=VisionTowerConfig)
    connector: ConnectorConfig = Field(default_factory=ConnectorConfig)
    image: ImageConfig = Field(default_factory=ImageConfig)
    crops_per_side: int = Field(default=3, ge=1)
    dem_variant: Literal["official", "paper"] = "official"
    dem_heads: int | None = Field(default=None, ge=1)  # default: 8 (official) or 1 (paper)

    @model_validator(mode="after")
    def _patch_tokens_only(self) -> InfLlavaConfig:
        if self.vision.feature_select != "patch":
            raise ConfigError(
                f"frontend.vision.feature_select={self.vision.feature_select!r} keeps the CLS token, which "
                "has no place in the stitched high-resolution maps; inf_llava needs feature_select='patch'"
            )
        return self


@FRONTENDS.register("inf_llava", config=InfLlavaConfig)
class InfLlavaFrontend(TowerFrontend):
    """Vision tower + dual-perspective cropping and enhancement + connector."""

    config: InfLlavaConfig

    def __init__(self, config: InfLlavaConfig, *args, **kwargs) -> None:
        super().__init__(config, *args, **kwargs)
        self.dem = self._build_dem(self.spec.width)
        tokens = self.layout.num_image_tokens()
        self.connector = Connector(config.connector, self.spec.width, self.text_hidden_size, tokens)

    @classmethod
    def image_layout(cls, config: InfLlavaConfig, shrink: TowerShrink | None = None) -> ImageLayout:
        """Images are processed to n*r pixels; each becomes the g² tokens of the tower's grid at r."""
        cls.refuse_shrink(config, shrink)
        spec = TowerSpec.from_config(config.vision)
        base = spec.input_size(config.image)
        h, w = spec.grid(base)
        processor = spec.image_processor(config.image, config.crops_per_side * base)
        return ImageLayout(processor, IMAGE_TOKEN, (IMAGE_TOKEN,), h * w // config.connector.merge**2)

    def _build_dem(self, channels: int) -> DualPerspectiveEnhancement:
        variant = self.config.dem_variant
        heads = self.config.dem_heads or DEFAULT_HEADS[variant]
        if channels % heads or channels % 2 or channels < 16:
            raise ConfigError(
                f"the tower's {channels}-wide features do not fit the DEM: they must be even, at least 16 "
                f"(bottleneck C/16) and divisible by frontend.dem_heads={heads}; change dem_heads or the "
                "tower width / vision.feature_layer"
            )
        return DEM_VARIANTS[variant](channels, self.config.crops_per_side, heads)

    def group_paths(self) -> dict[str, str]:
        return {**super().group_paths(), "dem": "dem", "connector": "connector"}

    def views(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Steps 1-2 of docs/architecture.md#inf_llava: [B, 3, H, W] -> the 2n²+1 tower inputs per image,
        [B*(2n²+1), 3, r, r] in float32: all local crops, all global sub-images, the low-resolution views."""
        n, r = self.config.crops_per_side, self.tower_size
        x = pixel_values.float()  # resizes run in float32, like the official code
        if x.shape[-2:] != (n * r, n * r):  # any input size works; the processor already gives n*r
            x = F.interpolate(x, size=(n * r, n * r), mode="bicubic", align_corners=False)
        local, global_ = dual_crop(x, n)  # [B, n², 3, r, r] each
        low = F.interpolate(x, size=(r, r), mode="bicubic", align_corners=False)  # no antialias (official)
        return torch.cat([local.flatten(0, 1), global_.flatten(0, 1), low])

    def encode(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Steps 2-5: one tower call, stitch, DEM, blend, connector -> [B, T_img, D]."""
        n, b = self.config.crops_per_side, pixel_values.shape[0]
        features, grid = self.tower_features(self.views(pixel_values))  # one call: [B*(2n²+1), g², C]
        h, w = grid
        crops = features[: 2 * n * n * b].reshape(2, b, n * n, h, w, -1)  # [local|global, B, n², h, w, C]
        local, global_ = tile(crops[0], n), interleave(crops[1], n)  # [B, n*h, n*w, C]
        high = self.dem(local, global_, grid)  # [B, g², C]
        return self.connector(self.dem.blend(features[2 * n * n * b :], high), grid)  # [B, T_img, D]
