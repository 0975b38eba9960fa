"""Compiled batch-1 decode (`--compile`): the same greedy answers as eager generation, thread counts
tuned, and models with decoder-hook state refused (the one-row products: test_linear.py)."""

from __future__ import annotations

import pytest
import torch
from test_engine import QUESTIONS, _reference, _run_staggered

from vlbridge.serve.compiled_decode import BatchOneDecode
from vlbridge.serve.engine import Engine
from vlbridge.testing import chat, tiny_model


def test_compiled_decode_gives_the_eager_answers_alone_and_batched(red_image, blue_image):
    # turbo's size bias in the LLM adds a per-key bias to an image row's decode calls: the compiled step
    # must carry it too, compiled at start like the plain step.
    frontend = {"type": "llava", "connector": {"merge": 1}}  # turbo merges tokens: no 2x2 connector merge
    turbo = {"type": "turbo", "llm_proportional": True, "r": 4, "min_tokens": 8}  # merges: a bias
    vl = tiny_model("llama", "clip_vision_model", frontend=frontend, reducers=[turbo])
    engine = Engine(vl[0], vl[1], context_length=256, max_batch_size=8, compile=True)
    calls = []
    compiled = engine.batch_one.forward

    def strictly_compiled(**kwargs):
        """Once tuned, an input the warm-up did not compile fails here instead of running eager."""
        tuned = engine.batch_one.stance != "default"  # else: compiling at start
        calls.append((kwargs["input_ids"].shape, tuned and "key_bias" in kwargs))
        if not tuned:
            return compiled(**kwargs)
        with torch.compiler.set_stance("fail_on_recompile"):
            return compiled(**kwargs)

    engine.batch_one.forward = strictly_compiled
    cases = [
        (chat(QUESTIONS[3]), [red_image], 24),  # alone for its first tokens: batch-1 steps, compiled
        (chat(QUESTIONS[0]), [blue_image], 6),  # then joined by these: batched steps, eager
        (chat("hi", image_in=None), [], 4),
    ]
    answers = _run_staggered(vl, cases, engine)
    assert answers == [_reference(vl, m, i, n) for m, i, n in cases]
    assert engine.batch_one.threads in (None, 1)  # tuned at start
    assert calls and all(shape == (1, 1) for shape, _ in calls)  # the compiled step ran, at batch 1 only
    assert any(biased for _, biased in calls)  # the image row's steps, with its key bias, compiled too
    assert engine.stats.max_batch >= 2  # and the others shared eager steps


@pytest.mark.parametrize(("faster", "expected"), [(1, 1), (None, None)])
def test_tuning_keeps_the_faster_thread_count(faster, expected):
    decode = BatchOneDecode(torch.nn.Linear(4, 4))
    decode.tune(lambda tokens: tokens * (0.01 if decode.threads == faster else 0.02))
    assert decode.threads == expected


def test_models_whose_hooks_keep_batch_state_stay_eager(caplog):
    vl = tiny_model("llama", "clip_vision_model", frontend={"type": "adem_vl"})
    engine = Engine(vl[0], vl[1], context_length=256, compile=True)
    assert engine.batch_one is None
    assert "--compile: off for this model" in caplog.text and "per-batch state" in caplog.text


def test_a_step_that_cannot_compile_stays_eager(caplog):
    decode = BatchOneDecode(torch.nn.Linear(4, 4))

    def no_compiler(kv, tokens):
        raise RuntimeError("InvalidCxxCompiler: no working C++ compiler found")

    assert decode.warm_up([(torch.zeros(1, 4), None)], no_compiler) is False
    assert "could not be compiled; it stays eager" in caplog.text
