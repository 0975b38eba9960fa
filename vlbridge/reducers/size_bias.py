"""Proportional attention in the LLM: a merged visual token is attended as the patches it stands for.

ToMe's proportional attention (+ log s on a token's key logits) makes a token of size s weigh like s
copies of one inside the tower. A tower reducer with `llm_proportional` carries the same bias into the
LLM, so the attention mass an image gets, and how it splits between background and objects, stays what
the model saw on the full image (without it, merging shrinks the background's share and the model's
counts drift). transformers has no per-key bias argument, so the LLM gets an additive 4-D mask: causal,
padding and log s on the visual keys, which sdpa and eager attention take as is.

`install` puts a pre-hook on the decoder stack that builds that mask for every call while
`VLModel.key_bias_for` holds a bias (inside `VLModel.forward` / `generate`); decode steps see the prompt's
keys with their bias and new tokens with 0. The serving engine, which calls the LLM itself, builds the
same mask with `biased_mask`.
"""

from __future__ import annotations

import weakref
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError
from ..families import family_of
from .decoder import SUPPORTED_ATTENTION, LLMReducer, attention_mask, layer_kinds

if TYPE_CHECKING:
    from ..modeling import VLModel


def biased_mask(mask: torch.Tensor, bias: torch.Tensor, n_query: int, dtype: torch.dtype) -> torch.Tensor:
    """The additive mask [B, 1, q, K] of `n_query` new tokens over K keys: causal, blind to the padding of
    `mask` [B, K] (1 = real), plus `bias` [B or a divisor of B, ≤ K] on the first keys (0 after them)."""
    batch, n_key = mask.shape
    if bias.shape[0] != batch:  # beam search / several samples per prompt repeat each prompt in place
        bias = bias.repeat_interleave(batch // bias.shape[0], dim=0)
    bias = F.pad(bias, (0, n_key - bias.shape[1])).to(device=mask.device, dtype=dtype)
    additive = attention_mask(mask.bool(), n_query, n_key, "eager", dtype, mask.device)
    return additive + bias[:, None, None, :]


def install(model: VLModel, reducer: str) -> None:
    """Check that the LLM can take the bias, then hook its decoder stack."""
    llm = model.language_model
    config = llm.config.get_text_config()
    implementation = config._attn_implementation
    problem = None
    if implementation not in SUPPORTED_ATTENTION:
        problem = (
            f"the LLM uses {implementation!r} attention, which takes no additive bias; set "
            "model.llm.attn_implementation to sdpa (or eager)"
        )
    elif set(layer_kinds(config)) != {"full_attention"}:
        problem = "the LLM has sliding-window layers, whose own masks the bias would replace"
    elif any(isinstance(other, LLMReducer) for other in model.reducers):
        problem = "an in-LLM reducer (pmod, fastv) builds its own per-layer masks"
    if problem is not None:
        raise ConfigError(f"{reducer}.llm_proportional=true cannot be used: {problem}; or set it to false")
    stack_path = family_of(config.model_type).layers.rpartition(".")[0]
    stack = llm.get_submodule(stack_path) if stack_path else llm
    stack.register_forward_pre_hook(_Hook(model), with_kwargs=True)


class _Hook:
    """Decoder-stack pre-hook: swap the 2-D padding mask for the biased 4-D mask while a bias is set.

    It keeps no state between calls, so a serving engine that calls the LLM itself may batch freely.
    """

    batch_free = True

    def __init__(self, model: VLModel) -> None:
        self.model = weakref.ref(model)

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict] | None:
        model = self.model()
        bias = None if model is None else model.key_bias_for
        if bias is None:
            return None
        embeds = kwargs.get("inputs_embeds")
        tokens = embeds if embeds is not None else kwargs.get("input_ids", args[0] if args else None)
        cache = kwargs.get("past_key_values")
        batch, length = tokens.shape[:2]
        n_key = length + (cache.get_seq_length() if cache is not None else 0)
        mask = kwargs.get("attention_mask")
        if mask is None:
            mask = torch.ones(batch, n_key, dtype=torch.long, device=tokens.device)
        elif mask.dim() != 2:
            return None  # the caller built its own mask
        dtype = getattr(module, "dtype", torch.float32)
        return args, {**kwargs, "attention_mask": biased_mask(mask, bias, length, dtype)}
