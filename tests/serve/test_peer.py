"""The load benchmark beside `transformers serve`: the same random model exported to transformers' LLaVA
and as a plain LLM, the same requests, the same greedy answers, figures for both at every load."""

from __future__ import annotations

import json

import pytest

from vlbridge.serve.loadtest import main

pytestmark = pytest.mark.slow


def test_both_servers_answer_alike_and_are_measured_at_every_load(tmp_path, capsys):
    flags = ["--duration", "1", "--peer-clients", "1", "3", "--max-tokens", "6", "--output", str(tmp_path)]
    assert main(["random:tiny", "--peer", "transformers", *flags]) == 0
    peer = json.loads((tmp_path / "results.json").read_text())["peer"]
    for kind in ("image", "text"):
        runs = peer[kind]
        assert runs["identical_answers"], (runs["vlbridge"]["answers"], runs["transformers"]["answers"])
        assert all(answer.strip() for answer in runs["vlbridge"]["answers"])
        for server in ("vlbridge", "transformers"):
            levels = runs[server]["levels"]
            assert [lv["clients"] for lv in levels] == [1, 3]
            assert all(lv["errors"] == 0 and lv["requests"] >= 1 for lv in levels), levels
            assert all(lv["ttft_ms_p50"] > 0 and lv["output_tokens_per_s"] > 0 for lv in levels)
        ours, theirs = runs["vlbridge"]["levels"], runs["transformers"]["levels"]
        expected = [
            round(a["output_tokens_per_s"] / b["output_tokens_per_s"], 2)
            for a, b in zip(ours, theirs, strict=True)
        ]
        assert runs["ratio"] == expected
    table = capsys.readouterr().out
    assert table.count("| image |") == 2 and table.count("| text |") == 2
    assert "image chats: greedy answers identical" in table
