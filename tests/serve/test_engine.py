"""The batching engine: rows join a running batch mid-flight and still decode exactly as alone, 16
concurrent clients are batched together (the counters show it) and all get the right answers, and
deep-fusion models (in-layer hooks) fall back to static batches that are just as exact."""

from __future__ import annotations

import asyncio
import concurrent.futures
import time

import httpx
import pytest
import torch
from serve_kit import LiveServer, image_message, server_config

from vlbridge.reducers import size_bias
from vlbridge.reducers.size_bias import biased_mask
from vlbridge.serve.engine import Engine, Overloaded
from vlbridge.serve.generation import Generation
from vlbridge.serve.prompts import Prompt
from vlbridge.serve.sampling import SamplingParams
from vlbridge.testing import chat, tiny_model
from vlbridge.tokenization import generation_kwargs

QUESTIONS = [
    "What color is the circle?",
    "How many triangles are there?",
    "Is there a green diamond?",
    "Describe the image.",
]


def _reference(vl, messages, images, max_new_tokens):
    model, tokenizer, processor = vl
    tokens = model.generate(
        **processor([messages], [images]),
        max_new_tokens=max_new_tokens,
        do_sample=False,
        **generation_kwargs(tokenizer),
    )[0]
    return tokenizer.decode(tokens, skip_special_tokens=True)


def _prompt(vl, messages, images) -> Prompt:
    return Prompt(vl[2].encode(messages, images, add_generation_prompt=True), len(images), 0)


async def _answer(engine, prompt, max_tokens, started: asyncio.Event | None = None) -> str:
    text = ""
    async for event in Generation(engine, prompt, SamplingParams(max_tokens, temperature=0), 1).events():
        text += event.text
        if started is not None and event.tokens:
            started.set()
    return text


def _run_staggered(vl, cases, engine) -> list[str]:
    """The first case starts alone; the others are submitted once it has produced tokens."""

    async def main():
        engine.start()
        try:
            started = asyncio.Event()
            first = asyncio.create_task(_answer(engine, _prompt(vl, *cases[0][:2]), cases[0][2], started))
            await started.wait()
            rest = [_answer(engine, _prompt(vl, m, i), n) for m, i, n in cases[1:]]
            return [await first, *await asyncio.gather(*rest)]
        finally:
            engine.stop()

    return asyncio.run(main())


@pytest.mark.parametrize(("family", "frontend"), [("llama", "llava"), ("gemma2", "llava"), ("qwen3", "solo")])
def test_rows_joining_mid_flight_decode_as_alone(family, frontend, red_image, blue_image):
    vl = tiny_model(family, "clip_vision_model", frontend={"type": frontend})
    cases = [
        (chat(QUESTIONS[3]), [red_image], 20),
        (chat(QUESTIONS[0]), [blue_image], 12),
        (chat("hi", image_in=None), [], 6),
        (chat(QUESTIONS[1] + " And what else? Tell me everything."), [red_image], 16),
    ]
    engine = Engine(vl[0], vl[1], context_length=256, max_batch_size=8, batching="continuous")
    answers = _run_staggered(vl, cases, engine)
    assert answers == [_reference(vl, m, i, n) for m, i, n in cases]
    assert engine.stats.max_batch >= 3 and engine.stats.prefills >= 2  # they really shared steps


@pytest.mark.parametrize(
    ("reducer", "mode"),
    [
        ({"type": "turbo"}, "continuous"),
        ({"type": "turbo", "positions": "dense"}, "continuous"),
        ({"type": "turbo", "positions": "original", "llm_proportional": True}, "continuous"),
        ({"type": "pmod"}, "static"),
        ({"type": "fastv", "k": 1}, "static"),
    ],
    ids=["turbo", "turbo-dense-positions", "turbo-weighted", "pmod", "fastv"],
)
def test_models_with_token_reducers_decode_as_alone(reducer, mode, red_image, blue_image):
    """Tower-side reducers keep continuous batching; in-LLM ones (decoder hooks) get static batches."""
    frontend = {"type": "llava", "connector": {"merge": 1}}  # turbo merges tokens: no 2x2 connector merge
    vl = tiny_model("llama", "clip_vision_model", frontend=frontend, reducers=[reducer])
    engine = Engine(vl[0], vl[1], context_length=256, max_batch_size=8)
    assert engine.mode == mode
    cases = [
        (chat(QUESTIONS[2]), [red_image], 12),
        (chat(QUESTIONS[0]), [blue_image], 9),
        (chat("hi", image_in=None), [], 5),
    ]
    answers = _run_staggered(vl, cases, engine)
    assert answers == [_reference(vl, m, i, n) for m, i, n in cases]


def test_a_reduced_image_kept_on_its_dense_span_decodes_at_the_positions_generate_uses(red_image):
    """Tiny random models barely react to RoPE offsets, so the positions themselves are compared."""
    frontend = {"type": "llava", "connector": {"merge": 1}, "vision": {"config": {"patch_size": 4}}}
    turbo = {"type": "turbo", "r": 8, "min_tokens": 0, "positions": "dense"}
    vl = tiny_model("llama", "clip_vision_model", frontend=frontend, reducers=[turbo])
    assert vl[0].frontend.layout.num_image_tokens() < vl[0].reducers[0].image_span()
    calls: list[list[int]] = []
    vl[0].language_model.register_forward_pre_hook(
        lambda _, args, kwargs: calls.append(kwargs["position_ids"][0, -1:].tolist()), with_kwargs=True
    )
    case = (chat(QUESTIONS[0]), [red_image], 6)
    _reference(vl, *case)
    generated, calls[:] = list(calls), []
    _run_staggered(vl, [case], Engine(vl[0], vl[1], context_length=256, max_batch_size=8))
    assert calls == generated[: len(calls)] and len(calls) >= 2


def test_merged_tokens_weigh_by_size_in_the_engine_as_in_generate(red_image, monkeypatch):
    """Every attention call gets the same biased mask, prefill and every step, from both paths."""
    frontend = {"type": "llava", "connector": {"merge": 1}, "vision": {"config": {"patch_size": 4}}}
    turbo = {"type": "turbo", "r": 8, "min_tokens": 0, "llm_proportional": True}
    vl = tiny_model("llama", "clip_vision_model", frontend=frontend, reducers=[turbo])
    masks: list[torch.Tensor] = []

    def recorded(*args):
        masks.append(mask := biased_mask(*args))
        return mask

    monkeypatch.setattr(size_bias, "biased_mask", recorded)
    case = (chat(QUESTIONS[0]), [red_image], 6)
    _reference(vl, *case)
    generated, masks[:] = list(masks), []
    _run_staggered(vl, [case], Engine(vl[0], vl[1], context_length=256, max_batch_size=8))
    assert len(masks) >= 4 and generated[0].max() > 0  # two layers a call; log sizes > 0
    for ours, reference in zip(masks, generated, strict=False):
        torch.testing.assert_close(ours, reference)


def test_deep_fusion_models_run_static_batches_exactly(red_image, blue_image):
    vl = tiny_model("llama", "clip_vision_model", frontend={"type": "adem_vl"})
    engine = Engine(vl[0], vl[1], context_length=256, max_batch_size=8)
    assert engine.mode == "static"  # adem_vl's decoder hooks hold per-batch visual memory
    cases = [
        (chat(QUESTIONS[0]), [red_image], 10),
        (chat(QUESTIONS[1]), [blue_image], 14),
        (chat("hi", image_in=None), [], 5),
    ]
    answers = _run_staggered(vl, cases, engine)
    assert answers == [_reference(vl, m, i, n) for m, i, n in cases]
    assert engine.stats.max_batch >= 2


def test_a_full_queue_is_refused_with_503():
    vl = tiny_model()
    engine = Engine(vl[0], vl[1], context_length=256, max_queue=1)  # not started: nothing drains

    async def main():
        prompt = _prompt(vl, chat("hi", image_in=None), [])
        Generation(engine, prompt, SamplingParams(4), 1)
        with pytest.raises(Overloaded) as err:
            Generation(engine, prompt, SamplingParams(4), 1)
        assert err.value.status == 503

    asyncio.run(main())


# -- over HTTP ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def fresh_server(checkpoint):
    with LiveServer(server_config(checkpoint, batch_window_ms=50, max_batch_size=64)) as live:
        yield live


def test_sixteen_concurrent_clients_are_batched_and_all_correct(
    fresh_server, checkpoint, red_image, blue_image
):
    from vlbridge.factory import load_pretrained

    model, processor = load_pretrained(checkpoint, max_length=256)
    vl = (model, processor.tokenizer, processor)
    cases = [(QUESTIONS[i % 4], [red_image, blue_image, None][i % 3], 8 + i % 5) for i in range(16)]
    client = fresh_server.client()

    def ask(i: int) -> str:
        question, image, max_tokens = cases[i]
        message = image_message(question, image) if image else {"role": "user", "content": question}
        kwargs = {"model": "tiny-vl", "messages": [message], "temperature": 0, "max_tokens": max_tokens}
        if i % 2:  # half of the clients stream
            stream = client.chat.completions.create(stream=True, **kwargs)
            return "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
        return client.chat.completions.create(**kwargs).choices[0].message.content

    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(ask, range(16)))
    expected = [
        _reference(vl, chat(q, image_in="user" if im else None), [im] if im else [], n) for q, im, n in cases
    ]
    assert answers == expected
    stats = fresh_server.stats()
    assert stats["requests"] == 16 and stats["failed"] == 0
    assert stats["max_batch"] >= 8, stats  # evidence of batching: many rows decoded in one step
    assert stats["decode_steps"] < sum(n for _, _, n in cases) / 4, stats


def test_a_client_that_leaves_mid_stream_frees_its_row(fresh_server):
    body = {
        "messages": [{"role": "user", "content": "Describe the image."}],
        "max_tokens": 200,
        "stream": True,
        "ignore_eos": True,
    }
    before = fresh_server.stats()["tokens"]
    with httpx.stream(
        "POST", f"{fresh_server.url}/v1/chat/completions", json=body, headers=fresh_server.headers()
    ) as response:
        lines = response.iter_lines()
        assert [next(lines) for _ in range(6)]
    deadline = time.monotonic() + 5
    while fresh_server.stats()["running"] and time.monotonic() < deadline:
        time.sleep(0.05)
    stats = fresh_server.stats()
    assert stats["running"] == 0
    assert stats["tokens"] - before < 100  # it stopped long before its 200 tokens
    again = fresh_server.post({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
    assert again.status_code == 200
