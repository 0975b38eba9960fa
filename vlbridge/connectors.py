"""Connectors (projectors) from vision features to the LLM's embedding width."""

from __future__ import annotations

import torch
from torch import nn
from transformers.activations import ACT2FN

from .config import ConnectorConfig
from .errors import ConfigError
from .registry import CONNECTORS


@CONNECTORS.register("linear")
def _linear(cfg: ConnectorConfig, in_dim: int, out_dim: int) -> nn.Module:
    return nn.Linear(in_dim, out_dim, bias=cfg.bias)


@CONNECTORS.register("mlp2x_gelu")
def _mlp2x_gelu(cfg: ConnectorConfig, in_dim: int, out_dim: int) -> nn.Module:
    """LLaVA-1.5's projector: linear, activation (GELU unless `act` says otherwise), linear."""
    if cfg.act not in ACT2FN:
        raise ConfigError(f"connector.act={cfg.act!r} is not an activation transformers knows (ACT2FN)")
    act = nn.GELU() if cfg.act == "gelu" else ACT2FN[cfg.act]
    return nn.Sequential(
        nn.Linear(in_dim, out_dim, bias=cfg.bias), act, nn.Linear(out_dim, out_dim, bias=cfg.bias)
    )


def merge_neighbours(features: torch.Tensor, grid: tuple[int, int], k: int) -> torch.Tensor:
    """Concatenate each k x k block of the grid along channels: [B, h*w, C] -> [B, h*w/k², k²C]."""
    b, n, c = features.shape
    h, w = grid
    if h * w != n or h % k or w % k:
        raise ConfigError(
            f"connector.merge={k} needs a {k}x{k}-divisible patch grid without extra tokens; "
            f"got {n} tokens on a {h}x{w} grid (change merge, the image size or feature_select)"
        )
    x = features.view(b, h // k, k, w // k, k, c).permute(0, 1, 3, 2, 4, 5)  # [B, h/k, w/k, k, k, C]
    return x.reshape(b, (h // k) * (w // k), k * k * c)


class Connector(nn.Module):
    """Optional k x k token merging, the registered projection, optional learned position embedding."""

    def __init__(self, cfg: ConnectorConfig, in_dim: int, out_dim: int, num_tokens: int) -> None:
        super().__init__()
        self.merge = cfg.merge
        self.proj = CONNECTORS.get(cfg.type)(cfg, in_dim * cfg.merge**2, out_dim)
        self.position = (
            nn.Parameter(0.02 * torch.randn(num_tokens, out_dim)) if cfg.position_embedding else None
        )

    def forward(self, features: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        if self.merge > 1:
            features = merge_neighbours(features, grid, self.merge)
        out = self.proj(features)  # [B, N', D]
        if self.position is not None:
            if out.shape[1] != self.position.shape[0]:
                raise ConfigError(
                    f"connector.position_embedding was sized for {self.position.shape[0]} tokens but the "
                    f"tower gave {out.shape[1]}; keep the image size fixed or turn the embedding off"
                )
            out = out + self.position
        return out
