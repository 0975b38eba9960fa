"""Fixed 2D sine-cosine initialisation of a from-scratch ViT's position table (as in MAE, He et al. 2022).

A learned position table starts as small noise (std 0.02 in CLIP), so a ViT trained from scratch on little
data carries almost no position signal into its tokens, and the LLM cannot tell left from right. Sine-cosine
rows give every patch its (row, column) from the first step, in a form a linear map can read and compare.
The table stays a trainable parameter; only its starting point changes.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .errors import ConfigError


def sincos_2d(side: int, dim: int) -> torch.Tensor:
    """[side * side, dim] in row-major patch order: the first half encodes the row, the second the column."""
    if dim % 4:
        raise ConfigError(
            f"vision.position_init='sincos' splits the width into sin/cos of row and column, so the tower's "
            f"hidden_size must be a multiple of 4 (got {dim})"
        )
    quarter = dim // 4
    freqs = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64) / quarter)
    rows, cols = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")

    def encode(coord: torch.Tensor) -> torch.Tensor:
        angles = coord.reshape(-1, 1).double() * freqs
        return torch.cat([angles.sin(), angles.cos()], dim=1)

    return torch.cat([encode(rows), encode(cols)], dim=1).float()


def install_sincos_positions(model: nn.Module, model_type: str, has_cls: bool) -> None:
    """Overwrite the tower's position table: sine-cosine rows for the patches, zeros for the CLS slot."""
    table = getattr(getattr(model, "embeddings", None), "position_embedding", None)
    if not isinstance(table, nn.Embedding):
        raise ConfigError(
            f"vision.position_init='sincos' initialises a ViT's position table, which the {model_type!r} "
            "tower does not have; keep position_init='learned' (CNNs get position from their padding)"
        )
    rows, dim = table.weight.shape
    patches = rows - int(has_cls)
    side = math.isqrt(patches)
    if side * side != patches:
        raise ConfigError(
            f"vision.position_init='sincos' needs a square patch grid, but the {model_type!r} position table "
            f"has {patches} patch rows"
        )
    with torch.no_grad():
        table.weight.zero_()
        table.weight[int(has_cls) :] = sincos_2d(side, dim).to(table.weight.dtype)
