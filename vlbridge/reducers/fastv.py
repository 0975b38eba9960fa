"""FastV: drop the least-attended image tokens once, after layer K (training-free baseline).

Chen et al., "An Image is Worth 1/2 Tokens After Layer 2", ECCV 2024 (arXiv 2403.06764); official code
`src/FastV/llava-hf/.../modeling_llama.py::fastv_forward`. Spec: reduction_baselines.md §A. At layer
K−1 the attention row of the last prompt token, averaged over heads, scores every image token; layers
K..L−1 then run on the non-image tokens plus the top round(V·(1−R)) image tokens, in their original
order and at their original positions (RoPE gaps kept). Variant (iii), in-place drop with a KV cache:
the choice is made once at prefill, layers ≥ K cache only the kept tokens, decode steps attend to them.
Batches with padding or different image counts get per-sample index sets (not in the official code).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from pydantic import Field
from torch import nn

from .. import llm_calls
from ..config import ReducerConfig
from ..errors import ConfigError, DataError
from ..llm_calls import cache_in
from ..registry import REDUCERS
from .decoder import LayerForward, LLMReducer, Pack, Slots, packed_kwargs
from .pmod import select_top


class FastVConfig(ReducerConfig):
    """Paper defaults: K = 2, R = 50%."""

    type: str = "fastv"
    k: int = Field(default=2, ge=1)  # image tokens are dropped at the input of layer K (scored at K−1)
    r: float = Field(default=0.5, ge=0, lt=1)  # fraction of the image tokens dropped


def keep_count(n_visual: torch.Tensor, r: float) -> torch.Tensor:
    """round(V·(1−R)) per sample [B], half to even in float64 like the official code's Python `round`;
    the same arithmetic on the host and the device."""
    return torch.round(n_visual.double() * (1 - r)).long()


# -- the score: attention of the last prompt token at layer K−1 -------------------------------------
def _heads(states: torch.Tensor, head_dim: int) -> torch.Tensor:
    """[B, T, H·d] -> [B, H, T, d]."""
    return states.view(*states.shape[:2], -1, head_dim).transpose(1, 2)


def _rope(states: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE on the first cos.shape[-1] channels (all of them, or Phi-3's partial rotary)."""
    cos, sin = cos[:, None], sin[:, None]  # [B, 1, T, r]
    width = cos.shape[-1]
    rot, rest = states[..., :width], states[..., width:]
    half = rot.shape[-1] // 2
    rotated = torch.cat([-rot[..., half:], rot[..., :half]], dim=-1)
    return torch.cat([rot * cos + rotated * sin, rest], dim=-1)


def project(attn: nn.Module, hidden: torch.Tensor, which: str) -> torch.Tensor:
    """Queries ("q") or keys ("k") of a transformers attention module [B, H, T, d], before RoPE: separate
    or fused (Phi-3 `qkv_proj`) projections, with the per-head norm where the family has one (Qwen3)."""
    config, head_dim = attn.config, attn.head_dim
    if hasattr(attn, f"{which}_proj"):
        states = getattr(attn, f"{which}_proj")(hidden)
    else:  # fused [q | k | v]
        queries, keys = config.num_attention_heads * head_dim, config.num_key_value_heads * head_dim
        qkv = attn.qkv_proj(hidden)
        states = qkv[..., :queries] if which == "q" else qkv[..., queries : queries + keys]
    states = states.view(*hidden.shape[:2], -1, head_dim)
    norm = getattr(attn, f"{which}_norm", None)
    return (norm(states) if norm is not None else states).transpose(1, 2)


def last_query_attention(
    attn: nn.Module, hidden: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], valid: torch.Tensor | None
) -> torch.Tensor:
    """σ [B, S]: softmax(q_last·Kᵀ·scale) of the last position, averaged over heads (spec A step 2).

    Computed from the attention module's own projections, so it works under SDPA/flash kernels that
    return no probabilities; `valid` [B, S] hides padding keys.
    """
    cos, sin = rope
    query = _rope(project(attn, hidden[:, -1:], "q"), cos[:, -1:], sin[:, -1:])  # [B, H, 1, d]
    keys = _rope(project(attn, hidden, "k"), cos, sin)  # [B, H_kv, S, d]
    keys = keys.repeat_interleave(attn.num_key_value_groups, dim=1)
    logits = (query.float() @ keys.float().transpose(-1, -2)) * attn.scaling  # [B, H, 1, S]
    softcap = getattr(attn, "attn_logit_softcapping", None)
    if softcap is not None:
        logits = torch.tanh(logits / softcap) * softcap
    if valid is not None:
        logits = logits.masked_fill(~valid[:, None, None, :], float("-inf"))
    return logits.softmax(-1).mean(1)[:, 0]


# -- one LLM call through layers K..L−1 --------------------------------------------------------------
@dataclass
class GroupCall:
    """What layers K..L−1 share on one call: their cache record before and after, and the arguments
    that replace the model-level ones (mask; on a pruned prompt also positions and RoPE tables)."""

    before: int  # entries each of these layers' caches held before the call
    slots: Slots
    overrides: dict[str, Any]
    pack: Pack | None = None  # set on a pruned prompt
    x_in: torch.Tensor | None = None  # layer K's input: dropped tokens carry it to the output


@REDUCERS.register("fastv", config=FastVConfig)
class FastV(LLMReducer):
    config: FastVConfig

    def __init__(self, config: FastVConfig) -> None:
        super().__init__(config)
        self.depth = 0
        self._scores: torch.Tensor | None = None
        self._call: GroupCall | None = None

    def reduced_layers(self) -> list[int]:
        return list(range(self.config.k, self.depth))

    def attach(self, model) -> None:
        config = model.language_model.config.get_text_config()
        self.depth, k = config.num_hidden_layers, self.config.k
        if k >= self.depth:
            raise ConfigError(f"fastv k={k} must be below the LLM's {self.depth} decoder layers")
        super().attach(model)
        windowed = [i for i, kind in enumerate(self.kinds) if kind != "full_attention" and i >= k - 1]
        if windowed:
            raise ConfigError(
                f"fastv prunes tokens under layers {windowed}, which use {self.kinds[windowed[0]]!r} "
                "attention (windows count cache slots, not positions); use a model without sliding "
                "windows there (e.g. llm.config.sliding_window: null when prompts fit the window)"
            )
        scorer = self._layers[k - 1]
        if not hasattr(scorer, "self_attn"):
            raise ConfigError(f"fastv scores at decoder layer {k - 1}, which has no `self_attn` module")
        scorer.self_attn.register_forward_pre_hook(self._score, with_kwargs=True)

    def _score(self, attn: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        """Pre-hook on layer K−1's attention: σ of this prompt call from its normalised input."""
        hidden = kwargs.get("hidden_states", args[0] if args else None)
        prompt = self.step.prompt if self.step is not None else None
        self._scores = None
        if prompt is not None and hidden is not None and hidden.shape[:2] == prompt.visual.shape:
            valid = self.step.valid
            self._scores = last_query_attention(attn, hidden, kwargs[llm_calls.ROPE], valid)

    def layer_forward(
        self, layer: int, original: LayerForward, hidden_states: torch.Tensor, *, kwargs: dict[str, Any]
    ) -> Any:
        # `_scores` and `_call` live until the next call replaces them, so that gradient checkpointing's
        # recomputation (layers L−1..K, in backward) finds the forward's choice.
        if layer == self.config.k:
            self._call = self._begin(hidden_states, kwargs)
        call = self._call
        if call is None:
            return original(hidden_states, **kwargs)
        cache = cache_in(kwargs)
        self._check(layer, call, cache)
        if call.pack is not None and layer == self.config.k:
            hidden_states = call.pack.gather(hidden_states)  # [B, S', D]
        out = original(hidden_states, **{**kwargs, **call.overrides})
        self.remember(layer, call.slots, cache)
        if layer == self.depth - 1 and call.pack is not None:
            out = call.pack.scatter(
                call.x_in, out
            )  # full length again: dropped tokens keep their layer-K input
        return out

    def _begin(self, x: torch.Tensor, kwargs: dict[str, Any]) -> GroupCall | None:
        """At layer K: prune a prompt, or prepare the mask of a decode step over the shorter caches."""
        step, prior = self.step, self.slots(self.config.k, cache_in(kwargs))
        before = prior.length if prior is not None else step.past
        scores, prompt = self._scores, step.prompt
        if prompt is not None and scores is not None and prompt.visual.shape == x.shape[:2]:
            prior = prior or (self.dense_slots(self.config.k) if step.past else Slots(0, None))
            kept_t = keep_count(prompt.n_visual_t, self.config.r)
            kept = keep_count(torch.tensor(prompt.n_visual), self.config.r).tolist()
            keep = select_top(scores, prompt.visual, kept_t, max(kept)) | prompt.other  # lowest σ dropped
            counts = [text + k for text, k in zip(prompt.n_other, kept, strict=True)]
            pack = Pack.from_keep(keep, counts, prompt.n_other_t + kept_t)
            slots = prior.extend(pack.valid, pack.index.shape[1])
            overrides = packed_kwargs(pack, kwargs, self.mask_for(slots, pack.index.shape[1], x))
            self._record(kept, counts, keep)
            return GroupCall(before, slots, overrides, pack, x)
        if prior is None:
            return None
        slots = prior.extend(step.valid, step.length)
        return GroupCall(before, slots, {"attention_mask": self.mask_for(slots, step.length, x)})

    def _check(self, layer: int, call: GroupCall, cache) -> None:
        if cache is not None and layer != self.config.k and cache.get_seq_length(layer) != call.before:
            raise DataError(
                f"decoder layer {layer}'s KV cache holds {cache.get_seq_length(layer)} entries, layer "
                f"{self.config.k}'s {call.before}: fastv needs layers {self.config.k}..{self.depth - 1} to "
                "cache the same tokens (was the cache changed outside the model's forward?)"
            )

    def _record(self, kept: list[int], counts: list[int], keep: torch.Tensor) -> None:
        meter = self._vl.meter
        if meter is not None:
            for layer in self.reduced_layers():
                meter.record_layer(layer, kept, counts)
            meter.record("fastv.keep", (self.config.k, keep))
