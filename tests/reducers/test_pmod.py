"""p-MoD: the spec's testable invariants (pmod.md §9), its code-fidelity details (§4, §12) and the
model-level contract (LoRA, checkpoints, errors). Tiny random models with 4 decoder layers; routers are
randomised where selection must not be a tie. The family × front-end matrix is in test_llm_reducers.py.
"""

from __future__ import annotations

import math

import pytest
import torch
from pydantic import ValidationError
from transformers import StaticCache

from vlbridge.checkpoint import REDUCERS_FILE
from vlbridge.errors import ConfigError
from vlbridge.factory import load_pretrained
from vlbridge.llm_calls import returned_cache, with_cache
from vlbridge.recipe import LoRASettings, StageConfig
from vlbridge.reducers import Meter, parse_reducer_spec
from vlbridge.reducers.pmod import PMod, PModConfig, host_budget, keep_budget, router_weights, select_top
from vlbridge.reducers.schedules import decay_ratios, layout_ratios
from vlbridge.testing import chat, tiny_model, train_batch
from vlbridge.training.stages import apply_stage

SPEC_R = [
    0.8445,
    0.8061,
    0.7645,
    0.7202,
    0.6737,
    0.6253,
    0.5757,
    0.5253,
    0.4747,
    0.4243,
    0.3747,
    0.3263,
    0.2798,
    0.2355,
    0.1939,
    0.1555,
] + [0.15] * 8  # fmt: skip  (pmod.md §4: layers 8..31)


def build(family="llama", reducer=None, layers=4, seed=0, frontend=None, **llm):
    """A tiny model whose llava connector keeps all 16 patch tokens of a 32-px image."""
    return tiny_model(
        family,
        seed=seed,
        llm={"config": {"num_hidden_layers": layers}, **llm},
        frontend=frontend or {"type": "llava", "connector": {"merge": 1}},
        reducers=[{"type": "pmod", **(reducer or {})}] if reducer is not False else [],
    )


def randomize_routers(model, std=1.0, seed=1):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for router in model.reducers[0].routers.values():
            router.weight.copy_(torch.randn(router.weight.shape, generator=gen) * std)
            router.bias.copy_(torch.randn(router.bias.shape, generator=gen) * std)


def keep_masks(model, inputs) -> dict[int, torch.Tensor]:
    """{layer: [B, T] kept mask} of one metered forward."""
    model.meter = Meter()
    with torch.no_grad():
        model(**inputs)
    masks = {layer: keep for layer, keep in model.meter.records["pmod.keep"]}
    model.meter = None
    return masks


class LayerTap:
    """Input, keyword arguments and output of one decoder layer on the last call."""

    def __init__(self, model, layer: int) -> None:
        self.layer = model.language_model.model.layers[layer]
        self.layer.register_forward_pre_hook(self._pre, with_kwargs=True)
        self.layer.register_forward_hook(self._post)

    def _pre(self, module, args, kwargs):
        self.x, self.kwargs = args[0], kwargs

    def _post(self, module, args, output):
        self.out = output


# -- §4 / invariant 1: progressive ratio decay --------------------------------------------------------
def test_default_prd_on_32_layers_matches_the_official_schedule():
    ratios = PModConfig().layer_ratios(32)
    routed = [i for i, r in enumerate(ratios) if r is not None]
    assert routed == list(range(8, 32))
    assert [ratios[i] for i in routed] == pytest.approx(SPEC_R, abs=1e-4)
    assert all(a >= b for a, b in zip(ratios[8:], ratios[9:], strict=False))
    assert all(0.15 <= ratios[i] <= 0.85 for i in routed)
    mean = sum(1.0 if r is None else r for r in ratios) / 32
    assert mean == pytest.approx(0.5375, abs=5e-5)


def test_decay_span_31_is_the_official_hard_code_and_l_minus_1_generalises_it():
    assert PModConfig(decay_span=31).layer_ratios(32) == PModConfig().layer_ratios(32)
    for depth in (24, 40):
        cos = decay_ratios("shiftedcos", depth, mean=0.5, max_ratio=0.85, min_ratio=0.15)
        assert cos[0] is None and cos[-1] == 0.15
        official = decay_ratios("shiftedcos", depth, mean=0.5, max_ratio=0.85, min_ratio=0.15, span=31)
        assert official != cos


def test_shiftedlinear_and_fixed_layouts():
    linear = decay_ratios("shiftedlinear", 32, mean=0.5, max_ratio=0.85, min_ratio=0.15)
    rho = [1 - layer / 31 for layer in range(32)]  # 0.5 − l/31 + r̄
    assert linear == [max(r, 0.15) if r <= 0.85 else None for r in rho]
    assert layout_ratios("deep_all", 8, 0.5) == [None, None, 0.5, 0.5, 0.5, 0.5, 0.5, None]
    assert layout_ratios("deep_all_include_last", 4, 0.3) == [None, None, 0.3, 0.3]
    assert layout_ratios("interleave", 5, 0.5) == [None, 0.5, None, 0.5, None]
    assert PModConfig(schedule="interleave", ratio=0.4).layer_ratios(4) == [None, 0.4, None, 0.4]


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"schedule": "explicit"}, "'explicit' and ratios go together"),
        ({"ratios": [None, 0.5]}, "'explicit' and ratios go together"),
        ({"schedule": "explicit", "ratios": [None, 1.5]}, r"ratios must be in \(0, 1\]"),
        ({"schedule": "deep_all", "ratio": 0.0}, "fixed layout keeps"),
        ({"weight_norm": "relu"}, "weight_norm"),
        ({"bogus": 1}, "bogus"),
    ],
)
def test_bad_configs_name_the_field(fields, message):
    with pytest.raises(ValidationError, match=message):
        PModConfig(**fields)


def test_cli_spec_builds_the_config():
    config = PModConfig.model_validate(parse_reducer_spec("pmod:schedule=explicit,ratios=[null,1,0.5,0.5]"))
    assert config.ratios == [None, 1, 0.5, 0.5]


# -- §3 / §12: budget, TanhNorm, selection ------------------------------------------------------------
def test_budget_is_the_codes_float32_truncation_unless_floor_is_asked():
    r10 = math.cos(10 * math.pi / 31) / 2 + 0.5  # 0.76448…
    assert host_budget([2365], r10) == [1808]  # float32(2365)·R rounds up to 1808.0
    assert host_budget([2365], r10, "floor") == [1807]
    assert host_budget([576, 0, 7], 0.15) == [86, 0, 1]
    n = torch.arange(8193)  # the device-side tensor form is the same arithmetic
    assert keep_budget(n, r10).tolist() == host_budget(n.tolist(), r10)
    assert (keep_budget(n, r10) != keep_budget(n, r10, "floor")).sum() == 3  # the code's float32 quirk


def test_tanhnorm_is_bounded_and_exactly_one_for_a_zero_router_and_for_text():
    logits = torch.linspace(-6, 6, 101)[None]
    visual = torch.ones_like(logits, dtype=torch.bool)
    weight = router_weights(logits, visual, "tanh", 0.2, 1.0)
    assert (weight > 0.8).all() and (weight < 1.2).all()
    assert torch.equal(router_weights(torch.zeros(1, 5), visual[:, :5], "tanh", 0.2, 1.0), torch.ones(1, 5))
    text = torch.zeros_like(visual)
    assert torch.equal(router_weights(logits, text, "tanh", 0.2, 1.0), torch.ones_like(logits))


def test_softmax_norm_normalises_over_each_rows_vision_tokens():
    logits = torch.randn(2, 6)
    visual = torch.tensor([[0, 1, 1, 1, 0, 0], [1, 1, 0, 0, 0, 0]], dtype=torch.bool)
    weight = router_weights(logits, visual, "softmax", 1.0, 0.0)
    assert torch.allclose(weight[visual].sum(), torch.tensor(2.0))  # each row's vision weights sum to 1
    assert torch.equal(weight[~visual], torch.ones(int((~visual).sum())))


def test_selection_uses_raw_logits_per_row_budgets_and_breaks_ties_by_position():
    logits = torch.tensor([[9.0, 3.0, 1.0, 3.0, 2.0], [0.0, 0.0, 0.0, 0.0, 0.0]])
    visual = torch.tensor([[0, 1, 1, 1, 1], [0, 1, 1, 1, 1]], dtype=torch.bool)
    selected = select_top(logits, visual, torch.tensor([2, 3]), 3)
    assert selected[0].tolist() == [False, True, False, True, False]  # the text token's 9 is no target
    assert selected[1].tolist() == [False, True, True, True, False]  # all tie: earliest first
    saturated = torch.tensor([[0.0, 40.0, 41.0, 39.0]])  # tanh = 1 for all three in float32
    assert select_top(saturated, torch.tensor([[0, 1, 1, 1]], dtype=torch.bool), torch.tensor([1]), 1)[
        0
    ].tolist() == [
        False,
        False,
        True,
        False,
    ]


# -- invariant 3: all R = 1 with a zero router is the dense model -------------------------------------
@pytest.mark.parametrize("attention", ["eager", "sdpa"])
def test_all_ratios_one_with_a_zero_router_is_the_dense_model(attention, red_image):
    explicit = {"schedule": "explicit", "ratios": [None, 1.0, 1.0, 1.0]}
    routed, _, processor = build(reducer=explicit, attn_implementation=attention)
    dense, _, _ = build(reducer=False, attn_implementation=attention)
    inputs = processor([chat("What color is the circle?")], [[red_image]])
    with torch.no_grad():
        got, want = routed(**inputs).logits, dense(**inputs).logits
    if attention == "eager":
        assert torch.equal(got, want)
    else:
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


def test_text_only_prompts_never_route(red_image):
    routed, _, processor = build()
    randomize_routers(routed)
    dense, _, _ = build(reducer=False)
    inputs = processor([chat("What color is the circle?", image_in=None)], [[]])
    with torch.no_grad():
        assert torch.equal(routed(**inputs).logits, dense(**inputs).logits)
    assert torch.equal(
        routed.generate(**inputs, max_new_tokens=4, do_sample=False),
        dense.generate(**inputs, max_new_tokens=4, do_sample=False),
    )


# -- invariants 4, 5, 7, 9: counts, outputs, cache, positions ----------------------------------------
@pytest.fixture(scope="module")
def solo_batch():
    """p-MoD on the solo front-end: images of two sizes give rows with different vision counts."""
    from PIL import Image

    vl = build(frontend={"type": "solo"})
    randomize_routers(vl[0])
    images = [Image.new("RGB", (32, 32), (200, 30, 30)), Image.new("RGB", (48, 40), (20, 200, 30))]
    inputs = vl[2]([chat("What?"), chat("What color is the big circle?")], [[images[0]], [images[1]]])
    return vl, inputs


def test_kept_targets_are_the_budget_and_every_real_text_token_is_kept(solo_batch):
    (model, _, _), inputs = solo_batch
    visual = model.frontend.visual_mask(inputs["input_ids"])
    real = inputs["attention_mask"].bool()
    assert visual.sum(1).tolist() == [19, 34]  # 4x4 patches + 3 row separators; 6x5 + 4
    for layer, keep in keep_masks(model, inputs).items():
        ratio = model.reducers[0].ratios[layer]
        assert (keep & visual).sum(1).tolist() == host_budget([19, 34], ratio)
        assert torch.equal(keep & ~visual, real & ~visual)  # text kept, padding never


def test_skipped_vision_is_scaled_by_omega_and_padding_passes_through(solo_batch):
    (model, _, _), inputs = solo_batch
    layer = 2
    tap = LayerTap(model, layer)
    keep = keep_masks(model, inputs)[layer]
    visual = model.frontend.visual_mask(inputs["input_ids"])
    logits = model.reducers[0].routers[str(layer)](tap.x).squeeze(-1)
    omega = router_weights(logits, visual, "tanh", 0.2, 1.0)
    skipped, padding = visual & ~keep, ~inputs["attention_mask"].bool()
    assert skipped.any() and padding.any()
    assert torch.equal(tap.out[skipped], (tap.x * omega[..., None])[skipped])
    assert torch.equal(tap.out[padding], tap.x[padding])


def test_cache_holds_text_plus_kept_vision_per_layer_and_grows_by_one(red_image):
    model, _, processor = build()
    randomize_routers(model)
    inputs = processor([chat("What color is the circle?")], [[red_image]])
    seq, visual = inputs["input_ids"].shape[1], 16
    out = model.generate(
        **inputs, max_new_tokens=3, min_new_tokens=3, do_sample=False, return_dict_in_generate=True
    )
    ratios = model.reducers[0].ratios
    expected = [seq if r is None else seq - visual + host_budget([visual], r)[0] for r in ratios]
    assert expected[1:] != [seq] * 3  # the schedule does shorten layers 1-3
    lengths = [returned_cache(out).get_seq_length(layer) for layer in range(4)]
    assert lengths == [n + 2 for n in expected]  # the last generated token is never fed back


def test_rope_sees_the_original_positions_of_kept_tokens(red_image):
    model, _, processor = build()
    randomize_routers(model)
    seen = {}
    attn = model.language_model.model.layers[3].self_attn
    attn.register_forward_pre_hook(lambda m, a, kw: seen.update(kw), with_kwargs=True)
    inputs = processor([chat("What color is the circle?")], [[red_image]])
    keep = keep_masks(model, inputs)[3][0]
    original = keep.nonzero()[:, 0]
    assert torch.equal(seen["position_ids"][0], original)
    rotary = model.language_model.model.rotary_emb
    cos, sin = rotary(seen["hidden_states"], original[None])
    assert torch.equal(seen["position_embeddings"][0], cos) and torch.equal(
        seen["position_embeddings"][1], sin
    )
    assert (original.diff() > 1).any()  # skipped tokens leave gaps


# -- invariant 6: router scale invariance -------------------------------------------------------------
def test_scaling_the_router_keeps_selection_and_text_outputs(red_image):
    model, _, processor = build()
    randomize_routers(model)
    inputs = processor([chat("What color is the circle?")], [[red_image]])
    tap = LayerTap(model, 2)
    before_keep = keep_masks(model, inputs)
    before = tap.out.clone()
    with torch.no_grad():
        router = model.reducers[0].routers["2"]
        router.weight.mul_(3.0), router.bias.mul_(3.0)
    after_keep = keep_masks(model, inputs)
    text = ~model.frontend.visual_mask(inputs["input_ids"])
    assert torch.equal(before_keep[2], after_keep[2])
    torch.testing.assert_close(tap.out[text], before[text], atol=1e-6, rtol=0)
    assert not torch.equal(tap.out[~text], before[~text])  # ω itself changed


# -- invariant 10 and training --------------------------------------------------------------------------
def test_a_loss_on_skipped_tokens_alone_reaches_the_router(red_image):
    model, _, processor = build()
    randomize_routers(model, std=0.1)
    tap = LayerTap(model, 2)
    inputs = processor([chat("What color is the circle?")], [[red_image]])
    keep = keep_masks(model, inputs)[2]
    skipped = model.frontend.visual_mask(inputs["input_ids"]) & ~keep
    model(**inputs)
    tap.out[skipped].sum().backward()
    router = model.reducers[0].routers["2"]
    assert router.weight.grad.abs().sum() > 0 and router.bias.grad.abs().sum() > 0


def test_gradient_checkpointing_recomputes_the_same_routing(red_image, blue_image):
    grads = []
    for checkpointing in (False, True):
        vl = build("qwen2")
        model = vl[0]
        randomize_routers(model, std=0.1)
        model.train()
        if checkpointing:
            model.language_model.activation_checkpointing_enable({"use_reentrant": False})
        model(**train_batch(vl, red_image)).loss.backward()
        grads.append([r.weight.grad.clone() for r in model.reducers[0].routers.values()])
    for plain, recomputed in zip(*grads, strict=True):
        torch.testing.assert_close(recomputed, plain, atol=1e-6, rtol=1e-5)
    # Vision outputs of the last layer reach no text logit, so its router learns nothing from a text loss.
    assert [bool(g.abs().sum() > 0) for g in grads[0]] == [True, True, False]


def test_routers_train_under_lora_and_are_saved_with_the_model(red_image, tmp_path):
    vl = build("qwen2")
    model, tokenizer, processor = vl
    plain_keys = set(build("qwen2", reducer=False)[0].language_model.state_dict())
    stage = StageConfig(name="sft", modules={"llm": "lora", "routers": "full"}, steps=1)
    reports = {r.name: r for r in apply_stage(model, stage, LoRASettings(r=4))}
    assert reports["routers"].trainable == 3 * (64 + 1)  # Linear(D, 1) with bias on layers 1-3
    model.train()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0)
    for _ in range(2):  # the first step moves LoRA B off zero; the routers move at once
        model(**train_batch(vl, red_image)).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    routers = model.reducers[0].routers
    assert routers["1"].weight.abs().sum() > 0 and routers["2"].weight.abs().sum() > 0
    model.eval()
    model.save_pretrained(tmp_path / "ckpt", tokenizer)
    assert (tmp_path / "ckpt" / REDUCERS_FILE).is_file()
    assert set(model.merge_lora().language_model.state_dict()) == plain_keys  # the LLM's keys untouched
    loaded, _ = load_pretrained(tmp_path / "ckpt")
    for name, router in model.reducers[0].routers.items():
        assert torch.equal(loaded.reducers[0].routers[name].weight, router.weight)
    inputs = processor([chat("What color?")], [[red_image]])
    with torch.no_grad():
        torch.testing.assert_close(loaded(**inputs).logits, model(**inputs).logits, atol=1e-5, rtol=0)


def test_layer_delta_scales_the_whole_update_of_kept_vision_tokens(red_image):
    explicit = {"schedule": "explicit", "ratios": [None, 1.0, 1.0, 1.0]}
    results = {}
    for scope in ("mlp", "layer_delta"):
        model, _, processor = build(reducer={**explicit, "string_scope": scope})
        randomize_routers(model, std=0.5)
        tap = LayerTap(model, 2)
        inputs = processor([chat("What color is the circle?")], [[red_image]])
        with torch.no_grad():
            model(**inputs)
            layer = tap.layer
            mlp_out: dict[str, torch.Tensor] = {}
            hook = layer.mlp.register_forward_hook(lambda m, a, o, store=mlp_out: store.update(m=o))
            plain = layer.forward.inner(tap.x, **tap.kwargs)  # the unwrapped layer, ω not applied
            hook.remove()
            logits = model.reducers[0].routers["2"](tap.x).squeeze(-1)
        visual = model.frontend.visual_mask(inputs["input_ids"])
        omega = router_weights(logits, visual, "tanh", 0.2, 1.0)[..., None]
        results[scope] = (tap.out, tap.x, plain, mlp_out["m"], omega, visual)
    out, x, plain, m, omega, visual = results["mlp"]
    torch.testing.assert_close(out[visual], (plain + (omega - 1) * m)[visual], atol=1e-5, rtol=0)
    torch.testing.assert_close(out[~visual], plain[~visual], atol=1e-6, rtol=0)
    out, x, plain, m, omega, visual = results["layer_delta"]
    torch.testing.assert_close(out[visual], (x + omega * (plain - x))[visual], atol=1e-5, rtol=0)


# -- the meter ------------------------------------------------------------------------------------------
def test_meter_records_per_layer_counts_only_when_switched_on(red_image):
    model, _, processor = build()
    inputs = processor([chat("What color is the circle?")], [[red_image]])
    with torch.no_grad():
        model(**inputs)
    assert model.meter is None
    model.meter = Meter()
    with torch.no_grad():
        model(**inputs)
    layers = model.meter.llm_layers()
    seq = inputs["input_ids"].shape[1]
    assert sorted(layers) == [1, 2, 3]
    for layer, count in layers.items():
        assert count.visual == tuple(host_budget([16], model.reducers[0].ratios[layer]))
        assert count.tokens == (seq - 16 + count.visual[0],)
    assert model.meter.visual_per_layer(4, [16]) == [[16], [12], [4], [2]]


# -- errors ------------------------------------------------------------------------------------------------
def test_static_cache_is_refused(red_image):
    model, _, processor = build()
    inputs = processor([chat("What color?")], [[red_image]])
    cache = StaticCache(config=model.language_model.config, max_cache_len=64)
    with pytest.raises(ConfigError, match="DynamicCache; got StaticCache"):
        model(**inputs, **with_cache(model.language_model, cache))


def test_a_4d_attention_mask_is_refused(red_image):
    model, _, processor = build()
    inputs = processor([chat("What color?")], [[red_image]])
    seq = inputs["input_ids"].shape[1]
    inputs["attention_mask"] = torch.ones(1, 1, seq, seq, dtype=torch.bool).tril()
    with pytest.raises(ConfigError, match="2-D padding mask"):
        model(**inputs)


@pytest.mark.parametrize(
    "reducer, message",
    [
        ({"schedule": "explicit", "ratios": [0.5, None, None, None]}, "would reduce decoder layer 0"),
        ({"schedule": "explicit", "ratios": [None, None, None]}, "has 3 entries but the LLM has 4"),
        ({"schedule": "explicit", "ratios": [None, None, None, None]}, "routes no layer"),
    ],
)
def test_schedule_errors_at_build_time(reducer, message):
    with pytest.raises(ConfigError, match=message):
        build(reducer=reducer)


def test_two_in_llm_reducers_on_one_layer_are_refused():
    with pytest.raises(ConfigError, match="already reduced by 'pmod'"):
        tiny_model(llm={"config": {"num_hidden_layers": 4}}, reducers=[{"type": "pmod"}, {"type": "fastv"}])


def test_attention_backends_without_explicit_masks_are_refused():
    model, _, _ = build(reducer=False)
    model.language_model.config._attn_implementation = "flash_attention_2"  # as a CUDA build would pick
    with pytest.raises(ConfigError, match="uses 'flash_attention_2': set model.llm.attn_implementation"):
        PMod(PModConfig()).attach(model)


def test_gemma2_sliding_window_layers_stay_dense():
    model, _, _ = build("gemma2")
    kinds = model.reducers[0].kinds
    assert kinds == ["sliding_attention", "full_attention"] * 2
    assert [r is None for r in model.reducers[0].ratios] == [True, False, True, False]


def test_an_empty_kept_set_runs_nothing_and_still_decodes(red_image):
    """k = 0 for every sample and no text (§10: floor can give 0): the layer is skipped entirely."""
    model, _, processor = build(reducer={"schedule": "explicit", "ratios": [None, 0.05, 0.05, 0.05]})
    randomize_routers(model)
    pixels = processor([chat("x")], [[red_image]])["pixel_values"]
    ids = torch.full((1, 16), model.frontend.image_token_id)  # the prompt is the image alone
    out = model.generate(
        input_ids=ids,
        pixel_values=pixels,
        max_new_tokens=3,
        min_new_tokens=3,
        do_sample=False,
        return_dict_in_generate=True,
        output_logits=True,
    )
    assert [returned_cache(out).get_seq_length(i) for i in range(4)] == [18, 2, 2, 2]
    for step, token in enumerate(out.sequences[0]):
        full = torch.cat([ids[0], out.sequences[0, :step]])[None]
        with torch.no_grad():
            logits = model(full, torch.ones_like(full), pixels).logits[0, -1]
        torch.testing.assert_close(out.logits[step][0], logits, atol=1e-4, rtol=0)
        assert int(logits.argmax()) == int(token)
