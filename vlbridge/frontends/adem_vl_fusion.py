"""ADEM-VL's parameter-free parts: multiscale pooling, the adaptive cross-attention, the hooks adding them.

Hao et al., "ADEM-VL: Adaptive and Embedded Fusion for Efficient Vision-Language Tuning" (arXiv 2410.17779).
Everything here is a pure function of its tensor arguments or a hook that calls one; the tensors the
fusion learns (ψ, ψ_cls, E₁, E₂, tower adapters) live in the `adem_vl` front-end, never inside the LLM.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import DataError
from ..families import Family
from ..llm_calls import VISUAL_MEMORY

# (MLP input u [B, T, D], the visual memory of the LLM call) -> the term added beside mlp(u)
Delta = Callable[[torch.Tensor, "VisualMemory | None"], torch.Tensor]


def drop_count(gamma: float, num_visual: int) -> int:
    """How many visual features each token drops: Python `int(γ·N_v)` as the official code computes it
    (not an exact floor: γ = 0.57, N_v = 100 drops 56)."""
    return int(gamma * num_visual)


def multiscale(patches: torch.Tensor, grid: tuple[int, int], scales: Iterable[int]) -> torch.Tensor:
    """[B, h*w, C] row-major patch grid -> [B, ΣS, C] multiscale prompt (spec §2.3).

    Per scale s: the grid itself when it already is √s×√s, else adaptive average pooling to √s×√s;
    each result flattened row-major, all concatenated in list order.
    """
    b, _, c = patches.shape
    h, w = grid
    maps = patches.transpose(1, 2).reshape(b, c, h, w)  # [B, C, h, w]
    pooled = []
    for s in scales:
        side = math.isqrt(s)
        out = maps if (side, side) == (h, w) else F.adaptive_avg_pool2d(maps, side)  # [B, C, √s, √s]
        pooled.append(out.flatten(2).transpose(1, 2))  # [B, s, C]
    return torch.cat(pooled, dim=1)


def adaptive_drop(scores: torch.Tensor, gamma: float) -> torch.Tensor:
    """Zero the int(γ·N_v) weakest scores of every token [B, T, N_v]; ties at the threshold are kept (≥)."""
    drop = drop_count(gamma, scores.shape[-1])
    if drop == 0:
        return scores
    threshold = scores.kthvalue(drop + 1, dim=-1, keepdim=True).values  # [B, T, 1]
    return torch.where(scores >= threshold, scores, 0.0)


def fuse(
    u: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, gamma: float, alpha: float
) -> torch.Tensor:
    """α · drop_γ(SiLU(u)·keysᵀ) · values: unnormalised kernel attention, no projections (spec §2.6).

    u: the MLP input [B, T, D]; keys SiLU(V+E₁) and values V+E₂: [B, N_v, D]. Returns [B, T, D].
    """
    scores = torch.matmul(F.silu(u), keys.transpose(1, 2))  # [B, T, N_v]
    return alpha * torch.matmul(adaptive_drop(scores, gamma), values)  # [B, T, D]


@dataclass
class VisualMemory:
    """What every decoder layer reads for one batch of prompts: keys and values [B, N_v, D]."""

    keys: torch.Tensor
    values: torch.Tensor
    _expanded: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict, repr=False)

    def for_batch(self, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values for an LLM batch of `batch` rows: beam search and `num_return_sequences`
        repeat each prompt consecutively (like `input_ids`), so the memory is repeat-interleaved."""
        rows = self.keys.shape[0]
        if batch == rows:
            return self.keys, self.values
        if batch % rows:
            raise DataError(
                f"the LLM ran on a batch of {batch} rows but the visual memory holds {rows} prompts; "
                "call the LLM through VLModel.forward / generate so the memory matches the batch"
            )
        if batch not in self._expanded:
            repeat = batch // rows
            self._expanded[batch] = (
                self.keys.repeat_interleave(repeat, dim=0),
                self.values.repeat_interleave(repeat, dim=0),
            )
        return self._expanded[batch]


def hook_decoder_mlps(language_model: nn.Module, family: Family, delta: Delta) -> None:
    """Add `delta(u, memory)` to every decoder layer's MLP branch, u being the MLP input (spec §7).

    The memory is the `visual_memory` keyword of the LLM call, which transformers hands to every decoder
    layer; a pre-hook on the layer takes it at each call (None when the call has none), and it stays
    there for activation checkpointing's recomputation of that call in backward. Plain families: a
    forward hook on `mlp` returns mlp(u) + delta(u, memory). Families that normalise the MLP output
    before the residual add (Gemma-2/3): a pre-hook on `mlp` captures u, and the term is added to the
    output of the post-MLP norm. The LLM gains no parameters and no modules.
    """
    for layer in language_model.get_submodule(family.layers):
        tap = _LayerTap(delta)
        layer.register_forward_pre_hook(tap.enter, with_kwargs=True)
        mlp = layer.get_submodule(family.mlp)
        if family.post_mlp_norm is None:
            mlp.register_forward_hook(_add_to_output(tap.term, lambda args: args[0]))
        else:
            mlp.register_forward_pre_hook(tap.capture)
            norm = layer.get_submodule(family.post_mlp_norm)
            norm.register_forward_hook(_add_to_output(tap.term, tap.take))


def hook_block_mlps(blocks: Iterable[nn.Module], adapters: Iterable[nn.Module]) -> None:
    """Run each adapter in parallel with its ViT block's MLP: x + MLP(LN₂x) + adapter(LN₂x) (spec §2.2)."""
    for block, adapter in zip(blocks, adapters, strict=True):
        block.mlp.register_forward_hook(_add_to_output(adapter, lambda args: args[0]))


def _add_to_output(delta: Callable[[torch.Tensor], torch.Tensor], query: Callable[[tuple], torch.Tensor]):
    def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        return output + delta(query(args)).to(output.dtype)

    return hook


class _LayerTap:
    """What one decoder layer's hooks share: its latest call's visual memory and, for
    post-MLP-norm families, the MLP input from the pre-hook on `mlp` to the hook on the norm."""

    def __init__(self, delta: Delta) -> None:
        self.delta = delta
        self.memory: VisualMemory | None = None
        self.u: torch.Tensor | None = None

    def term(self, u: torch.Tensor) -> torch.Tensor:
        return self.delta(u, self.memory)

    def enter(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        self.memory = kwargs.get(VISUAL_MEMORY)

    def capture(self, module: nn.Module, args: tuple) -> None:
        self.u = args[0]

    def take(self, args: tuple) -> torch.Tensor:
        u, self.u = self.u, None
        return u
