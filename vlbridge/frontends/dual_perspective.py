"""INF-LLaVA's two modules: dual-perspective cropping (DCM) and dual-perspective enhancement (DEM).

Ma et al., "INF-LLaVA: Dual-perspective Perception for High-Resolution MLLMs" (arXiv 2407.16198),
Sec. 4; official code `INF_llava/model/llava_arch.py` (`SpatialEmbed`, `encode_images`).

Maps are channels-last [B, H, W, C]. A map of n x n groups is cut in one of two ways: contiguous
blocks (`untile`: the local crops) or strided groups (`deinterleave`: the global sub-images, every
n-th cell with a different phase); `tile` and `interleave` put the groups back. Group k = a*n + b.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

Cut = Callable[[torch.Tensor, int], torch.Tensor]


def untile(grid: torch.Tensor, n: int) -> torch.Tensor:
    """Contiguous blocks: [B, n*h, n*w, C] -> [B, n², h, w, C]; block k holds rows a*h..(a+1)*h-1."""
    b, height, width, c = grid.shape
    h, w = height // n, width // n
    x = grid.reshape(b, n, h, n, w, c).permute(0, 1, 3, 2, 4, 5)  # [B, a, b, i, j, C]
    return x.reshape(b, n * n, h, w, c)


def tile(parts: torch.Tensor, n: int) -> torch.Tensor:
    """Inverse of `untile`: blocks side by side, [B, n², h, w, C] -> [B, n*h, n*w, C]."""
    b, _, h, w, c = parts.shape
    x = parts.reshape(b, n, n, h, w, c).permute(0, 1, 3, 2, 4, 5)  # [B, a, i, b, j, C]
    return x.reshape(b, n * h, n * w, c)


def deinterleave(grid: torch.Tensor, n: int) -> torch.Tensor:
    """Strided groups: group k holds cells (n*i + a, n*j + b); [B, n*h, n*w, C] -> [B, n², h, w, C]."""
    b, height, width, c = grid.shape
    h, w = height // n, width // n
    x = grid.reshape(b, h, n, w, n, c).permute(0, 2, 4, 1, 3, 5)  # [B, a, b, i, j, C]
    return x.reshape(b, n * n, h, w, c)


def interleave(parts: torch.Tensor, n: int) -> torch.Tensor:
    """Inverse of `deinterleave`: F[n*i + a, n*j + b] = parts[a*n + b][i, j]."""
    b, _, h, w, c = parts.shape
    x = parts.reshape(b, n, n, h, w, c).permute(0, 3, 1, 4, 2, 5)  # [B, i, a, j, b, C]
    return x.reshape(b, h * n, w * n, c)


def dual_crop(pixels: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """DCM (paper eq. 13, 16-17): [B, 3, n*r, n*r] -> local crops and global sub-images, [B, n², 3, r, r].

    Local crop k = X[a*r:(a+1)*r, b*r:(b+1)*r]; global sub-image k = X[a::n, b::n].
    """
    x = pixels.permute(0, 2, 3, 1)  # [B, H, W, 3]
    local = untile(x, n).permute(0, 1, 4, 2, 3)
    global_ = deinterleave(x, n).permute(0, 1, 4, 2, 3)
    return local, global_


def multi_head_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, heads: int
) -> torch.Tensor:
    """softmax(Q Kᵀ / √d_head) V per head with SDPA (flash kernels on CUDA): [G, L, C] -> [G, L, C]."""
    g, length, c = query.shape

    def split(t: torch.Tensor) -> torch.Tensor:  # [G, L, C] -> [G, heads, L, C/heads]
        return t.reshape(t.shape[0], t.shape[1], heads, c // heads).transpose(1, 2)

    out = F.scaled_dot_product_attention(split(query), split(key), split(value))
    return out.transpose(1, 2).reshape(g, length, c)


class OfficialAttention(nn.Module):
    """The official code's MHA: LN(W_o · MHA(Q W_q, K W_k, K W_v) + Q), projections with bias."""

    def __init__(self, channels: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.q_proj = nn.Linear(channels, channels)
        self.k_proj = nn.Linear(channels, channels)
        self.v_proj = nn.Linear(channels, channels)
        self.out_proj = nn.Linear(channels, channels)
        self.norm = nn.LayerNorm(channels)

    def forward(self, query: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        out = multi_head_attention(self.q_proj(query), self.k_proj(context), self.v_proj(context), self.heads)
        return self.norm(self.out_proj(out) + query)


class PaperAttention(nn.Module):
    """Paper eq. 18-25: softmax(Q W_q (K W_k)ᵀ / √d) K W_v; no output projection, residual or norm."""

    def __init__(self, channels: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.q_proj = nn.Linear(channels, channels, bias=False)
        self.k_proj = nn.Linear(channels, channels, bias=False)
        self.v_proj = nn.Linear(channels, channels, bias=False)

    def forward(self, query: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        return multi_head_attention(
            self.q_proj(query), self.k_proj(context), self.v_proj(context), self.heads
        )


def grouped_attention(
    attention: nn.Module, query: torch.Tensor, context: torch.Tensor, cut: Cut, paste: Cut, n: int
) -> torch.Tensor:
    """Cross-attention inside each of the n² groups of two [B, n*h, n*w, C] maps.

    All groups go through one batched call whose sequences have h*w tokens, never (n*h)*(n*w).
    """
    q, kv = cut(query, n), cut(context, n)  # [B, n², h, w, C]
    b, groups, h, w, c = q.shape
    out = attention(q.reshape(b * groups, h * w, c), kv.reshape(b * groups, h * w, c))  # [B*n², h*w, C]
    return paste(out.reshape(b, groups, h, w, c), n)


class DualPerspectiveEnhancement(nn.Module, ABC):
    """DEM: local map + global map [B, n*h, n*w, C] -> enhanced features on the base grid [B, h*w, C]."""

    def __init__(self, crops_per_side: int) -> None:
        super().__init__()
        self.n = crops_per_side

    def forward(self, local: torch.Tensor, global_: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        fused = self.fuse(self.enhance_local(local, global_), self.enhance_global(local, global_))
        return self.shrink(fused, grid).flatten(1, 2)  # [B, h*w, C]

    @abstractmethod
    def enhance_local(self, local: torch.Tensor, global_: torch.Tensor) -> torch.Tensor:
        """C: local features queried against global ones, [B, n*h, n*w, C]."""

    @abstractmethod
    def enhance_global(self, local: torch.Tensor, global_: torch.Tensor) -> torch.Tensor:
        """S: global features queried against local ones, [B, n*h, n*w, C]."""

    @abstractmethod
    def fuse(self, c: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        """U from C and S, [B, n*h, n*w, C]."""

    @abstractmethod
    def shrink(self, u: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """U down to the base grid, [B, h, w, C]."""

    @abstractmethod
    def blend(self, low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
        """Combine the low-resolution view's features with the DEM output, [B, h*w, C]."""


def _bottleneck(channels: int) -> nn.Sequential:
    """φ(x) = W₂ GELU(W₁ x + b₁) + b₂ with W₁: C -> C/16, W₂: C/16 -> C/2."""
    return nn.Sequential(
        nn.Linear(channels, channels // 16), nn.GELU(), nn.Linear(channels // 16, channels // 2)
    )


class OfficialDEM(DualPerspectiveEnhancement):
    """The released code (weight-compatible layout): one MHA shared by both directions, global queries
    cut into contiguous blocks and local queries into strided groups, GELU bottlenecks + residual + LN,
    bilinear shrink (centre sampling for n = 3), mean with the low-resolution view."""

    def __init__(self, channels: int, crops_per_side: int, heads: int) -> None:
        super().__init__(crops_per_side)
        self.attention = OfficialAttention(channels, heads)
        self.phi_local = _bottleneck(channels)  # φ_c, applied to C
        self.phi_global = _bottleneck(channels)  # φ_s, applied to S
        self.norm = nn.LayerNorm(channels)

    def enhance_local(self, local: torch.Tensor, global_: torch.Tensor) -> torch.Tensor:
        return grouped_attention(self.attention, local, global_, deinterleave, interleave, self.n)

    def enhance_global(self, local: torch.Tensor, global_: torch.Tensor) -> torch.Tensor:
        return grouped_attention(self.attention, global_, local, untile, tile, self.n)

    def fuse(self, c: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        return self.norm(torch.cat([self.phi_local(c), self.phi_global(s)], dim=-1) + s + c)

    def shrink(self, u: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        x = u.permute(0, 3, 1, 2).float()  # [B, C, n*h, n*w], resized in float32 like the official code
        x = F.interpolate(x, size=grid, mode="bilinear", align_corners=False)
        return x.to(u.dtype).permute(0, 2, 3, 1)

    def blend(self, low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
        return (low + high) / 2


class PaperDEM(DualPerspectiveEnhancement):
    """The paper's equations: both maps cut strided for global queries and contiguous for local ones,
    separate attention per direction, one linear C -> C/2 per branch, average pooling, addition."""

    def __init__(self, channels: int, crops_per_side: int, heads: int) -> None:
        super().__init__(crops_per_side)
        self.attend_local = PaperAttention(channels, heads)
        self.attend_global = PaperAttention(channels, heads)
        self.proj_local = nn.Linear(channels, channels // 2)
        self.proj_global = nn.Linear(channels, channels // 2)

    def enhance_local(self, local: torch.Tensor, global_: torch.Tensor) -> torch.Tensor:
        return grouped_attention(self.attend_local, local, global_, untile, tile, self.n)

    def enhance_global(self, local: torch.Tensor, global_: torch.Tensor) -> torch.Tensor:
        return grouped_attention(self.attend_global, global_, local, deinterleave, interleave, self.n)

    def fuse(self, c: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.proj_local(c), self.proj_global(s)], dim=-1)

    def shrink(self, u: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        x = F.adaptive_avg_pool2d(u.permute(0, 3, 1, 2).float(), grid)  # n x n average pooling
        return x.to(u.dtype).permute(0, 2, 3, 1)

    def blend(self, low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
        return low + high


DEM_VARIANTS: dict[str, type[DualPerspectiveEnhancement]] = {"official": OfficialDEM, "paper": PaperDEM}
DEFAULT_HEADS = {"official": 8, "paper": 1}
