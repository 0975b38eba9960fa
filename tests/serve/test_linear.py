"""The LLM's linear layers while serving: prepacked oneDNN products agree with `nn.Linear` and give the
same greedy answers, a weight changed after packing is used as is, and the compiled one-row product is
a fused weight read while eager calls stay `nn.Linear`'s bit for bit."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from serve_kit import LiveServer, server_config
from test_engine import QUESTIONS, _reference, _run_staggered

from vlbridge.serve.engine import Engine
from vlbridge.serve.linear import ServingLinear, serving_linears
from vlbridge.testing import chat, tiny_model


def _packed_layer(seed: int = 0) -> ServingLinear:
    torch.manual_seed(seed)
    layer = torch.nn.Sequential(torch.nn.Linear(64, 96))
    assert serving_linears(layer, pack=True) == 64 * 96 * 4 / 2**20
    return layer[0]


def test_prepacked_products_agree_with_nn_linear_at_any_row_count(monkeypatch):
    layer = _packed_layer()
    calls, product = [], torch.ops.mkldnn._linear_pointwise
    monkeypatch.setattr(torch.ops.mkldnn, "_linear_pointwise", lambda *a: calls.append(a) or product(*a))
    with torch.inference_mode():
        for x in (torch.randn(1, 1, 64), torch.randn(16, 1, 64), torch.randn(3, 40, 64)):
            torch.testing.assert_close(layer(x), F.linear(x, layer.weight, layer.bias), rtol=1e-5, atol=1e-5)
    assert len(calls) == 3  # each through the packed weight
    x = torch.randn(2, 64, requires_grad=True)
    assert torch.equal(layer(x), F.linear(x, layer.weight, layer.bias))  # training: nn.Linear's
    assert len(calls) == 3
    assert sorted(layer.state_dict()) == ["bias", "weight"]  # the packed copy is not state


def test_a_weight_changed_after_packing_is_used_as_it_is_now():
    layer = _packed_layer()
    x = torch.randn(4, 64)
    with torch.no_grad():
        layer.weight.mul_(-2)  # e.g. an adapter merged after the engine started
        assert torch.equal(layer(x), F.linear(x, layer.weight, layer.bias))
        layer.weight = torch.nn.Parameter(torch.zeros(96, 64))
        assert torch.equal(layer(x), layer.bias.expand(4, -1))


def test_only_float32_cpu_weights_are_packed_and_no_pack_undoes_it():
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 8).to(torch.bfloat16))
    assert serving_linears(model, pack=True) == 8 * 8 * 4 / 2**20
    assert model[0].packed is not None and model[1].packed is None
    assert all(type(layer) is ServingLinear for layer in model)
    assert serving_linears(model, pack=False) == 0
    assert model[0].packed is None


def test_one_row_products_compiled_read_the_weight_once_and_eager_ones_are_nn_linear():
    torch.manual_seed(0)
    layer = torch.nn.Sequential(torch.nn.Linear(64, 96))
    serving_linears(layer, pack=False)
    x, rows = torch.randn(1, 1, 64), torch.randn(3, 64)
    weight, bias = layer[0].weight, layer[0].bias
    with torch.inference_mode():
        assert torch.equal(layer(x), F.linear(x, weight, bias))  # eager: bit for bit
        compiled = torch.compile(layer)
        torch.testing.assert_close(compiled(x), F.linear(x, weight, bias))
        torch.testing.assert_close(compiled(rows), F.linear(rows, weight, bias))


def test_a_prepacked_engine_answers_as_the_unpacked_model(red_image, blue_image):
    cases = [
        (chat(QUESTIONS[3]), [red_image], 16),
        (chat(QUESTIONS[0]), [blue_image], 10),
        (chat("hi", image_in=None), [], 6),
    ]
    unpacked = tiny_model("llama", "clip_vision_model")
    expected = [_reference(unpacked, m, i, n) for m, i, n in cases]
    vl = tiny_model("llama", "clip_vision_model")
    engine = Engine(vl[0], vl[1], context_length=256, max_batch_size=8)
    linears = [m for m in vl[0].language_model.modules() if isinstance(m, torch.nn.Linear)]
    assert engine.prepacked_mb > 0 and all(layer.packed is not None for layer in linears)
    assert _run_staggered(vl, cases, engine) == expected
    assert engine.stats.max_batch >= 2  # batched steps and a batched prefill, on the packed weights


def test_the_server_prepacks_unless_told_not_to_and_answers_the_same(checkpoint):
    body = {"messages": [{"role": "user", "content": QUESTIONS[1]}], "temperature": 0, "max_tokens": 12}
    answers, packed = [], []
    for prepack in (True, False):
        with LiveServer(server_config(checkpoint, prepack=prepack)) as live:
            answers.append(live.post(body).json()["choices"][0]["message"]["content"])
            packed.append(live.stats()["prepacked_mb"])
    assert packed[0] > 0 and packed[1] == 0
    assert answers[0] == answers[1] and answers[0]
