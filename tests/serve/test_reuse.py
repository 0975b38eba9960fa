"""Multi-turn reuse: chats answer exactly as without it (batched, static, with reducers that move positions
or refuse it), a repeated image is encoded once, both caches stay within their byte budgets, and an image
is never taken for another that shares its placeholder ids."""

from __future__ import annotations

import asyncio

import pytest
import torch
from PIL import Image
from serve_kit import LiveServer, image_message, server_config

from vlbridge.processing import Encoded
from vlbridge.serve.engine import Engine
from vlbridge.serve.generation import Generation
from vlbridge.serve.kvcache import KVBatch
from vlbridge.serve.lru import ByteLRU
from vlbridge.serve.prefix_cache import MIN_REUSED_TOKENS, PrefixCache
from vlbridge.serve.prompt_keys import PromptKey
from vlbridge.serve.prompts import Prompt
from vlbridge.serve.sampling import SamplingParams
from vlbridge.testing import tiny_model
from vlbridge.tokenization import generation_kwargs

SYSTEM = "You describe images of shapes: say what color each shape is and how many there are."
CHATS = [
    ["Describe the image.", "What color is the circle?", "How many triangles are there?"],
    ["What shape is the blue object?", "Is there a green diamond?", "Describe the image."],
    ["Is the yellow circle left or right of the square?", "Describe the image.", "What color is the circle?"],
]
NO_REUSE = {"encoder_cache_mb": 0, "prefix_cache_mb": 0}
LLAVA_1X1 = {"type": "llava", "connector": {"merge": 1}}  # tower reducers take no 2x2 connector merge


def _green() -> Image.Image:
    return Image.new("RGB", (32, 32), (40, 200, 40))


def _messages(turns: list[str], answers: list[str], image_marker: str = "<image>\n") -> list[dict]:
    """The conversation up to the last of `turns` (answered by `answers`), the image in the first turn."""
    messages = [{"role": "system", "content": SYSTEM}]
    for i, question in enumerate(turns):
        messages.append({"role": "user", "content": (image_marker if i == 0 else "") + question})
        if i < len(answers):
            messages.append({"role": "assistant", "content": answers[i]})
    return messages


def _prompt(vl, messages: list[dict], image: Image.Image) -> Prompt:
    return Prompt(vl[2].encode(messages, [image], add_generation_prompt=True), 1, 0)


async def _play(engine, vl, turns, image, max_tokens, last_n=1) -> list[list[str]]:
    """Each turn in order, the answer joining the conversation; the last turn asks for `last_n` choices
    (sampled with a seed when several). Returns every turn's choices."""
    answers: list[list[str]] = []
    for i in range(len(turns)):
        prompt = _prompt(vl, _messages(turns[: i + 1], [a[0] for a in answers]), image)
        n = last_n if i == len(turns) - 1 else 1
        params = SamplingParams(max_tokens, temperature=0.8 if n > 1 else 0, seed=7)
        texts = [""] * n
        async for event in Generation(engine, prompt, params, n).events():
            texts[event.choice] += event.text
        answers.append(texts)
    return answers


def _chats(engine, vl, chats) -> list:
    """The chats played concurrently (their turns share the engine's batches)."""

    async def main():
        engine.start()
        try:
            return await asyncio.gather(*(_play(engine, vl, *chat) for chat in chats))
        finally:
            engine.stop()

    return asyncio.run(main())


def _together(engine, asks: list[tuple[Prompt, SamplingParams]]) -> list[str]:
    """The answers to prompts submitted at once (one admission takes them all)."""

    async def main():
        engine.start()
        try:
            runs = [Generation(engine, prompt, params, 1) for prompt, params in asks]
            return [await _text(run) for run in runs]
        finally:
            engine.stop()

    return asyncio.run(main())


async def _text(run: Generation) -> str:
    return "".join([event.text async for event in run.events()])


def _engines(vl, **kwargs) -> tuple[Engine, Engine]:
    """An engine with reuse and one without; an idle engine waits 20 ms for company (more batching)."""
    kwargs = {"context_length": 256, "max_batch_size": 8, "batch_window_s": 0.02, **kwargs}
    return Engine(vl[0], vl[1], **kwargs), Engine(vl[0], vl[1], **kwargs, **NO_REUSE)


@pytest.mark.parametrize(
    ("overrides", "batching", "refused"),
    [
        ({}, "continuous", None),
        ({}, "static", None),
        ({"frontend": {"type": "solo"}}, "continuous", None),
        ({"frontend": LLAVA_1X1, "reducers": [{"type": "turbo"}]}, "auto", None),
        ({"frontend": LLAVA_1X1, "reducers": [{"type": "pmod"}]}, "auto", "pmod"),
        ({"frontend": {"type": "adem_vl"}}, "auto", "adem_vl"),
    ],
    ids=["llava", "llava-static", "solo", "turbo", "pmod-refused", "adem_vl-refused"],
)
def test_batched_three_turn_chats_answer_as_without_reuse(
    overrides, batching, refused, red_image, blue_image
):
    vl = tiny_model("llama", "clip_vision_model", **overrides)
    with_reuse, without = _engines(vl, batching=batching)
    chats = [(CHATS[0], red_image, 12, 2), (CHATS[1], blue_image, 9), (CHATS[2], red_image, 10)]
    answers = _chats(with_reuse, vl, chats)
    assert answers == _chats(without, vl, chats)
    prefixes = with_reuse.reuse()["prefix_cache"]
    if refused is None:
        assert prefixes["hits"] >= 4 and prefixes["reused_tokens"] > 4 * MIN_REUSED_TOKENS, prefixes
        assert with_reuse.stats.max_batch >= 2  # the chats really shared steps
    else:
        assert not prefixes["enabled"] and refused in prefixes["reason"], prefixes


def test_reused_prefixes_keep_the_positions_and_key_biases_of_a_cold_prefill(red_image):
    """Tiny random models barely react to RoPE offsets, so the LLM calls' positions and key biases are
    compared: a reduced image keeps its dense span and merged tokens weigh by size (turbo)."""
    frontend = {"type": "llava", "connector": {"merge": 1}, "vision": {"config": {"patch_size": 4}}}
    turbo = {"type": "turbo", "r": 8, "min_tokens": 0, "positions": "dense", "llm_proportional": True}
    vl = tiny_model("llama", "clip_vision_model", frontend=frontend, reducers=[turbo])
    assert vl[0].frontend.layout.num_image_tokens() < vl[0].reducers[0].image_span()
    calls: list[tuple[torch.Tensor, torch.Tensor | None]] = []
    vl[0].language_model.register_forward_pre_hook(
        lambda _, args, kwargs: calls.append((kwargs["position_ids"], kwargs.get("key_bias"))),
        with_kwargs=True,
    )
    traces = []
    for engine in _engines(vl):
        calls.clear()
        _chats(engine, vl, [(CHATS[0], red_image, 6)])
        traces.append(list(calls))
    reused, cold = traces
    assert len(reused) == len(cold) and reused[0][1] is not None
    hits = 0
    for (positions, bias), (cold_positions, cold_bias) in zip(reused, cold, strict=True):
        assert torch.equal(positions, cold_positions[:, -positions.shape[1] :])
        torch.testing.assert_close(bias, cold_bias)  # every key's bias, the cached ones included
        hits += positions.shape[1] < cold_positions.shape[1]
    assert hits == 2  # turns 2 and 3 ran only their new tokens


def test_a_next_turn_reuses_the_prompt_and_every_answer_token_whose_kv_was_cached(red_image):
    """The last answer token is sampled but never run: the cached KV and its key stop before it."""
    vl = tiny_model()
    with_reuse, without = _engines(vl)
    first = vl[2].encode(_messages(CHATS[0][:1], []), [red_image], add_generation_prompt=True)
    params = SamplingParams(6, temperature=0, ignore_eos=True)
    _together(with_reuse, [(Prompt(first, 1, 0), params)])
    [(_, (tokens, kv))] = with_reuse.prefix_cache.store.items()
    assert len(tokens) == kv.mask.shape[1] == len(first.input_ids) + 6 - 1
    answered = [int(t) for t in tokens[len(first.input_ids) :]]  # the first 5 answer tokens, as run
    more = vl[1].encode("<|end|>\n<|user|>\nWhat color is the circle?<|end|>\n<|assistant|>\n")
    ids = first.input_ids + answered + more
    second = Prompt(Encoded(ids, ids, first.pixel_values), 1, 0)
    assert _together(with_reuse, [(second, params)]) == _together(without, [(second, params)])
    assert with_reuse.reuse()["prefix_cache"]["reused_tokens"] == len(tokens)


def test_requests_continuing_one_prefix_by_as_many_tokens_share_one_prefill(red_image, blue_image):
    vl = tiny_model()
    with_reuse, without = _engines(vl)
    _chats(with_reuse, vl, [(CHATS[0][:1], red_image, 4)])
    cases = [(CHATS[0][0], red_image, 6), (CHATS[0][0], red_image, 5), (CHATS[1][0], blue_image, 5)]
    asks = [(_prompt(vl, _messages([q], []), im), SamplingParams(n, 0)) for q, im, n in cases]
    before = with_reuse.stats.prefills
    assert _together(with_reuse, asks) == _together(without, asks)
    # the repeats of the first question share a prefill on its cached KV; the other question continues
    # only the system prompt of that KV, by more tokens, in a prefill of its own
    assert with_reuse.stats.prefills - before == 2 and with_reuse.reuse()["prefix_cache"]["hits"] == 3


def test_a_repeated_image_is_encoded_once(red_image, blue_image):
    vl = tiny_model()
    encoded: list[int] = []
    vl[0].frontend.vision_tower.register_forward_hook(lambda _, args, out: encoded.append(len(args[0])))
    engine = Engine(vl[0], vl[1], context_length=256, prefix_cache_mb=0)
    reference = Engine(vl[0], vl[1], context_length=256, **NO_REUSE)
    chats = [(CHATS[0], red_image, 5), (CHATS[1][:1], red_image, 5), (CHATS[2][:2], blue_image, 5)]
    answers = [_chats(engine, vl, [chat]) for chat in chats]  # one after the other: nothing batched
    assert sum(encoded) == 2  # the red image once, the blue one once, in 6 prompts that hold them
    stats = engine.reuse()["encoder_cache"]
    assert (stats["misses"], stats["hits"]) == (2, 4), stats
    assert answers == [_chats(reference, vl, [chat]) for chat in chats]


def test_the_encoder_cache_evicts_the_least_recently_used_image_within_its_budget(red_image, blue_image):
    vl = tiny_model()
    pixels = vl[2].encode(_messages(["hi"], []), [red_image]).pixel_values[0][None]  # [1, 3, H, W]
    one_image = vl[0].frontend.encode(pixels).nbytes
    budget_mb = 2.5 * one_image / 2**20
    engine = Engine(vl[0], vl[1], context_length=256, encoder_cache_mb=budget_mb, prefix_cache_mb=0)
    images = [red_image, blue_image, _green(), red_image, _green()]
    for image in images:
        _chats(engine, vl, [(["hi"], image, 2)])
    stats = engine.reuse()["encoder_cache"]
    # red, blue, green (evicts red), red again (evicts blue), green: a hit
    assert (stats["misses"], stats["hits"], stats["evictions"], stats["entries"]) == (4, 1, 2, 2)
    assert engine.encoder_cache.store.bytes <= budget_mb * 2**20


def test_the_prefix_cache_stays_within_its_budget_and_still_answers_right(red_image, blue_image):
    vl = tiny_model()
    unbounded, without = _engines(vl)
    chats = [(CHATS[0], red_image, 8), (CHATS[1], blue_image, 8)]
    expected = _chats(without, vl, chats)
    assert _chats(unbounded, vl, chats) == expected
    largest = max(kv.nbytes + tokens.nbytes for _, (tokens, kv) in unbounded.prefix_cache.store.items())
    budget_mb = 1.5 * largest / 2**20
    bounded = Engine(vl[0], vl[1], context_length=256, max_batch_size=8, prefix_cache_mb=budget_mb)
    assert _chats(bounded, vl, chats) == expected
    stats = bounded.reuse()["prefix_cache"]
    assert stats["evictions"] >= 1 and stats["hits"] >= 1, stats
    assert bounded.prefix_cache.store.bytes <= budget_mb * 2**20


def test_a_different_image_behind_the_same_text_is_not_reused(red_image):
    vl = tiny_model()
    green = _green()
    messages = _messages(["Describe the image."], [])
    layout, image_id = vl[0].frontend.layout, vl[0].frontend.image_token_id

    def key(image) -> PromptKey:
        return PromptKey.of(vl[2].encode(messages, [image], add_generation_prompt=True), layout, image_id)

    red, other = key(red_image), key(green)
    assert red.encoded.input_ids == other.encoded.input_ids  # placeholder ids cannot tell them apart
    cache = PrefixCache(2**20)
    engine = Engine(vl[0], vl[1], context_length=256)
    _chats(engine, vl, [(["Describe the image."], red_image, 3)])
    [(_, (tokens, kv))] = engine.prefix_cache.store.items()
    cache.keep(tokens, kv)
    same = cache.lookup(key(red_image.copy()))  # the same pixels in another image object
    assert same is not None and same.tokens > red.spans[0][1]
    hit = cache.lookup(other)
    image_start = other.spans[0][0]
    assert hit is not None and MIN_REUSED_TOKENS <= hit.tokens <= image_start  # the system prompt only
    # and the engine answers about the green image, not the red one it has cached
    reference = Engine(vl[0], vl[1], context_length=256, **NO_REUSE)
    case = [(["Describe the image."], green, 8)]
    assert _chats(engine, vl, case) == _chats(reference, vl, case)


def test_a_prefix_never_splits_an_image_nor_takes_the_whole_prompt(red_image):
    vl = tiny_model()
    encoded = vl[2].encode(_messages(["Describe the image."], []), [red_image], add_generation_prompt=True)
    key = PromptKey.of(encoded, vl[0].frontend.layout, vl[0].frontend.image_token_id)
    (start, end), total = key.spans[0], len(encoded.input_ids)
    assert end - start == vl[0].frontend.layout.num_image_tokens()
    assert [key.boundary(n) for n in (start, start + 1, end - 1, end)] == [start, start, start, end]
    rest, digests = key.tail(end)
    assert rest.pixel_values == [] and digests == [] and len(rest.input_ids) == total - end
    rest, digests = key.tail(start)
    assert len(rest.pixel_values) == 1 and digests == key.digests


def test_a_prompt_whose_images_do_not_fill_its_placeholders_fails_alone(red_image):
    vl = tiny_model()
    engine = _engines(vl)[0]
    good = _prompt(vl, _messages(CHATS[0][:1], []), red_image)
    bad = Prompt(Encoded(good.encoded.input_ids, good.encoded.labels, []), 1, 0)  # pixels lost

    async def main():
        engine.start()
        try:
            runs = [Generation(engine, p, SamplingParams(4, 0), 1) for p in (bad, good)]
            return await asyncio.gather(*(_text(run) for run in runs), return_exceptions=True)
        finally:
            engine.stop()

    failed, answered = asyncio.run(main())
    assert "image placeholder tokens but its 0 images" in str(failed) and isinstance(answered, str)
    assert engine.stats.failed == 1


def test_byte_lru_keeps_the_most_recently_used_within_its_budget():
    lru = ByteLRU(100)
    assert lru.put("a", 1, 40) and lru.put("b", 2, 40)
    assert lru.get("a") == 1  # a is now the most recent
    assert lru.put("c", 3, 40)  # evicts b
    assert (lru.get("b"), lru.get("a"), lru.get("c"), lru.bytes, lru.evictions) == (None, 1, 3, 80, 1)
    assert not lru.put("d", 4, 101) and lru.bytes == 80  # larger than the whole budget: not stored


def test_a_row_taken_out_of_a_batch_keeps_only_its_own_tokens():
    vl = tiny_model()
    engine = Engine(vl[0], vl[1], context_length=256, **NO_REUSE)
    short, long = (
        vl[2].encode(_messages([q], [], image_marker=""), [], add_generation_prompt=True)
        for q in ("hi", CHATS[0][0])
    )
    with torch.inference_mode():
        _, kv = engine._forward_prompts([(short, []), (long, [])])
        alone = engine._forward_prompts([(short, [])])[1]
    row = kv.row(0)
    assert row.mask.shape == (1, len(short.input_ids)) and bool(row.mask.all())
    for mine, reference in zip(row.cache.layers, alone.cache.layers, strict=True):
        torch.testing.assert_close(mine.keys, reference.keys)
    copies = row.prefix(4, 3, next_position=4)
    assert copies.rows == 3 and copies.cache.layers[0].keys.shape[2] == 4
    assert isinstance(copies, KVBatch) and copies.step_inputs()[1].flatten().tolist() == [4, 4, 4]


# -- over HTTP ---------------------------------------------------------------------------------------------
def test_a_chat_over_http_reuses_its_turns_and_answers_as_generate(checkpoint, red_image):
    from vlbridge.factory import load_pretrained

    model, processor = load_pretrained(checkpoint, max_length=256)
    answers: list[str] = []
    with LiveServer(server_config(checkpoint)) as live:
        messages = [{"role": "system", "content": SYSTEM}]
        for i, question in enumerate(CHATS[0]):
            messages.append(
                image_message(question, red_image) if i == 0 else {"role": "user", "content": question}
            )
            body = {"messages": messages, "temperature": 0, "max_tokens": 10}
            answers.append(live.post(body).json()["choices"][0]["message"]["content"])
            messages.append({"role": "assistant", "content": answers[-1]})
        stats = live.stats()["reuse"]
    assert stats["prefix_cache"]["hits"] == 2 and stats["encoder_cache"]["misses"] == 1, stats
    for i in range(len(CHATS[0])):
        conversation = _messages(CHATS[0][: i + 1], answers[:i])
        tokens = model.generate(
            **processor([conversation], [[red_image]]),
            max_new_tokens=10,
            do_sample=False,
            **generation_kwargs(processor.tokenizer),
        )[0]
        assert answers[i] == processor.tokenizer.decode(tokens, skip_special_tokens=True)


def test_the_cache_budgets_reach_the_engine_and_a_negative_one_is_refused(checkpoint, capsys):
    from vlbridge.cli import main

    with LiveServer(server_config(checkpoint, encoder_cache_mb=0, prefix_cache_mb=0.5)) as live:
        reuse = live.stats()["reuse"]
    assert reuse["encoder_cache"] == {"enabled": False, "reason": "--encoder-cache-mb is 0"}
    assert reuse["prefix_cache"]["enabled"] and reuse["prefix_cache"]["budget_mb"] == 0.5
    assert main(["serve", str(checkpoint), "--prefix-cache-mb", "-1"]) == 2
    assert "prefix_cache_mb" in capsys.readouterr().err
