"""The in-LLM reducers (p-MoD, FastV) across the LLM family matrix and the front-ends: the conformance
kit's KV-cache, padded-batch and save/load contracts, and the per-layer cache bookkeeping they share.

Every model has 4 decoder layers; p-MoD routers are randomised so selections are not ties. FastV's
cached decoding deliberately differs from a cache-free recompute (test_fastv.py checks it against its
own reference), so only p-MoD takes the recompute check.
"""

from __future__ import annotations

import pytest
import torch
from PIL import Image
from transformers import DynamicCache

from vlbridge.errors import DataError
from vlbridge.llm_calls import returned_cache, with_cache
from vlbridge.testing import (
    TINY_LLM_CONFIGS,
    assert_cached_decode_matches_recompute,
    assert_padded_batch_matches_one_by_one,
    assert_save_load_round_trip,
    chat,
    greedy,
    tiny_model,
    train_batch,
)

REDUCERS = {"pmod": {"type": "pmod"}, "fastv": {"type": "fastv", "k": 2, "r": 0.5}}
FRONTENDS = {
    "llava": {"type": "llava", "connector": {"merge": 1}},
    "solo": {"type": "solo"},
    "inf_llava": {"type": "inf_llava"},
    "adem_vl": {"type": "adem_vl"},
}
MATRIX = [
    (family, reducer)
    for family in TINY_LLM_CONFIGS
    for reducer in REDUCERS
    if not (family == "gemma2" and reducer == "fastv")  # FastV refuses sliding windows (test_fastv.py)
]


def build(family: str, reducer: str, frontend: str = "llava", seed: int = 0):
    vl = tiny_model(
        family,
        seed=seed,
        llm={"config": {"num_hidden_layers": 4}},
        frontend=FRONTENDS[frontend],
        reducers=[REDUCERS[reducer]],
    )
    model = vl[0]
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for router in getattr(model.reducers[0], "routers", {}).values() if reducer == "pmod" else []:
            router.weight.copy_(torch.randn(router.weight.shape, generator=gen))
    return vl


def images(frontend: str) -> list[Image.Image]:
    """Two images; different sizes give solo rows different numbers of vision tokens."""
    sizes = [(32, 32), (48, 40)] if frontend == "solo" else [(32, 32), (32, 32)]
    sizes = [(96, 96), (96, 96)] if frontend == "inf_llava" else sizes
    colors = [(200, 30, 30), (20, 60, 230)]
    return [Image.new("RGB", size, color) for size, color in zip(sizes, colors, strict=True)]


def conversations():
    return [chat("What?"), chat("What color is the big circle on the left?")]


@pytest.mark.parametrize("family, reducer", MATRIX)
def test_family_matrix(family, reducer, tmp_path):
    vl = build(family, reducer)
    first, second = images("llava")
    if reducer == "pmod":
        assert_cached_decode_matches_recompute(vl, "What color is the circle?", first)
    assert_padded_batch_matches_one_by_one(vl, conversations(), [[first], [second]], prompt_logits=True)
    assert_save_load_round_trip(vl, train_batch(vl, first), first, tmp_path / "ckpt")


@pytest.mark.parametrize("frontend", ["solo", "inf_llava", "adem_vl"])
@pytest.mark.parametrize("reducer", list(REDUCERS))
def test_frontends_that_put_vision_tokens_in_the_sequence(frontend, reducer):
    vl = build("qwen2", reducer, frontend)
    first, second = images(frontend)
    if reducer == "pmod":
        assert_cached_decode_matches_recompute(vl, "What color is the circle?", first)
    assert_padded_batch_matches_one_by_one(vl, conversations(), [[first], [second]], prompt_logits=True)


@pytest.mark.parametrize("reducer", list(REDUCERS))
def test_beam_search_and_several_returns(reducer):
    model, _, processor = build("llama", reducer)
    first, second = images("llava")
    inputs = processor(conversations(), [[first], [second]])
    beams = model.generate(**inputs, max_new_tokens=4, do_sample=False, num_beams=2, num_return_sequences=2)
    assert beams.shape[0] == 4
    for row, single in enumerate([[first], [second]]):  # beam search on a batch equals each prompt alone
        alone = processor([conversations()[row]], [single])
        out = model.generate(**alone, max_new_tokens=4, do_sample=False, num_beams=2, num_return_sequences=2)
        assert torch.equal(beams[2 * row : 2 * row + 2, : out.shape[1]], out)


@pytest.mark.parametrize("reducer", list(REDUCERS))
def test_a_cache_spliced_outside_the_model_is_a_data_error(reducer):
    """Serving engines that merge caches row-wise assume one layout for all layers; reduced layers differ."""
    model, _, processor = build("llama", reducer)
    inputs = processor([chat("What color?")], [[images("llava")[0]]])
    cache = DynamicCache()
    with torch.no_grad():
        model(**inputs, **with_cache(model.language_model, cache), use_cache=True)
        for layer in cache.layers:  # pad every layer to layer 0's length, as a row merge would
            width = cache.layers[0].keys.shape[2]
            layer.keys = torch.nn.functional.pad(layer.keys, (0, 0, width - layer.keys.shape[2], 0))
            layer.values = torch.nn.functional.pad(layer.values, (0, 0, width - layer.values.shape[2], 0))
        step = torch.ones(1, inputs["input_ids"].shape[1] + 1, dtype=torch.long)
        with pytest.raises(DataError, match="KV cache holds"):
            model.language_model(
                **with_cache(model.language_model, cache, input_ids=inputs["input_ids"][:, -1:]),
                attention_mask=step,
            )
    assert model.reducers[0].aligned_cache is False


@pytest.mark.parametrize("reducer", list(REDUCERS))
def test_a_manual_decode_loop_on_the_cache_a_forward_returns_equals_generate(reducer):
    """transformers creates the cache inside the decoder stack when none is passed: the reduced layers'
    bookkeeping must follow that cache too."""
    model, _, processor = build("qwen2", reducer)
    inputs = processor([chat("What color is the circle?")], [[images("llava")[0]]])
    out = greedy(model, inputs, max_new_tokens=4)
    with torch.no_grad():
        step = model(**inputs, use_cache=True)
        mask = inputs["attention_mask"]
        for index, token in enumerate(out.sequences[0]):
            torch.testing.assert_close(step.logits[0, -1], out.logits[index][0], atol=1e-5, rtol=0)
            mask = torch.cat([mask, torch.ones(1, 1, dtype=mask.dtype)], dim=1)
            step = model.language_model(
                **with_cache(model.language_model, returned_cache(step), input_ids=token.view(1, 1)),
                attention_mask=mask,
            )
