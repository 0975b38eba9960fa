"""The load benchmark's parts on a live server (clients, latency figures) and the decode roofline."""

from __future__ import annotations

import asyncio

import pytest
from serve_kit import LiveServer, server_config

from vlbridge.factory import load_pretrained
from vlbridge.serve.loadtest import image_chat, markdown, request_body, run_level
from vlbridge.serve.roofline import decode_roofline, kv_bytes_per_token, weight_bytes_per_token


@pytest.fixture(scope="module")
def open_server(checkpoint):
    with LiveServer(server_config(checkpoint, api_key=None)) as live:
        yield live


def test_clients_measure_throughput_and_latency_without_errors(open_server):
    body = request_body(image_chat(), 8)
    level = asyncio.run(run_level(open_server.url, clients=4, duration=1.0, body=body, batch="continuous"))
    summary = level.summary()
    assert summary["errors"] == 0 and summary["requests"] >= 4
    assert level.tokens == 8 * level.requests  # ignore_eos: every answer has exactly max_tokens tokens
    assert 0 < summary["ttft_ms_p50"] <= summary["ttft_ms_p95"] <= summary["ttft_ms_p99"]
    assert summary["itl_ms_p50"] is not None and summary["output_tokens_per_s"] > 0
    assert open_server.stats()["max_batch"] >= 2  # four closed-loop clients overlap
    report = {
        "batched": {"levels": [summary], "peak_rss_mb": 1.0},
        "one_at_a_time": {"levels": [summary], "peak_rss_mb": 1.0},
    }
    assert "| continuous | 4 |" in markdown(report)


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
