"""`python -m vlbridge.serve.multiturn` plays its chat with and without reuse and finds the same answers."""

from __future__ import annotations

from vlbridge.serve.multiturn import main
from vlbridge.testing import tiny_model


def test_the_multiturn_measurement_runs_and_answers_alike_with_and_without_reuse(tmp_path, capsys):
    # the chat's third turn is ~750 tokens: more positions than the tiny Llama's 512
    model, tokenizer, _ = tiny_model(llm={"config": {"max_position_embeddings": 1024}})
    model.save_pretrained(tmp_path / "tiny", tokenizer)
    assert main([str(tmp_path / "tiny"), "--repeats", "1", "--max-tokens", "6"]) == 0
    out = capsys.readouterr().out
    assert "greedy answers identical with and without reuse: True" in out
    reused = out.split("of them reused: ")[1].split("\n")[0]
    first, second, third = (int(n) for n in reused.strip("[]").split(", "))
    assert first == 0 and 0 < second < third  # each later turn continues the one before
