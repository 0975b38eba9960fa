"""Proportional attention in the LLM: a merged visual token is attended as the patches it stands for.

ToMe's proportional attention (+ log s on a token's key logits) makes a token of size s weigh like s
copies of one inside the tower. A tower reducer with `llm_proportional` carries the same bias into the
LLM, so the attention mass an image gets, and how it splits between background and objects, stays what
the model saw on the full image (without it, merging shrinks the background's share and the model's
counts drift).

transformers has no per-key bias argument, but it has a public registry of attention functions, and it
hands every keyword argument of a model call down to them. `install` switches the LLM to `ATTENTION`:
SDPA on the mask transformers built, plus the call's `key_bias` keyword [B, ≤K] (log s on the visual
keys, 0 on text) on the first keys. Keys past the bias (decode steps' new tokens) get 0; a call
without `key_bias` is plain SDPA. Whoever calls the LLM passes the bias (`VLModel.forward` and
`generate`, the serving engine).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from transformers import AttentionInterface, AttentionMaskInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import sdpa_mask

from .. import llm_calls
from ..errors import ConfigError
from ..llm_calls import layer_kinds
from .decoder import SUPPORTED_ATTENTION, LLMReducer

if TYPE_CHECKING:
    from ..modeling import VLModel

ATTENTION = "vlbridge_key_bias"  # the attention function's name in transformers' registry


def biased_mask(mask: torch.Tensor | None, bias: torch.Tensor, query: torch.Tensor, key: torch.Tensor):
    """The additive mask [B, 1, q, K] for `query` [B, H, q, d] over `key` [B, H_kv, K, d]: transformers'
    `mask` (bool, True = attend; None = causal) plus `bias` [B or a divisor of B, ≤ K] on the first keys."""
    batch, n_query, n_key = query.shape[0], query.shape[2], key.shape[2]
    if bias.shape[0] != batch:  # beam search / several samples per prompt repeat each prompt in place
        bias = bias.repeat_interleave(batch // bias.shape[0], dim=0)
    bias = F.pad(bias, (0, n_key - bias.shape[1])).to(device=query.device, dtype=query.dtype)
    if mask is None:  # causal, the new queries last
        at = torch.arange(n_query, device=query.device)[:, None] + (n_key - n_query)
        mask = torch.arange(n_key, device=query.device)[None, :] <= at
    if mask.dtype == torch.bool:
        mask = torch.zeros(mask.shape, dtype=query.dtype, device=query.device).masked_fill(
            ~mask, torch.finfo(query.dtype).min
        )
    return mask + bias[:, None, None, :]


def key_bias_attention(module, query, key, value, attention_mask, key_bias=None, **kwargs) -> Any:
    """The registered attention function: SDPA, with `key_bias` added to the keys' logits when given."""
    if key_bias is not None:
        attention_mask = biased_mask(attention_mask, key_bias, query, key)
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


AttentionInterface.register(ATTENTION, key_bias_attention)
AttentionMaskInterface.register(ATTENTION, sdpa_mask)


def install(model: VLModel, reducer: str) -> None:
    """Check that the LLM can take the bias, then switch its attention to `ATTENTION`."""
    llm = model.language_model
    config = llm.config.get_text_config()
    implementation = llm_calls.attention_implementation(config)
    problem = None
    if implementation not in (*SUPPORTED_ATTENTION, ATTENTION):
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
    llm.set_attn_implementation(ATTENTION)


def weighs_keys(language_model) -> bool:
    """Whether calls of this LLM may carry a key bias (`install` switched its attention)."""
    return llm_calls.attention_implementation(language_model.config.get_text_config()) == ATTENTION
