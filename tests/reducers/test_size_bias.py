"""Proportional attention in the LLM (`llm_proportional`): merged visual tokens weigh by their size.

Tiny llava models with a CLIP tower on an 8x8 patch grid (CLS dropped: 64 visual tokens before merging).
The reference for what the LLM must see is a causal mask written out here with log sizes on the visual
keys, passed to the same model without the option.
"""

from __future__ import annotations

import pytest
import torch

from vlbridge import testing as kit
from vlbridge.errors import ConfigError
from vlbridge.reducers.size_bias import biased_mask
from vlbridge.testing import chat, tiny_model, train_batch

ATOL = 1e-4
FRONTEND = {"type": "llava", "connector": {"merge": 1}, "vision": {"config": {"patch_size": 4}}}


def build(family: str = "llama", attention: str = "sdpa", **turbo):
    settings = {"type": "turbo", "r": 8, "min_tokens": 0, "llm_proportional": True, **turbo}
    llm = {"attn_implementation": attention}
    return tiny_model(family, frontend=FRONTEND, reducers=[settings], llm=llm)


def image_sizes(model) -> torch.Tensor:
    return model.reducers[0].image_sizes()


def test_key_bias_is_the_log_size_of_each_visual_token_and_the_sizes_cover_the_image(red_image):
    model, *_ = vl = build()
    batch = train_batch(vl, red_image)
    bias = model.llm_inputs(batch["input_ids"], batch["attention_mask"], batch["pixel_values"]).key_bias
    visual = model.frontend.visual_mask(batch["input_ids"])
    assert int(visual.sum()) == 64 - 8  # r = 8 in the one block before the feature layer
    sizes = bias[visual].exp()
    assert sizes.max() > 1 and torch.allclose(sizes.sum(), torch.tensor(64.0))  # every patch counted once
    assert (bias[~visual] == 0).all()


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_the_llm_attends_with_log_sizes_on_the_visual_keys(attention, red_image):
    weighted, *_ = vl = build(attention=attention)
    plain = build(attention=attention, llm_proportional=False)[0]  # same weights, official LLM side
    batch = train_batch(vl, red_image)
    logits = weighted(**batch).logits
    ids = batch["input_ids"]
    n = ids.shape[1]
    mask = torch.full((n, n), torch.finfo(torch.float32).min).triu(1)
    keys = torch.zeros(n)
    keys[weighted.frontend.visual_mask(ids)[0]] = image_sizes(weighted)[0].log()
    expected = plain(ids, pixel_values=batch["pixel_values"], attention_mask=(mask + keys)[None, None]).logits
    torch.testing.assert_close(logits, expected, atol=ATOL, rtol=0)
    assert not torch.allclose(logits, plain(**batch).logits, atol=1e-3)  # the bias changes the answer


def test_without_merges_the_option_changes_nothing(red_image):
    weighted, *_ = vl = build(r=0)
    plain = tiny_model("llama", frontend=FRONTEND)[0]
    batch = train_batch(vl, red_image)
    assert (
        weighted.llm_inputs(batch["input_ids"], batch["attention_mask"], batch["pixel_values"]).key_bias
        is None
    )
    assert torch.equal(weighted(**batch).logits, plain(**batch).logits)


def test_text_only_prompts_get_no_bias(red_image):
    model, _, processor = vl = build()
    model(**train_batch(vl, red_image))  # an image batch first: its sizes must not leak
    text = processor([chat("hi", image_in=None)], [[]])
    assert model.llm_inputs(text["input_ids"], text["attention_mask"], text["pixel_values"]).key_bias is None


@pytest.mark.parametrize("positions", ["contiguous", "original"])
def test_cached_decoding_and_padded_batches_keep_the_bias(positions, red_image, blue_image):
    vl = build("qwen2", positions=positions, order="raster")
    kit.assert_cached_decode_matches_recompute(vl, "What shape is the blue object?", red_image, atol=ATOL)
    conversations = [chat("What color is the circle?"), chat("Is the yellow circle left or right of it?")]
    kit.assert_padded_batch_matches_one_by_one(vl, conversations, [[red_image], [blue_image]], atol=ATOL)


def test_beam_search_repeats_each_prompts_bias(red_image):
    query, key = torch.zeros(4, 2, 2, 8), torch.zeros(4, 2, 5, 8)  # two prompts, two beams each
    bias = torch.tensor([[0.0, 1.0, 0.0], [0.0, 0.0, 2.0]])
    out = biased_mask(None, bias, query, key)
    assert out.shape == (4, 1, 2, 5)
    assert out[:, 0, -1].tolist() == [[0, 1, 0, 0, 0]] * 2 + [[0, 0, 2, 0, 0]] * 2
    assert out[0, 0, 0, -1] == torch.finfo(torch.float32).min  # causal: the key after the query is hidden
    model, _, processor = build()
    inputs = processor([chat("What color is it?")], [[red_image]])
    beams = model.generate(**inputs, max_new_tokens=3, num_beams=2, num_return_sequences=2, do_sample=False)
    assert beams.shape[0] == 2


@pytest.mark.parametrize(
    ("family", "turbo", "extra", "match_text"),
    [
        ("llama", {}, [{"type": "pmod"}], "in-LLM reducer"),
        ("gemma2", {}, [], "sliding-window"),
    ],
    ids=["with-pmod", "sliding-window"],
)
def test_unsupported_llms_are_refused_with_the_setting_to_change(family, turbo, extra, match_text):
    settings = {"type": "turbo", "r": 8, "min_tokens": 0, "llm_proportional": True, **turbo}
    with pytest.raises(ConfigError, match=f"llm_proportional=true cannot be used: .*{match_text}"):
        tiny_model(family, frontend=FRONTEND, reducers=[settings, *extra])
