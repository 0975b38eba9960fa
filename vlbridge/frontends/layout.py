"""How images enter the token sequence, known from the config alone.

An `ImageLayout` is the processing half of a front-end: the pixel transform, the placeholder tokens that
stand for one image and how a batch's images are stacked. Front-ends compute it from their config (token
counts from the tower's geometry, `vision_towers.TowerSpec`), so a processor exists without the model and
without running the tower, as transformers' and vLLM's processors do.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from PIL import Image

from ..errors import ConfigError
from ..registry import FRONTENDS, REDUCERS

if TYPE_CHECKING:
    from ..config import VLConfig
    from ..vision_towers import TowerSpec

# (tower, input size) -> tokens per image the tower returns once tower reducers (ToMe, Turbo) have merged
TowerShrink = Callable[["TowerSpec", int], int]


@dataclass(frozen=True)
class ImageLayout:
    """One image as pixels and as placeholder text; the default is a fixed count of one placeholder token
    after an optional text prefix."""

    image_processor: Callable[[Image.Image], torch.Tensor]
    image_token: str  # the placeholder token the front-end's embeddings replace
    special_tokens: tuple[str, ...]  # tokens the vocabulary needs (image_token among them)
    tokens_per_image: int | None  # None: the count depends on the image
    prefix: str = ""  # text before an image's placeholders

    def num_image_tokens(self, pixels: torch.Tensor | None = None) -> int:
        """Placeholder tokens one processed image occupies in the LLM sequence."""
        return self.tokens_per_image

    def placeholder(self, pixels: torch.Tensor) -> str:
        """The text that stands for one processed image."""
        return self.prefix + self.image_token * self.num_image_tokens(pixels)

    def collate(self, pixels: list[torch.Tensor]) -> torch.Tensor:
        return torch.stack(pixels)


def image_layout(config: VLConfig) -> ImageLayout:
    """The layout a model built from `config` expects: its front-end's, with the tower reducers' count."""
    shrinking = [s for s in config.reducers if REDUCERS.get(s.type).shrinks_tower]
    if len(shrinking) > 1:
        raise ConfigError(
            f"reducers {[s.type for s in shrinking]} all shorten the vision tower's token sequence; use one "
            "of them at a time"
        )
    shrink = None
    if shrinking:
        section = shrinking[0]
        reducer = REDUCERS.get(section.type)

        def shrink(tower: TowerSpec, size: int) -> int:
            return reducer.tower_tokens(section, tower, size)

    return FRONTENDS.get(config.frontend.type).image_layout(config.frontend, shrink)
