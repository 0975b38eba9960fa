"""SOLO front-end: no vision encoder; raw pixel patches, one linear map, added at `<vpatch>` slots.

Chen et al., "A Single Transformer for Scalable Vision-Language Modeling" (TMLR 2024),
https://arxiv.org/abs/2407.06438. An image is resized to whole patches (long side capped), cut into
P x P patches laid out row by row as `<vision>` p p ... `<vrow_sep>` p p ... `</vision>`, and each
flattened patch goes through one bias-free linear layer whose output is *added* to the `<vpatch>`
token embedding at its slot. The LLM itself does all the vision; nothing is hooked into it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from PIL import Image
from pydantic import Field, model_validator
from torch import nn

from ..config import FrontendConfig
from ..errors import ConfigError, DataError
from ..image_processing import to_tensor
from ..registry import FRONTENDS
from .base import Embedded, Frontend
from .layout import ImageLayout, TowerShrink

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
VISION_START, PATCH, ROW_SEP, VISION_END = "<vision>", "<vpatch>", "<vrow_sep>", "</vision>"


class SoloConfig(FrontendConfig):
    """Patch size and long-side cap in pixels (the paper: 32 / 1024); how an image block closes."""

    type: str = "solo"
    patch_size: int = Field(default=32, ge=1)
    max_side: int = Field(default=1024, ge=1)
    # "</vision>" as in pre-training; "<vision>" reproduces the layout the released SOLO-7B saw in SFT.
    end_token: Literal["</vision>", "<vision>"] = VISION_END
    init_std: float = Field(default=0.02, gt=0)  # W_p ~ normal(0, init_std), HF's initializer_range

    @model_validator(mode="after")
    def _cap_is_whole_patches(self) -> SoloConfig:
        p, cap = self.patch_size, self.max_side
        if cap % p:
            options = " or ".join(str(v) for v in (cap // p * p, (cap // p + 1) * p) if v > 0)
            raise ConfigError(
                f"frontend.max_side={cap} is not a multiple of frontend.patch_size={p}, so a capped image "
                f"would not split into whole patches; set frontend.max_side to {options}"
            )
        return self


def solo_size(width: int, height: int, patch: int, max_side: int) -> tuple[int, int]:
    """(W', H') of spec §2.1: the long side rounded up to whole patches and capped at `max_side`, the
    short side scaled by the same factor (floored) then rounded up to whole patches.

    Aspect ratios so extreme that the short side scales to 0 pixels are clamped to one patch (§8;
    the reference code raises instead).
    """
    long, short = max(width, height), min(width, height)
    new_long = min(_round_up(long, patch), max_side)
    new_short = max(_round_up(new_long * short // long, patch), patch)
    return (new_long, new_short) if width >= height else (new_short, new_long)


def _round_up(pixels: int, patch: int) -> int:
    return -(-pixels // patch) * patch


def patchify(pixels: torch.Tensor, patch: int) -> torch.Tensor:
    """[3, H, W] -> [n_h, n_w, 3·P²], channel-major within a patch (spec §2.3):
    element ch·P² + y·P + x of patch (r, c) is pixel [ch, r·P + y, c·P + x]."""
    channels, height, width = pixels.shape
    grid = pixels.reshape(channels, height // patch, patch, width // patch, patch)  # [3, n_h, P, n_w, P]
    return grid.permute(1, 3, 0, 2, 4).reshape(height // patch, width // patch, channels * patch * patch)


@dataclass(frozen=True)
class SoloImageProcessor:
    """PIL image -> patches [n_h, n_w, 3·P²]: the grid shape travels with the patches."""

    patch_size: int
    max_side: int

    def __call__(self, image: Image.Image) -> torch.Tensor:
        image = image.convert("RGB")
        size = solo_size(*image.size, self.patch_size, self.max_side)
        if image.size != size:
            image = image.resize(size, Image.BILINEAR)  # §2.1: PIL bilinear, as the reference transform
        return patchify(to_tensor(image, IMAGENET_MEAN, IMAGENET_STD), self.patch_size)


@dataclass(frozen=True)
class SoloLayout(ImageLayout):
    """An image is its own patch grid: `<vision>` rows of `<vpatch>` joined by `<vrow_sep>`, then the end
    token; the count depends on the image's size."""

    end_token: str = VISION_END

    def num_image_tokens(self, pixels: torch.Tensor | None = None) -> int:
        """n_h·n_w patches + (n_h - 1) row separators + start and end markers (§2.4)."""
        n_h, n_w = pixels.shape[:2]
        return n_h * n_w + n_h + 1

    def placeholder(self, pixels: torch.Tensor) -> str:
        n_h, n_w = pixels.shape[:2]
        return VISION_START + ROW_SEP.join([PATCH * n_w] * n_h) + self.end_token

    def collate(self, pixels: list[torch.Tensor]) -> torch.Tensor:
        """Images of any size -> all their patches in batch and raster order [N, 3·P²]."""
        return torch.cat([p.flatten(0, 1) for p in pixels])


@FRONTENDS.register("solo", config=SoloConfig)
class SoloFrontend(Frontend):
    """`patch_proj` (W_p, d x 3P², no bias) plus four vision tokens; the only new weights besides their
    embedding rows, which stay trainable when the LLM is LoRA-wrapped (`trained_token_ids`)."""

    config: SoloConfig

    def __init__(self, config: SoloConfig, *args, **kwargs) -> None:
        super().__init__(config, *args, **kwargs)
        self.patch_proj = nn.Linear(3 * config.patch_size**2, self.text_hidden_size, bias=False)
        nn.init.normal_(self.patch_proj.weight, std=config.init_std)

    @classmethod
    def image_layout(cls, config: SoloConfig, shrink: TowerShrink | None = None) -> SoloLayout:
        cls.refuse_shrink(config, shrink)
        processor = SoloImageProcessor(config.patch_size, config.max_side)
        tokens = (VISION_START, PATCH, ROW_SEP, VISION_END)
        return SoloLayout(processor, PATCH, tokens, None, end_token=config.end_token)

    def trained_token_ids(self) -> list[int]:
        return self.special_token_ids

    def group_paths(self) -> dict[str, str]:
        return {"patch_proj": "patch_proj"}

    def visual_mask(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Patches and row separators (the image body; start/end markers stay text-like)."""
        body = [self.image_token_id, self.special_token_ids[self.layout.special_tokens.index(ROW_SEP)]]
        return torch.isin(input_ids, torch.tensor(body, device=input_ids.device))

    def encode(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Patches [N, 3·P²] -> W_p·patch [N, D] (one row per `<vpatch>` slot, not per image)."""
        return self.patch_proj(pixel_values.to(self.patch_proj.weight.dtype))

    def embed(self, input_ids: torch.Tensor, inputs_embeds: torch.Tensor, pixel_values) -> Embedded:
        """e_t = E[id_t] + W_p·patch_π(t) at `<vpatch>` slots, E[id_t] elsewhere (§2.5); the projected
        patches [N, D] are the image embeddings.

        Text-only batches never touch `patch_proj` (§8: the reference fails on them).
        """
        slots = input_ids == self.image_token_id  # [B, T]
        n_slots = int(slots.sum())
        n_patches = 0 if pixel_values is None else len(pixel_values)
        if n_slots != n_patches:
            raise DataError(
                f"image placeholder count mismatch: {n_slots} {PATCH!r} slots in input_ids but {n_patches} "
                "patches in pixel_values; build inputs with VLProcessor (each <image> expands to its own "
                "patch grid) and do not truncate inside an image"
            )
        if n_patches == 0:
            return Embedded(inputs_embeds)
        projected = self.encode(pixel_values).to(inputs_embeds.dtype)  # [N, D]
        added = torch.zeros_like(inputs_embeds).masked_scatter(slots.unsqueeze(-1), projected)  # [B, T, D]
        return Embedded(inputs_embeds + added, projected)
