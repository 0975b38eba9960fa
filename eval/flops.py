"""Analytic prefill FLOPs, to set beside torch's FLOP counter in `vlbridge bench`: each checks the other.

FLOPs are 2 per multiply-add, matmuls (and the patch convolution) only, as the counter counts them; the
attention score matrix is counted in full (n × past+n), causal or not, as the counter does.

- decoder layer on n tokens over past+n keys (pmod.md §8, GQA, gated MLP of width F; d_q = D gives the
  spec's 2n(2D² + 2D·d_kv + 3DF) + 4n²D):  2n(D·d_q + 2D·d_kv + d_q·D + 3DF) + 4n(past+n)·d_q
- ViT block with n tokens of which r merge before the MLP (turbo.md §7, 2·MACs):
  8nC² + 4n²C + 4(n−r)·C·F_v
- reducer overheads: p-MoD's routers 2·S·D per routed layer (§8); FastV's score at layer K−1 (keys of
  all S tokens, one query, one score row).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class DecoderShape:
    """The matmul widths of a transformers decoder-only LLM."""

    hidden: int
    q_width: int  # heads · head_dim
    kv_width: int  # kv heads · head_dim
    intermediate: int
    vocab: int
    layers: int

    @classmethod
    def of(cls, config: Any) -> DecoderShape:
        config = config.get_text_config()
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
        return cls(
            hidden=config.hidden_size,
            q_width=config.num_attention_heads * head_dim,
            kv_width=kv_heads * head_dim,
            intermediate=config.intermediate_size,
            vocab=config.vocab_size,
            layers=config.num_hidden_layers,
        )


def decoder_layer_flops(shape: DecoderShape, n: int, past: int = 0) -> int:
    d, q, kv, f = shape.hidden, shape.q_width, shape.kv_width, shape.intermediate
    return 2 * n * (d * q + 2 * d * kv + q * d + 3 * d * f) + 4 * n * (past + n) * q


def llm_prefill_flops(shape: DecoderShape, tokens_per_layer: list[int], *, batch: int, logits: int) -> int:
    """All decoder layers (layer l on `tokens_per_layer[l]` tokens per row) plus the LM head on `logits`
    positions per row."""
    layers = sum(decoder_layer_flops(shape, n) for n in tokens_per_layer)
    return batch * (layers + 2 * logits * shape.hidden * shape.vocab)


def _pmod_overhead(reducer: Any, shape: DecoderShape, batch: int, seq: int) -> int:
    return batch * len(reducer.reduced_layers()) * 2 * seq * shape.hidden  # Linear(D, 1) on every token


def _fastv_overhead(reducer: Any, shape: DecoderShape, batch: int, seq: int) -> int:
    attn = reducer._layers[reducer.config.k - 1].self_attn
    d, q, kv = shape.hidden, shape.q_width, shape.kv_width
    if hasattr(attn, "qkv_proj"):  # fused projection: q, k and v of every token, then sliced
        keys, query = 2 * seq * d * (q + 2 * kv), 2 * d * (q + 2 * kv)
    else:
        keys, query = 2 * seq * d * kv, 2 * d * q
    return batch * (keys + query + 2 * seq * q)


# reducer type -> FLOPs it adds to a prefill of `batch` rows of `seq` tokens
REDUCER_OVERHEADS: dict[str, Callable[[Any, DecoderShape, int, int], int]] = {
    "pmod": _pmod_overhead,
    "fastv": _fastv_overhead,
}


def reducer_overhead_flops(reducers: Any, shape: DecoderShape, batch: int, seq: int) -> int:
    return sum(
        REDUCER_OVERHEADS[r.config.type](r, shape, batch, seq)
        for r in reducers
        if r.config.type in REDUCER_OVERHEADS
    )


def vit_prefill_flops(config: Any, tokens: list[int], *, images: int) -> int:
    """A CLIP / SigLIP encoder: patch embedding and every block; `tokens` = [entering block 0, leaving
    block 0, …, leaving the last block] per image (constant without merging)."""
    c, f, p = config.hidden_size, config.intermediate_size, config.patch_size
    patches = (config.image_size // p) ** 2
    total = 2 * patches * 3 * p * p * c
    for n, after in zip(tokens[:-1], tokens[1:], strict=True):
        total += 8 * n * c * c + 4 * n * n * c + 4 * after * c * f
    return images * total


def connector_flops(connector: Any, tokens: int) -> int:
    """An MLP connector applied to `tokens` output tokens: every Linear once per token."""
    from torch import nn

    return sum(
        2 * tokens * m.in_features * m.out_features for m in connector.modules() if isinstance(m, nn.Linear)
    )


def vit_tokens(config: Any, has_cls: bool) -> list[int]:
    """Token counts of an unmerged ViT: the same before and after every block."""
    n = (config.image_size // config.patch_size) ** 2 + int(has_cls)
    return [n] * (config.num_hidden_layers + 1)
