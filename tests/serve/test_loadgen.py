"""Load generation on a live server: closed-loop clients, their latency figures, the benchmark's table."""

from __future__ import annotations

import asyncio

import pytest
from serve_kit import LiveServer, server_config

from vlbridge.serve.loadgen import image_chat, request_body, run_level
from vlbridge.serve.loadtest import markdown


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
