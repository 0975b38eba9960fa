"""The official `openai` client against a live server: answers equal the library's own generation,
streaming equals non-streaming, and every sampling parameter does what the API says."""

from __future__ import annotations

import pytest
from serve_kit import image_message

from vlbridge.factory import load_pretrained
from vlbridge.tokenization import generation_kwargs

QUESTION = "What color is the circle?"


@pytest.fixture(scope="module")
def reference(checkpoint):
    """Greedy answers from VLModel.generate (transformers' decode loop), for comparison with the server."""
    model, processor = load_pretrained(checkpoint)
    tokenizer = processor.tokenizer

    def answer(messages: list[dict], images: list, max_new_tokens: int) -> tuple[str, int, int]:
        batch = processor([messages], [images])
        tokens = model.generate(
            **batch, max_new_tokens=max_new_tokens, do_sample=False, **generation_kwargs(tokenizer)
        )[0]
        text = tokenizer.decode(tokens, skip_special_tokens=True)
        return text, batch["input_ids"].shape[1], len(tokens)

    return answer


def test_greedy_answer_with_an_image_equals_the_model_and_usage_is_true(server, reference, red_image):
    response = server.client().chat.completions.create(
        model="tiny-vl", messages=[image_message(QUESTION, red_image)], temperature=0, max_tokens=12
    )
    text, prompt_tokens, generated = reference(
        [{"role": "user", "content": f"<image>\n{QUESTION}"}], [red_image], 12
    )
    assert response.choices[0].message.content == text
    assert response.choices[0].message.role == "assistant"
    assert response.usage.prompt_tokens == prompt_tokens  # text and image tokens
    assert response.usage.completion_tokens == generated
    assert response.usage.total_tokens == prompt_tokens + generated
    assert response.model == "tiny-vl" and response.object == "chat.completion"


def test_streaming_gives_the_same_text_in_several_chunks_and_usage_last(server, red_image):
    client = server.client()
    kwargs = {"messages": [image_message(QUESTION, red_image)], "temperature": 0, "max_tokens": 10}
    whole = client.chat.completions.create(model="tiny-vl", **kwargs)
    chunks = list(
        client.chat.completions.create(
            model="tiny-vl", stream=True, stream_options={"include_usage": True}, **kwargs
        )
    )
    pieces = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert "".join(pieces) == whole.choices[0].message.content
    assert len(pieces) >= 2
    assert chunks[0].choices[0].delta.role == "assistant"
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finish == [whole.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage == whole.usage
    assert all(c.usage is None for c in chunks[:-1])


def test_without_include_usage_no_chunk_carries_usage(server):
    chunks = list(
        server.client().chat.completions.create(
            model="tiny-vl", messages=[{"role": "user", "content": "hi"}], max_tokens=3, stream=True
        )
    )
    assert chunks and all(c.usage is None for c in chunks) and all(c.choices for c in chunks)


def test_system_prompt_and_images_across_turns(server, reference, red_image, blue_image):
    messages = [
        {"role": "system", "content": "Answer briefly."},
        image_message("Describe the image.", red_image, blue_image),
        {"role": "assistant", "content": "A red square."},
        image_message("How many triangles are there?", blue_image),
    ]
    response = server.client().chat.completions.create(
        model="tiny-vl", messages=messages, temperature=0, max_tokens=8
    )
    expected = [
        {"role": "system", "content": "Answer briefly."},
        {"role": "user", "content": "<image>\n<image>\nDescribe the image."},
        {"role": "assistant", "content": "A red square."},
        {"role": "user", "content": "<image>\nHow many triangles are there?"},
    ]
    text, prompt_tokens, _ = reference(expected, [red_image, blue_image, blue_image], 8)
    assert response.choices[0].message.content == text
    assert response.usage.prompt_tokens == prompt_tokens


def test_same_seed_same_output_other_seed_other_output(server):
    client = server.client()

    def sample(seed: int, stream: bool = False) -> str:
        kwargs = {"messages": [{"role": "user", "content": "Describe the image."}], "max_tokens": 16}
        kwargs |= {"temperature": 1.0, "seed": seed, "extra_body": {"ignore_eos": True}}
        if not stream:
            return client.chat.completions.create(model="tiny-vl", **kwargs).choices[0].message.content
        chunks = client.chat.completions.create(model="tiny-vl", stream=True, **kwargs)
        return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)

    first = sample(1234)
    assert sample(1234) == first
    assert sample(1234, stream=True) == first
    assert sample(4321) != first


def test_n_choices_differ_and_completion_tokens_count_every_token(server):
    response = server.client().chat.completions.create(
        model="tiny-vl",
        messages=[{"role": "user", "content": "Write a short caption for the image."}],
        n=3,
        temperature=1.0,
        seed=5,
        max_tokens=6,
        logprobs=True,
    )
    assert [c.index for c in response.choices] == [0, 1, 2]
    assert len({c.message.content for c in response.choices}) > 1
    counted = sum(len(c.logprobs.content) for c in response.choices)
    assert response.usage.completion_tokens == counted
    assert all(1 <= len(c.logprobs.content) <= 6 for c in response.choices)


def test_n_choices_stream_with_their_indices(server):
    chunks = server.client().chat.completions.create(
        model="tiny-vl",
        messages=[{"role": "user", "content": "hi"}],
        n=2,
        temperature=1.0,
        seed=3,
        max_tokens=4,
        stream=True,
    )
    finished = {c.choices[0].index for c in chunks if c.choices and c.choices[0].finish_reason}
    assert finished == {0, 1}


def test_stop_strings_cut_the_answer_before_the_stop(server):
    client = server.client()
    kwargs = {"messages": [{"role": "user", "content": "Describe the image."}], "temperature": 0}
    full = client.chat.completions.create(model="tiny-vl", max_tokens=24, **kwargs)
    text = full.choices[0].message.content
    stop = next(text[i : i + 2] for i in range(2, len(text) - 1) if text[i : i + 2].isprintable())
    expected = text[: text.index(stop)]
    cut = client.chat.completions.create(model="tiny-vl", max_tokens=24, stop=[stop, "never-seen"], **kwargs)
    assert cut.choices[0].message.content == expected
    assert cut.choices[0].finish_reason == "stop"
    assert cut.usage.completion_tokens < full.usage.completion_tokens  # generation stopped there
    streamed = client.chat.completions.create(
        model="tiny-vl", max_tokens=24, stop=stop, stream=True, **kwargs
    )
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == expected


def test_max_tokens_and_max_completion_tokens_bound_the_answer(server):
    client = server.client()
    kwargs = {"messages": [{"role": "user", "content": "hi"}], "extra_body": {"ignore_eos": True}}
    short = client.chat.completions.create(model="tiny-vl", max_tokens=3, **kwargs)
    assert short.usage.completion_tokens == 3 and short.choices[0].finish_reason == "length"
    other = client.chat.completions.create(model="tiny-vl", max_completion_tokens=5, **kwargs)
    assert other.usage.completion_tokens == 5


def test_logprobs_with_top_alternatives(server):
    response = server.client().chat.completions.create(
        model="tiny-vl",
        messages=[{"role": "user", "content": "hi"}],
        temperature=0,
        max_tokens=4,
        logprobs=True,
        top_logprobs=3,
        extra_body={"ignore_eos": True},
    )
    entries = response.choices[0].logprobs.content
    assert len(entries) == 4
    for entry in entries:
        assert len(entry.top_logprobs) == 3
        assert entry.logprob == pytest.approx(entry.top_logprobs[0].logprob)  # greedy took the best
        assert entry.logprob <= 0


def test_unknown_fields_are_tolerated(server):
    response = server.client().chat.completions.create(
        model="tiny-vl",
        messages=[{"role": "user", "content": "hi", "some_future_field": 1}],
        max_tokens=2,
        frequency_penalty=0,
        user="someone",
        extra_body={"vendor_option": {"nested": True}},
    )
    assert response.choices[0].finish_reason in ("stop", "length")


def test_models_and_health(server):
    models = server.client().models.list().data
    assert [m.id for m in models] == ["tiny-vl"]
    import httpx

    assert httpx.get(f"{server.url}/health").json()["status"] == "ok"


def test_greedy_answer_does_not_depend_on_batch_company(server):
    """Temperature 0 gives the same tokens alone and inside a batch of other requests."""
    import concurrent.futures

    client = server.client()
    target = {"messages": [{"role": "user", "content": QUESTION}], "temperature": 0, "max_tokens": 12}
    alone = client.chat.completions.create(model="tiny-vl", **target).choices[0].message.content
    others = [{"role": "user", "content": "x" * (i + 1)} for i in range(7)]
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        noise = [
            pool.submit(client.chat.completions.create, model="tiny-vl", messages=[m], max_tokens=12)
            for m in others
        ]
        together = pool.submit(client.chat.completions.create, model="tiny-vl", **target)
        assert together.result().choices[0].message.content == alone
        for f in noise:
            f.result()
