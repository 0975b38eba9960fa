"""The transformers calling convention vlbridge relies on, read and written in this one module.

In-layer plug-ins (p-MoD, FastV) see the keyword arguments transformers passes to a decoder stack and
its decoder layers, and the serving engine and benchmarks call the LLM with a KV cache themselves.
Those names move between releases (5.24 renamed `past_key_values` to `cache`), so every read and
write of them goes through here, and tests/test_llm_calls.py checks each one against the installed
transformers, naming the call that changed, before any feature test runs.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn
from transformers.cache_utils import Cache, get_layer_types_and_kwargs

# The keyword a KV cache travels under, newest first (transformers < 5.24: past_key_values).
CACHE_NAMES = ("cache", "past_key_values")
# What a decoder layer receives beside its hidden states; p-MoD and FastV rewrite these for packed tokens.
MASK = "attention_mask"
POSITION_IDS = "position_ids"
ROPE = "position_embeddings"  # (cos, sin), computed once per call by the decoder stack
# vlbridge's own keywords of an LLM call (`modeling.LLMInputs`): transformers hands a call's extra keywords
# down to every decoder layer and attention function. The size bias (reducers/size_bias.py) adds KEY_BIAS
# to the keys' logits; in-LLM reducers (p-MoD, FastV) read which tokens are visual from VISUAL_MASK.
KEY_BIAS = "key_bias"
VISUAL_MASK = "visual_mask"
# A deep-fusion front-end's per-prompt state (ADEM-VL's visual memory), read by its hooks in every layer.
VISUAL_MEMORY = "visual_memory"


class ContractError(RuntimeError):
    """The installed transformers no longer calls a model the way vlbridge expects."""


def cache_in(kwargs: Mapping[str, Any]) -> Cache | None:
    """The KV cache a forward call received, under whichever name this transformers passes it."""
    for name in CACHE_NAMES:
        if kwargs.get(name) is not None:
            return kwargs[name]
    return None


def without_cache(kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """`kwargs` with caching off (a checkpointed layer must not write its cache twice)."""
    return {**kwargs, "use_cache": False, **{name: None for name in CACHE_NAMES if name in kwargs}}


def _unwrapped(model: nn.Module) -> nn.Module:
    """The causal LM itself, beneath a PEFT wrapper."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def cache_name(model: nn.Module) -> str:
    """The keyword under which `model`'s forward (a causal LM, PEFT-wrapped or not) takes the cache."""
    return _cache_parameter(type(_unwrapped(model)), CACHE_NAMES)


@functools.cache
def _cache_parameter(model_class: type, names: tuple[str, ...]) -> str:
    parameters = inspect.signature(model_class.forward).parameters
    for name in names:
        if name in parameters:
            return name
    raise ContractError(
        f"{model_class.__name__}.forward takes the KV cache under none of {names}; its parameters are "
        f"{list(parameters)}: add the new name to vlbridge/llm_calls.py CACHE_NAMES"
    )


def with_cache(model: nn.Module, cache: Cache | None, **kwargs: Any) -> dict[str, Any]:
    """Keyword arguments of a call of `model` that passes `cache`."""
    return {**kwargs, cache_name(model): cache}


def key_bias_kwargs(bias) -> dict[str, Any]:
    """The `key_bias` keyword of an LLM call (none when `bias` is None)."""
    return {} if bias is None else {KEY_BIAS: bias}


@contextmanager
def every_call(model: nn.Module, **kwargs: Any) -> Iterator[None]:
    """Add `kwargs` to every forward call of `model` inside the block. `generate` refuses model keywords it
    does not know (`key_bias`), yet hands on whatever its forward calls receive; a torch pre-hook on the
    causal LM (beneath a PEFT wrapper) adds them there."""
    if not kwargs:
        yield
        return
    handle = _unwrapped(model).register_forward_pre_hook(
        lambda _, args, given: (args, {**given, **kwargs}), with_kwargs=True, prepend=True
    )
    try:
        yield
    finally:
        handle.remove()


def returned_cache(output: Any) -> Cache | None:
    """The cache a forward returned (`output.cache` from 5.24, `output.past_key_values` before)."""
    for name in CACHE_NAMES:
        cache = getattr(output, name, None)
        if cache is not None:
            return cache
    return None


def attention_implementation(config) -> str | None:
    """The attention backend a (text) config runs: 'sdpa', 'eager', 'flash_attention_2', a registered name."""
    return config._attn_implementation


def layer_kinds(config) -> list[str]:
    """Attention kind of every decoder layer ('full_attention', 'sliding_attention', ...), as the
    transformers cache derives it."""
    return list(get_layer_types_and_kwargs(config)[0])


# -- decoder layers under activation checkpointing --------------------------------------------------------
def plain_forward(layer: nn.Module) -> Callable[..., Any]:
    """`layer`'s own forward, bound, without the checkpointing wrapper transformers puts on layer classes."""
    forward = type(layer).forward
    return functools.partial(getattr(forward, "__wrapped__", forward), layer)


def checkpointing(layer: nn.Module) -> Callable[..., Any] | None:
    """The checkpoint function `activation_checkpointing_enable` gave `layer`, when this call would
    recompute it in backward (checkpointing on, training, gradients enabled); else None."""
    if getattr(layer, "gradient_checkpointing", False) and layer.training and torch.is_grad_enabled():
        return layer._gradient_checkpointing_func
    return None
