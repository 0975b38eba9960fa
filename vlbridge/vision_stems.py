"""Convolutional stem for ViT towers trained from scratch (Xiao et al., "Early Convolutions Help
Transformers See Better", NeurIPS 2021).

A ViT's patchify convolution has to learn translation-invariant shape features from scratch, which on
small data takes thousands of steps; a few 3x3 stride-2 convolutions with BatchNorm learn them in a few
hundred. The stem replaces `embeddings.patch_embedding` (same output grid and width) and CLIP's
pre-LayerNorm (docs/architecture.md, "Conv stem"); the encoder blocks, position embeddings, CLS token
and everything that works on them (token merging, feature layers, LoRA) are unchanged.
"""

from __future__ import annotations

import torch
from torch import nn

from .errors import ConfigError


class ConvStem(nn.Sequential):
    """log2(patch) x [3x3 conv, stride 2, BN, ReLU], widths doubling up to the hidden size."""

    def __init__(self, patch_size: int, hidden_size: int, num_channels: int = 3) -> None:
        stages = patch_size.bit_length() - 1
        widths = [max(hidden_size >> (stages - 1 - i), 8) for i in range(stages - 1)] + [hidden_size]
        layers: list[nn.Module] = []
        for c_in, c_out in zip([num_channels, *widths], widths, strict=False):
            conv = nn.Conv2d(c_in, c_out, 3, stride=2, padding=1, bias=False)
            layers += [conv, nn.BatchNorm2d(c_out), nn.ReLU()]
        super().__init__(*layers)

    @property
    def weight(self) -> torch.Tensor:
        """The embeddings' forward reads `patch_embedding.weight.dtype` to cast the pixels."""
        return self[-3].weight


def install_conv_stem(model: nn.Module, model_type: str) -> None:
    """Swap the tower's patchify convolution for a ConvStem with the same stride and output width."""
    embeddings = getattr(model, "embeddings", None)
    patchify = getattr(embeddings, "patch_embedding", None)
    if not isinstance(patchify, nn.Conv2d):
        raise ConfigError(
            f"vision.stem='conv' replaces a ViT's patchify convolution, which the {model_type!r} tower does "
            "not have; use stem='patch' (CNN towers have their own stem)"
        )
    patch = patchify.stride[0]
    if patch < 2 or patch & (patch - 1):
        raise ConfigError(
            f"vision.stem='conv' is a stack of stride-2 convolutions, so the patch size must be a power of "
            f"two (got {patch}); set vision.config.patch_size to 8, 16 or 32"
        )
    embeddings.patch_embedding = ConvStem(patch, patchify.out_channels, patchify.in_channels)
    if isinstance(getattr(model, "pre_layrnorm", None), nn.LayerNorm):
        # CLIP normalises every token before the first block, which turns the stem's near-zero background
        # into tokens as large as the objects; the stem's BatchNorm already sets the scale.
        model.pre_layrnorm = nn.Identity()
