"""Prompt building: a text that cannot fit is refused from its length alone, before any tokenizing."""

from __future__ import annotations

import pytest

from vlbridge.serve.config import MediaConfig
from vlbridge.serve.errors import APIError
from vlbridge.serve.media import ImageLoader
from vlbridge.serve.prompts import NORMALIZATION_SLACK, PromptBuilder
from vlbridge.serve.protocol import ChatMessage
from vlbridge.testing import tiny_model


@pytest.fixture(scope="module")
def builder():
    _, tokenizer, processor = tiny_model()
    return PromptBuilder(
        processor, ImageLoader(MediaConfig()), image_position="before", context_length=64, max_images=2
    )


def user(text: str) -> list[ChatMessage]:
    return [ChatMessage.model_validate({"role": "user", "content": text})]


def test_the_character_bound_refuses_without_tokenizing_and_is_a_true_lower_bound(builder, monkeypatch):
    per_token = max(map(len, builder.processor.tokenizer.get_vocab())) * NORMALIZATION_SLACK
    text = "count " * (64 * per_token // 6 + 1)
    tokens = len(builder.processor.tokenizer(text)["input_ids"])
    assert len(text) // per_token <= tokens  # a lower bound on the real count

    def never(*args, **kwargs):
        raise AssertionError("tokenized")

    monkeypatch.setattr(builder.processor, "encode", never)
    with pytest.raises(APIError, match=r"characters of text, at least 64 tokens.*context length is 64"):
        builder.build(user(text))


def test_a_text_under_the_bound_is_tokenized_and_measured_exactly(builder):
    with pytest.raises(APIError, match=r"the prompt is \d+ tokens .*context length is 64"):
        builder.build(user("count " * 100))
    assert builder.build(user("count")).tokens < 64
