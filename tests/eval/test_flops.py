"""Analytic FLOPs (eval/flops.py) against torch's FLOP counter on the real forward, and the counter's
CPU attention gap that vlbridge closes."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from vlbridge.eval.efficiency import cache_lengths, count_flops, count_flops_by_module
from vlbridge.eval.flops import (
    DecoderShape,
    connector_flops,
    decoder_layer_flops,
    llm_prefill_flops,
    reducer_overhead_flops,
    vit_prefill_flops,
    vit_tokens,
)
from vlbridge.llm_calls import returned_cache
from vlbridge.testing import TINY_LLM_CONFIGS, chat, tiny_model

PARTS = ("VLModel.frontend", "VLModel.language_model")  # routers and scores run inside the LLM


def test_cpu_attention_is_counted_like_the_cuda_kernels():
    q, kv = torch.randn(2, 4, 17, 16), torch.randn(2, 2, 17, 16)
    sdpa = torch.nn.functional.scaled_dot_product_attention
    assert count_flops(lambda: sdpa(q, kv, kv, enable_gqa=True)) == 4 * 2 * 4 * 17 * 17 * 16
    mask = torch.ones(17, 17, dtype=torch.bool).tril()
    assert count_flops(lambda: sdpa(q, q, q, attn_mask=mask)) == 4 * 2 * 4 * 17 * 17 * 16


def test_decoder_formula_is_the_specs_for_full_width_attention():
    shape = DecoderShape(hidden=4096, q_width=4096, kv_width=4096, intermediate=11008, vocab=32000, layers=32)
    n, d, f = 631, 4096, 11008
    assert decoder_layer_flops(shape, n) == 2 * n * (2 * d * d + 2 * d * d + 3 * d * f) + 4 * n * n * d


CASES = [  # FastV refuses Gemma-2's sliding-window layers (test_fastv.py)
    (family, reducer)
    for family in TINY_LLM_CONFIGS
    for reducer in (None, "pmod", "fastv")
    if (family, reducer) != ("gemma2", "fastv")
]


@pytest.mark.parametrize("family, reducer", CASES)
def test_analytic_prefill_flops_equal_the_counter(family, reducer):
    model, _, processor = tiny_model(
        family,
        llm={"config": {"num_hidden_layers": 4}},
        frontend={"type": "llava", "connector": {"merge": 1}},
        reducers=[{"type": reducer}] if reducer else [],
    )
    image = Image.new("RGB", (32, 32), (200, 30, 30))
    inputs = processor([chat("What?"), chat("What color is the circle?")], [[image], [image]])
    out = {}

    def prefill():
        with torch.no_grad():
            out["past"] = returned_cache(model(**inputs, use_cache=True))

    counted = count_flops_by_module(prefill, PARTS)
    batch, seq = inputs["input_ids"].shape
    shape = DecoderShape.of(model.language_model.config)
    lengths = cache_lengths(out["past"])
    llm = llm_prefill_flops(shape, lengths, batch=batch, logits=seq)
    llm += reducer_overhead_flops(model.reducers, shape, batch, seq)
    assert counted["VLModel.language_model"] == llm
    tower = model.frontend.vision_tower
    config = tower.model.config
    front = vit_prefill_flops(config, vit_tokens(config, tower.family.has_cls), images=batch)
    front += connector_flops(model.frontend.connector, batch * 16)
    assert counted["VLModel.frontend"] == front
    assert counted["other"] == 0
    if reducer:
        assert min(lengths[1:]) < seq  # the reducer did shorten layers
