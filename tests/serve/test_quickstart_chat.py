"""The default model can chat: `vlbridge serve` on the quickstart's checkpoint layout, with no flags.

The model is built from recipes/quickstart.yaml (its LLM, tower and trained BPE tokenizer; random
weights: what is checked is what the server accepts, not what it answers). The context defaults to the
LLM's position limit, so a system prompt, images and three turns with 64-token answers fit.
"""

from __future__ import annotations

import concurrent.futures
from pathlib import Path

import pytest
import torch
from serve_kit import LiveServer, image_message

from vlbridge.recipe import load_recipe
from vlbridge.serve.config import ServerConfig
from vlbridge.training.run import build

RECIPE = Path(__file__).resolve().parents[2] / "recipes" / "quickstart.yaml"
SYSTEM = "You are a careful assistant. Look at the picture and answer in a few words."


@pytest.fixture(scope="module")
def quickstart_server(tmp_path_factory):
    recipe = load_recipe(RECIPE, ["data.train.n=200"])
    from vlbridge.data.formats import load_source

    torch.manual_seed(0)
    model, processor, _ = build(recipe, [load_source(recipe.data.train)], None, "cpu")
    path = tmp_path_factory.mktemp("quickstart") / "model"
    model.eval().save_pretrained(path, processor.tokenizer)
    with LiveServer(ServerConfig(checkpoint=str(path))) as live:  # no flags
        yield live


def test_the_context_is_the_llms_position_limit(quickstart_server):
    card = quickstart_server.client().models.list().data[0]
    assert card.max_model_len == 1024 == load_recipe(RECIPE).model.llm.config["max_position_embeddings"]


def test_a_three_turn_chat_with_a_system_prompt_and_two_images(quickstart_server, red_image, blue_image):
    client = quickstart_server.client()
    messages = [
        {"role": "system", "content": SYSTEM},
        image_message("What color is the circle in the first picture?", red_image, blue_image),
    ]
    for question in ["How many shapes are there?", "Is the square left or right of it?"]:
        reply = client.chat.completions.create(model="model", messages=messages, max_tokens=64, temperature=0)
        assert reply.choices[0].finish_reason in ("stop", "length") and reply.usage.completion_tokens <= 64
        messages += [{"role": "assistant", "content": reply.choices[0].message.content}]
        messages += [{"role": "user", "content": question}]
    # the third turn: streamed, two choices, a stop sequence
    options = {"max_tokens": 64, "n": 2, "stop": ["\n"], "temperature": 0.8, "seed": 1}
    stream = client.chat.completions.create(
        model="model", messages=messages, stream=True, stream_options={"include_usage": True}, **options
    )
    texts, usage = {0: "", 1: ""}, None
    for chunk in stream:
        usage = chunk.usage or usage
        for choice in chunk.choices:
            texts[choice.index] += choice.delta.content or ""
    assert all("\n" not in text for text in texts.values())
    assert usage.completion_tokens >= 2  # both choices generated
    # far past the recipe's 64-token training length, which was the server's context before
    assert usage.prompt_tokens > 2 * load_recipe(RECIPE).model.max_length


def test_sixteen_chats_at_once(quickstart_server, red_image):
    client = quickstart_server.client()
    messages = [{"role": "system", "content": SYSTEM}, image_message("What shape is it?", red_image)]

    def chat(_):
        return client.chat.completions.create(model="model", messages=messages, max_tokens=64, temperature=0)

    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        replies = list(pool.map(chat, range(16)))
    assert len({r.choices[0].message.content for r in replies}) == 1  # greedy: the same answer for everyone
