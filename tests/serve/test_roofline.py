"""The batch-1 decode roofline: bytes read per token, the measured bandwidth, eager and compiled rates."""

from __future__ import annotations

import pytest
import torch

from vlbridge.factory import load_pretrained
from vlbridge.serve.roofline import decode_roofline, kv_bytes_per_token, weight_bytes_per_token


def test_decode_roofline_counts_bytes_and_measures_a_fraction(checkpoint):
    model, processor = load_pretrained(checkpoint, max_length=256)
    tokenizer = processor.tokenizer
    lm = model.language_model
    params = sum(p.numel() for p in lm.parameters())
    embedding = lm.get_input_embeddings().weight.numel()
    assert weight_bytes_per_token(lm) == 4 * (params - embedding)  # fp32, untied: the table is not read
    # 2 layers x (K and V) x 2 KV heads x head_dim 16 x 4 bytes, per cached position
    assert kv_bytes_per_token(lm, 10) == 2 * 2 * 2 * 16 * 4 * 10
    result = decode_roofline(model, tokenizer, processor, tokens=8, bandwidth_mib=64)
    assert result["memory_bandwidth_gb_s"] > 0.1
    # The fraction is the measured rate over the bandwidth limit, eager and compiled. A tiny model's weights
    # sit in cache, so it may exceed 1 here; only real-sized models are bound by DRAM.
    per_token = result["weight_bytes_per_token"] + result["kv_bytes_per_token"]
    limit = result["memory_bandwidth_gb_s"] * 1e9 / per_token
    assert result["bandwidth_limit_tokens_per_s"] == pytest.approx(limit, rel=1e-6)
    for mode in ("eager", "compiled"):
        rate = result[mode]["decode_tokens_per_s"]
        assert rate > 0 and result[mode]["fraction_of_limit"] == pytest.approx(rate / limit, rel=1e-6)
        assert result[mode]["threads"] in (1, torch.get_num_threads())
