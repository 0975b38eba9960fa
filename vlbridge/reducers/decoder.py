"""Decoder-layer plumbing of the in-LLM reducers (p-MoD, FastV): run a layer on a per-sample subset of
the tokens at their original positions, and keep each layer's shorter KV cache usable for decoding.

`LLMReducer.attach` puts a forward pre-hook on the decoder stack (the module holding `layers`) that
captures, once per LLM call, what the layers need (`Step`: which prompt positions are visual, which
are padding, how long layer 0's cache was) with one host sync. Reduced layers get their `forward`
replaced on the instance by a `ReducedForward`; the LLM's modules, parameters and state-dict keys stay
those of the transformers model, so PEFT wrapping, LoRA merging and `save_pretrained` are unaffected.

A reduced layer runs on `Pack`ed tokens: the kept tokens of each sample in their original order,
right-padded to the longest sample, with gathered position ids and RoPE tables (RoPE sees the true
positions, gaps included) and a fresh mask (`attention_mask`). Its cache therefore holds fewer entries
than layer 0's, some of them padding; `Slots` records per layer which entries are real, so decode steps
(new text tokens, always run densely) attend to exactly the layer's kept tokens. Layer 0 is never
reduced: transformers derives new positions from its cache length.
"""

from __future__ import annotations

import functools
import weakref
from abc import abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from transformers import DynamicCache

from .. import llm_calls
from ..errors import ConfigError, DataError
from ..families import Family, family_of
from ..llm_calls import cache_in, layer_kinds
from .base import Reducer

if TYPE_CHECKING:
    from ..modeling import VLModel

SUPPORTED_ATTENTION = ("eager", "sdpa")
LayerForward = Callable[..., Any]


# -- what one LLM call runs on ----------------------------------------------------------------------
@dataclass
class Prompt:
    """The visual/other split of a prompt call, with per-sample counts on the host and the device."""

    visual: torch.Tensor  # [B, S] bool: visual tokens (never padding)
    other: torch.Tensor  # [B, S] bool: real non-visual tokens (text, image markers)
    n_visual: list[int]  # per sample, on the host (shapes) ...
    n_other: list[int]
    n_visual_t: torch.Tensor  # ... and on the device (per-row budgets without a host round trip) [B] long
    n_other_t: torch.Tensor


@dataclass
class Step:
    """One LLM call as the decoder layers see it."""

    length: int  # tokens in this call (S for a prompt, 1 per decode step)
    valid: torch.Tensor | None  # [B, length] bool real tokens of this call; None: no padding
    mask: torch.Tensor | None  # [B, past + length] bool: the LLM's padding mask (None: no padding)
    past: int  # entries in layer 0's cache before this call
    prompt: Prompt | None  # set when the call is a prompt holding visual tokens


# -- packing -----------------------------------------------------------------------------------------
@dataclass
class Pack:
    """Kept tokens of each row, in order, right-padded to the longest row: slot j of row b holds token
    `index[b, j]`; its output goes back to `target[b, j]` (the scratch column S for padding slots)."""

    index: torch.Tensor  # [B, n] long
    target: torch.Tensor  # [B, n] long
    valid: torch.Tensor | None  # [B, n] bool; None: every slot is a real token
    counts: list[int]  # real slots per row

    @classmethod
    def from_keep(cls, keep: torch.Tensor, counts: list[int], counts_t: torch.Tensor) -> Pack:
        """`keep` [B, S] bool with `counts[b]` = keep[b].sum() known on the host and on the device
        (`counts_t` [B]): no sync here."""
        batch, seq = keep.shape
        n = max(counts)
        slot = keep.long().cumsum(1) - 1  # [B, S] slot of each kept token
        slot = torch.where(keep, slot, n)  # dropped tokens all go to a scratch slot n
        positions = torch.arange(seq, device=keep.device).expand(batch, seq)
        index = keep.new_zeros((batch, n + 1), dtype=torch.long).scatter_(1, slot, positions)[:, :n]
        if min(counts) == n:
            return cls(index, index, None, counts)
        valid = torch.arange(n, device=keep.device) < counts_t[:, None]
        return cls(index, torch.where(valid, index, seq), valid, counts)

    def gather(self, values: torch.Tensor) -> torch.Tensor:
        """[B or 1, S, ...] -> [B, n, ...] (the sequence axis is dim 1)."""
        batch, n = self.index.shape
        values = values.expand(batch, *values.shape[1:])
        index = self.index.view(batch, n, *([1] * (values.dim() - 2))).expand(batch, n, *values.shape[2:])
        return values.gather(1, index)

    def scatter(self, base: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
        """`base` [B, S, D] with the real slots of `slots` [B, n, D] written back at their tokens."""
        batch, seq, dim = base.shape
        scratch = torch.cat([base, base.new_zeros(batch, 1, dim)], dim=1)  # [B, S+1, D]
        target = self.target[..., None].expand(-1, -1, dim)
        return scratch.scatter(1, target, slots.to(base.dtype))[:, :seq]


def packed_kwargs(pack: Pack, kwargs: dict[str, Any], mask: torch.Tensor | None) -> dict[str, Any]:
    """A decoder layer's keyword arguments for the packed tokens: positions and RoPE tables gathered
    (original positions, spec pmod.md §3.6), the model-level mask replaced by the layer's own."""
    kwargs = {**kwargs, llm_calls.MASK: mask}
    if kwargs.get(llm_calls.POSITION_IDS) is not None:
        kwargs[llm_calls.POSITION_IDS] = pack.gather(kwargs[llm_calls.POSITION_IDS])
    if kwargs.get(llm_calls.ROPE) is not None:
        kwargs[llm_calls.ROPE] = tuple(pack.gather(t) for t in kwargs[llm_calls.ROPE])
    kwargs.pop("cache_position", None)  # only static caches read it, and those are refused
    return kwargs


# -- masks and per-layer cache bookkeeping ----------------------------------------------------------
def attention_mask(
    valid: torch.Tensor | None, n_query: int, n_key: int, implementation: str, dtype: torch.dtype, device
) -> torch.Tensor | None:
    """The mask of `n_query` new tokens over a layer's `n_key` cache entries (the new ones last).

    Causal in cache order (bottom-right aligned) and blind to entries `valid` marks False; every query
    sees at least itself, so padding slots never produce NaNs. In the format `implementation` takes:
    bool (sdpa, True = attend), additive float (eager); None where the backend's own causal handling
    is exact (no padding among the keys).
    """
    if valid is None and (n_query == 1 or (n_query == n_key and implementation == "sdpa")):
        return None
    query = torch.arange(n_query, device=device)[:, None] + (n_key - n_query)  # [q, 1] cache slot
    key = torch.arange(n_key, device=device)[None, :]
    allowed = (key <= query)[None, None]  # [1, 1, q, K]
    if valid is not None:
        allowed = (allowed & valid[:, None, None, :]) | (key == query)[None, None]  # [B, 1, q, K]
    if implementation == "eager":
        return torch.zeros(allowed.shape, dtype=dtype, device=device).masked_fill(
            ~allowed, torch.finfo(dtype).min
        )
    return allowed


@dataclass
class Slots:
    """Which entries of one reduced layer's KV cache are real tokens (padding slots are not)."""

    length: int
    valid: torch.Tensor | None  # [B, length] bool; None: all real

    def extend(self, valid: torch.Tensor | None, length: int) -> Slots:
        if self.valid is None and valid is None:
            return Slots(self.length + length, None)
        batch = (self.valid if self.valid is not None else valid).shape[0]
        old = self.valid if self.valid is not None else _all(batch, self.length, valid.device)
        new = valid if valid is not None else _all(batch, length, old.device)
        return Slots(self.length + length, torch.cat([old, new], dim=1))


def _all(batch: int, length: int, device) -> torch.Tensor:
    return torch.ones(batch, length, dtype=torch.bool, device=device)


# -- the layer wrapper ------------------------------------------------------------------------------
class ReducedForward:
    """The instance `forward` of a reduced decoder layer: hands every call to its reducer.

    A plain object (not a module), so the layer's state dict is unchanged; deep copies of the model copy
    it along with the layer and reducer it points to. Under gradient checkpointing the whole reduced call
    (routing, packing, layer, scatter) is checkpointed, so recomputation repeats the routing exactly;
    the layer's own forward is called without transformers' checkpointing wrapper.
    """

    def __init__(self, reducer: LLMReducer, index: int, layer: nn.Module) -> None:
        self.reducer, self.index, self.module = reducer, index, layer
        self.inner = llm_calls.plain_forward(layer)

    def __call__(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        if args:
            raise TypeError(
                f"decoder layer {self.index} got positional arguments after hidden_states; vlbridge's "
                "in-LLM reducers expect transformers' keyword calling convention"
            )
        checkpoint = llm_calls.checkpointing(self.module)
        if checkpoint is not None:
            kwargs = llm_calls.without_cache(kwargs)
            return checkpoint(
                functools.partial(self.reducer.layer_forward, self.index, self.inner, kwargs=kwargs),
                hidden_states,
            )
        return self.reducer.layer_forward(self.index, self.inner, hidden_states, kwargs=kwargs)


class LLMReducer(Reducer):
    """Base of reducers acting inside the LLM's decoder layers: attach plumbing, per-call `Step`,
    per-layer `Slots`, and the dense path for calls a subclass does not reduce."""

    aligned_cache = False  # reduced layers cache fewer entries than layer 0
    reads_visual_mask = True

    def attach(self, model: VLModel) -> None:
        llm = model.language_model
        config = llm.config.get_text_config()
        self.family: Family = family_of(config.model_type)
        self.kinds = layer_kinds(config)
        # Plain references (not submodules of the reducer, whose state dict holds only its own weights).
        object.__setattr__(self, "_vl", model)
        object.__setattr__(self, "_llm_config", config)
        object.__setattr__(self, "_layers", list(llm.get_submodule(self.family.layers)))
        implementation = llm_calls.attention_implementation(config)
        if implementation not in SUPPORTED_ATTENTION:
            raise ConfigError(
                f"reducer {self.config.type!r} builds its own per-layer attention masks for "
                f"{' / '.join(SUPPORTED_ATTENTION)} attention; the LLM uses {implementation!r}: set "
                "model.llm.attn_implementation to sdpa (or eager)"
            )
        stack_path = self.family.layers.rpartition(".")[0]
        stack = llm.get_submodule(stack_path) if stack_path else llm
        stack.register_forward_pre_hook(self._begin_call, with_kwargs=True)
        self.step: Step | None = None
        self._slots: dict[int, Slots] = {}
        self._cache_ref: weakref.ReferenceType | None = None
        for index in self.reduced_layers():
            if index == 0:
                raise ConfigError(
                    f"reducer {self.config.type!r} would reduce decoder layer 0, which must stay dense "
                    "(transformers counts positions from layer 0's cache); start the schedule at layer 1"
                )
            layer = self._layers[index]
            if getattr(layer, "_vlbridge_reduced_by", None):
                raise ConfigError(
                    f"decoder layer {index} is already reduced by {layer._vlbridge_reduced_by!r}; "
                    f"use one in-LLM reducer at a time (found a second: {self.config.type!r})"
                )
            layer.forward = ReducedForward(self, index, layer)
            layer._vlbridge_reduced_by = self.config.type

    @abstractmethod
    def reduced_layers(self) -> list[int]:
        """Indices of the decoder layers this reducer wraps."""

    @abstractmethod
    def layer_forward(
        self, layer: int, original: LayerForward, hidden_states: torch.Tensor, *, kwargs: dict[str, Any]
    ) -> Any:
        """Run decoder layer `layer` (its plain forward is `original`) on `hidden_states` [B, T, D]."""

    # -- per call ------------------------------------------------------------------------------------
    def _begin_call(self, module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        """Decoder-stack pre-hook: record this call's `Step` (one host sync per call, none per layer)."""
        embeds = kwargs.get("inputs_embeds")
        ids = kwargs.get("input_ids", args[0] if args else None)
        tokens = embeds if embeds is not None else ids
        cache = cache_in(kwargs)
        check_cache(cache, self.config.type)
        mask = kwargs.get(llm_calls.MASK)
        if mask is not None and (not torch.is_tensor(mask) or mask.dim() != 2):
            raise ConfigError(
                f"reducer {self.config.type!r} needs the LLM's 2-D padding mask [B, T]; it got "
                f"{type(mask).__name__} {getattr(mask, 'shape', '')}: pass a 2-D attention_mask"
            )
        length = tokens.shape[1]
        past = cache.get_seq_length() if cache is not None else 0
        valid = None
        if mask is not None:
            mask = mask.bool()
            valid = mask[:, -length:]
        visual = prompt_visual_mask(kwargs.get(llm_calls.VISUAL_MASK), tokens)
        prompt = None
        if visual is not None:
            real = valid if valid is not None else torch.ones_like(visual)
            other = real & ~visual
            counts_t = torch.stack([visual.sum(1), other.sum(1)])  # [2, B]
            counts = counts_t.tolist()
            prompt = Prompt(visual, other, counts[0], counts[1], counts_t[0], counts_t[1])
            all_valid = sum(counts[0]) + sum(counts[1]) == visual.numel()
        else:
            all_valid = valid is None or bool(valid.all())
        self.step = Step(length, None if all_valid else valid, mask, past, prompt)

    # -- per-layer cache bookkeeping (the cache is the one the layer call gets: transformers creates
    # it inside the decoder stack when the caller passes none) ---------------------------------------
    def slots(self, layer: int, cache: DynamicCache | None) -> Slots | None:
        """What `layer`'s cache holds before this call (None: no cache, or dense like layer 0 so far)."""
        step = self.step
        if cache is None:
            return None
        if self._cache_ref is None or self._cache_ref() is not cache:
            self._slots, self._cache_ref = {}, weakref.ref(cache)
        held = cache.get_seq_length(layer)
        slots = self._slots.get(layer)
        if slots is not None and slots.length == held:
            return slots
        if held == 0:  # a fresh cache
            self._slots.pop(layer, None)
            return None
        if slots is None and held == step.past:
            return None
        raise DataError(
            f"decoder layer {layer}'s KV cache holds {held} entries but reducer {self.config.type!r} "
            f"recorded {slots.length if slots else step.past}: the cache was changed outside the model's "
            "forward (rows spliced or padded); caches of reduced layers cannot be merged that way"
        )

    def dense_slots(self, layer: int) -> Slots:
        """Slots of a layer whose cache is still aligned with layer 0 (every past token, padding marked)."""
        step = self.step
        past = step.mask[:, : step.past] if step.mask is not None else None
        return Slots(step.past, None if past is None or bool(past.all()) else past)

    def remember(self, layer: int, slots: Slots, cache: DynamicCache | None) -> None:
        if cache is not None:
            self._slots[layer] = slots

    def run_dense(
        self, layer: int, original: LayerForward, hidden_states: torch.Tensor, kwargs: dict[str, Any]
    ) -> Any:
        """A call the reducer leaves alone (decode steps, text-only prompts): the plain layer, with this
        layer's own mask when its cache is shorter than layer 0's."""
        cache = cache_in(kwargs)
        past = self.slots(layer, cache)
        if past is None:
            return original(hidden_states, **kwargs)
        step = self.step
        slots = past.extend(step.valid, step.length)
        self.remember(layer, slots, cache)
        mask = self.mask_for(slots, step.length, hidden_states)
        return original(hidden_states, **{**kwargs, llm_calls.MASK: mask})

    def mask_for(self, slots: Slots, n_query: int, like: torch.Tensor) -> torch.Tensor | None:
        implementation = llm_calls.attention_implementation(self._llm_config)
        return attention_mask(slots.valid, n_query, slots.length, implementation, like.dtype, like.device)


def prompt_visual_mask(mask: torch.Tensor | None, tokens: torch.Tensor) -> torch.Tensor | None:
    """Which positions of the sequence the LLM runs on are visual [B, T] (bool), from the call's mask.

    None when the call is not the prompt the mask was made for: decode steps (new text tokens only), and
    prompts without an image. Beam search and `num_return_sequences` repeat each prompt consecutively, so
    the prompt's mask is repeat-interleaved to the LLM's batch.
    """
    if mask is None or tokens.shape[1] != mask.shape[1] or not mask.any():
        return None
    batch = tokens.shape[0]
    if batch != mask.shape[0]:
        mask = mask.repeat_interleave(batch // mask.shape[0], dim=0)
    return mask


def check_cache(cache: Any, reducer: str) -> None:
    """Reduced layers need a cache whose layers grow independently by concatenation."""
    if cache is None:
        return
    if not isinstance(cache, DynamicCache) or getattr(cache, "is_compileable", False):
        raise ConfigError(
            f"reducer {reducer!r} keeps a different number of tokens in each layer's KV cache, which "
            f"needs transformers' DynamicCache; got {type(cache).__name__}: do not set "
            "cache_implementation (static / offloaded / quantized caches are not supported)"
        )
