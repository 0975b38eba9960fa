"""Token merging inside ViT encoder blocks (CLIP, SigLIP): the patched block forward and its state.

`patch_encoder` replaces, on each block instance, `forward` with one that runs attention with ToMe's
proportional bias, merges tokens between the attention and MLP sub-blocks (merge.py) and hands the
token sizes on to the next block (spec turbo.md §3, §10). The tower's weights, module tree and state
dict are untouched, so checkpoints and LoRA on the tower work as before. Blocks that have nothing to
do (no merge yet, none scheduled) run their own transformers forward, which keeps r = 0 bit-exact.
"""

from __future__ import annotations

import types
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError
from .base import Meter
from .merge import budget, match, merge_positions, merge_weighted

# Semantic value a [B, N] of each token, from the block's queries and keys [B, H, N, d_h], the
# proportional bias [B, 1, 1, N] (or None), the sizes [B, N, 1] (or None: all 1) and the softmax scale.
SemanticValue = Callable[..., torch.Tensor]


def cls_attention(
    q: torch.Tensor, k: torch.Tensor, bias: torch.Tensor | None, sizes: torch.Tensor | None, scale: float
) -> torch.Tensor:
    """Turbo's semantic value (§3 step 2): the CLS query's attention row, averaged over heads.

    Computed apart from the fused attention kernel (which returns no probabilities): O(N·D).
    """
    logits = (q[:, :, :1] @ k.transpose(-1, -2)).float() * scale  # [B, H, 1, N]
    if bias is not None:
        logits = logits + bias.float()
    return logits.softmax(dim=-1).mean(dim=1)[:, 0]  # [B, N]


def mean_attention_received(
    q: torch.Tensor, k: torch.Tensor, bias: torch.Tensor | None, sizes: torch.Tensor | None, scale: float
) -> torch.Tensor:
    """Semantic value for towers without CLS (SigLIP): the attention each token receives, averaged over
    heads and over queries weighted by their sizes.

    This is the CLS row's role played by every patch at once: the expected attention a token gets from
    an original patch drawn at random. Like the CLS row it sums to 1 over tokens (mean 1/N, so λ keeps
    its scale), and it is invariant to merging: a token of size 2 receives what two copies did together.
    """
    logits = (q @ k.transpose(-1, -2)).float() * scale  # [B, H, N, N]
    if bias is not None:
        logits = logits + bias.float()
    probs = logits.softmax(dim=-1)
    batch, n = q.shape[0], q.shape[2]
    weights = torch.ones(batch, n, device=q.device) if sizes is None else sizes[..., 0].float()
    weights = (weights / weights.sum(dim=1, keepdim=True)).view(batch, 1, 1, n)  # each query's share
    return (weights @ probs).mean(dim=1)[:, 0]  # [B, 1, 1, N] @ [B, H, N, N] -> [B, N]


SEMANTIC_VALUES: dict[str, SemanticValue | None] = {
    "cls": cls_attention,
    "mean_received": mean_attention_received,
    "none": None,  # a = 0: pure ToMe
}


@dataclass(frozen=True)
class MergeSchedule:
    """One tower forward's per-block plan: scheduled r (0 = no merge) and λ_l (§3 steps 3, 6)."""

    r: tuple[int, ...]
    lam: tuple[float, ...]


@dataclass
class MergeState:
    """What a forward carries from block to block; reset when block 0 starts (§10)."""

    schedule: MergeSchedule | None = None
    sizes: torch.Tensor | None = None  # [B, N, 1] float32; None while nothing has merged (all 1)
    positions: torch.Tensor | None = None  # [B, N, 1] original index of each token's representative
    counts: list[int] = field(default_factory=list)  # tokens entering block 0, then leaving each block


@dataclass
class TowerMerger:
    """The merge settings of one patched tower, shared by its blocks, plus the per-forward state.

    `schedule_for(n)` gives the plan for a forward whose first block sees n tokens. `output_block` is the
    last block whose output the front-end reads (hidden_states[feature_layer]); with `raster_order` its
    output is put back in the original patch order.
    """

    blocks: int
    schedule_for: Callable[[int], MergeSchedule]
    protected: int  # 1 when the tower has a CLS token at index 0
    min_tokens: int
    proportional: bool
    semantic: SemanticValue | None
    output_block: int
    raster_order: bool = False
    meter: Callable[[], Meter | None] = lambda: None
    state: MergeState = field(default_factory=MergeState)

    # -- one block ---------------------------------------------------------------------------------
    def block_forward(
        self, layer: nn.Module, index: int, hidden_states: torch.Tensor, attention_mask=None, **kwargs
    ) -> torch.Tensor:
        """x -> x + Attn(LN₁x) -> merge -> + MLP(LN₂·) on the shorter sequence (§3 steps 1-11)."""
        if index == 0:
            self.state = MergeState(
                self.schedule_for(hidden_states.shape[1]), counts=[hidden_states.shape[1]]
            )
        state = self.state
        r = budget(
            state.schedule.r[index],
            hidden_states.shape[1],
            protected=self.protected,
            min_tokens=self.min_tokens,
        )
        if r == 0 and state.sizes is None:  # nothing merged so far: the block's own forward, bit-exact
            out = type(layer).forward(layer, hidden_states, attention_mask, **kwargs)
        else:
            if attention_mask is not None:
                raise ConfigError(
                    "token merging got an attention mask in the vision tower (padded patches); only "
                    "fixed-resolution CLIP / SigLIP towers are supported"
                )
            out = self._merging_block(layer, index, hidden_states, r)
        state.counts.append(out.shape[1])
        if index == self.blocks - 1:
            self._record()
        return out

    def _merging_block(self, layer: nn.Module, index: int, x: torch.Tensor, r: int) -> torch.Tensor:
        state = self.state
        attn_out, keys, semantic = self._attention(layer.self_attn, layer.layer_norm1(x), need_scores=r > 0)
        x = x + attn_out
        if r > 0:
            x = self._merge(x, keys, semantic, r, state.schedule.lam[index])
        x = x + layer.mlp(layer.layer_norm2(x))
        if index == self.output_block and self.raster_order and state.positions is not None:
            order = state.positions.argsort(dim=1)  # [B, N, 1]
            x = x.gather(1, order.expand(-1, -1, x.shape[-1]))
            state.sizes, state.positions = state.sizes.gather(1, order), state.positions.gather(1, order)
        return x

    def _attention(
        self, attn: nn.Module, h: torch.Tensor, *, need_scores: bool
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """Attention output, and for a merging block the metric and semantic value (§3 steps 1-2)."""
        sizes = self.state.sizes
        out, q, k, bias = size_biased_attention(attn, h, sizes if self.proportional else None)
        if not need_scores:
            return out, None, None
        with torch.no_grad():
            metric = k.mean(dim=1)  # [B, N, d_h]: raw keys (bias included, unscaled) averaged over heads
            semantic = None if self.semantic is None else self.semantic(q, k, bias, sizes, attn.scale)
        return out, metric, semantic

    def _merge(
        self, x: torch.Tensor, metric: torch.Tensor, semantic: torch.Tensor | None, r: int, lam: float
    ) -> torch.Tensor:
        """Match (steps 4-8) and merge by size-weighted average (step 9), in float32."""
        state = self.state
        plan = match(metric, r, semantic=semantic, lam=lam, protect_first=self.protected > 0)
        if state.sizes is None:
            state.sizes = torch.ones(*x.shape[:2], 1, device=x.device)
            state.positions = torch.arange(x.shape[1], device=x.device).expand(x.shape[0], -1)[..., None]
        merged, state.sizes = merge_weighted(x.float(), state.sizes, plan)
        state.positions = merge_positions(state.positions, plan)
        return merged.to(x.dtype)

    def output_positions(self) -> torch.Tensor | None:
        """Original index of each token the last forward output (its representative's), [B, N']; None
        when nothing merged."""
        return None if self.state.positions is None else self.state.positions[..., 0]

    def output_sizes(self) -> torch.Tensor | None:
        """Patches each token the last forward output stands for, [B, N']; None when nothing merged."""
        return None if self.state.sizes is None else self.state.sizes[..., 0]

    def _record(self) -> None:
        meter = self.meter()
        if meter is not None:
            meter.record(Meter.TOWER_TOKENS, list(self.state.counts))


def size_biased_attention(
    attn: nn.Module, h: torch.Tensor, sizes: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """A CLIP / SigLIP attention module run with ToMe's proportional bias (§3 step 1).

    Logits get + log s_j on the key axis (sizes [B, N, 1]; None: no bias), so a token standing for s
    merged patches is attended like s copies of one. Uses the module's own projections (and so any
    LoRA on them). Returns (output [B, N, D], queries and keys [B, H, N, d_h], the bias or None).
    """
    batch, n, _ = h.shape
    shape = (batch, n, attn.num_heads, attn.head_dim)
    q = attn.q_proj(h).view(shape).transpose(1, 2)  # [B, H, N, d_h]
    k = attn.k_proj(h).view(shape).transpose(1, 2)
    v = attn.v_proj(h).view(shape).transpose(1, 2)
    bias = None if sizes is None else sizes.log().to(q.dtype).view(batch, 1, 1, n)  # [B, 1, 1, N]
    dropout = attn.dropout if attn.training else 0.0
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=dropout, scale=attn.scale)
    return attn.out_proj(out.transpose(1, 2).reshape(batch, n, -1)), q, k, bias


def patch_encoder(layers: nn.ModuleList, merger: TowerMerger) -> None:
    """Route every encoder block's forward through `merger` (instance attribute; the class is untouched)."""
    for index, layer in enumerate(layers):
        if "forward" in vars(layer):
            raise ConfigError(
                "the vision tower's encoder blocks are already patched (e.g. by another token-merging "
                "reducer); use one of turbo / tome at a time"
            )
        layer.forward = types.MethodType(_block_forward(merger, index), layer)


def _block_forward(merger: TowerMerger, index: int):
    def forward(layer: nn.Module, hidden_states: torch.Tensor, attention_mask=None, **kwargs) -> torch.Tensor:
        return merger.block_forward(layer, index, hidden_states, attention_mask, **kwargs)

    return forward
