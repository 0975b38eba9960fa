"""FastV: the invariants of reduction_baselines.md §A on tiny random models (4 decoder layers, K = 2).

Decoding uses variant (iii): the prefill's choice is kept, so later steps are checked against a
reference that runs the plain layers with the dropped keys masked from layer K on, not against a
recompute (which would re-score with every new last token, as the paper's cache-free code does).
"""

from __future__ import annotations

import pytest
import torch

from vlbridge.errors import ConfigError
from vlbridge.llm_calls import returned_cache
from vlbridge.reducers import Meter
from vlbridge.reducers.fastv import FastVConfig, keep_count, last_query_attention
from vlbridge.testing import TINY_LLM_CONFIGS, chat, greedy, tiny_model

K = 2


def build(family="llama", reducer=None, attention="eager", layers=4, frontend=None):
    return tiny_model(
        family,
        llm={"config": {"num_hidden_layers": layers}, "attn_implementation": attention},
        frontend=frontend or {"type": "llava", "connector": {"merge": 1}},
        reducers=[{"type": "fastv", "k": K, **(reducer or {})}] if reducer is not False else [],
    )


def metered(model, inputs):
    model.meter = Meter()
    with torch.no_grad():
        out = model(**inputs)
    keep = model.meter.last("fastv.keep")[1]
    model.meter = None
    return out, keep


@pytest.fixture(scope="module")
def image():
    from PIL import Image

    return Image.new("RGB", (32, 32), (200, 30, 30))


def test_keep_count_rounds_like_the_official_code():
    assert keep_count(torch.tensor([576, 576, 576]), 0.5).tolist() == [288] * 3
    assert [int(keep_count(torch.tensor([576]), r)) for r in (0.25, 0.75)] == [432, 144]
    n = torch.arange(2000)
    for r in (0.5, 0.3, 0.75, 0.1):  # the official Python round(V·(1−R)), half to even
        assert keep_count(n, r).tolist() == [round(v * (1 - r)) for v in range(2000)]


@pytest.mark.parametrize("attention", ["eager", "sdpa"])
def test_r_zero_is_the_vanilla_model(attention, image):
    pruned, _, processor = build(reducer={"r": 0.0}, attention=attention)
    plain, _, _ = build(reducer=False, attention=attention)
    inputs = processor([chat("What color is the circle?")], [[image]])
    with torch.no_grad():
        got, want = pruned(**inputs).logits, plain(**inputs).logits
    if attention == "eager":
        assert torch.equal(got, want)
    else:
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    kwargs = {"max_new_tokens": 5, "do_sample": False}
    assert torch.equal(pruned.generate(**inputs, **kwargs), plain.generate(**inputs, **kwargs))


def test_kept_set_text_and_positions(image):
    model, _, processor = build()
    seen = {}
    model.language_model.model.layers[K].self_attn.register_forward_pre_hook(
        lambda m, a, kw: seen.update(kw), with_kwargs=True
    )
    inputs = processor([chat("What color is the circle?")], [[image]])
    _, keep = metered(model, inputs)
    visual = model.frontend.visual_mask(inputs["input_ids"])[0]
    assert int((keep[0] & visual).sum()) == 8  # round(16·0.5)
    assert keep[0][~visual].all()  # text is never dropped
    kept = keep[0].nonzero()[:, 0]
    assert torch.equal(seen["position_ids"][0], kept)  # ascending original indices, gaps kept
    assert (kept.diff() > 1).any()


def test_cache_holds_s_tokens_below_k_and_s_prime_from_k(image):
    model, _, processor = build()
    inputs = processor([chat("What color is the circle?")], [[image]])
    seq = inputs["input_ids"].shape[1]
    out = model.generate(
        **inputs, max_new_tokens=3, min_new_tokens=3, do_sample=False, return_dict_in_generate=True
    )
    pruned = seq - 16 + 8
    assert [returned_cache(out).get_seq_length(i) for i in range(4)] == [seq + 2] * K + [pruned + 2] * 2


@pytest.mark.parametrize("family", list(TINY_LLM_CONFIGS))
def test_score_equals_the_eager_attention_row_of_the_last_token(family, image):
    """σ from the module's own projections (GQA, Qwen3's q/k norms, Phi-3's fused qkv, Gemma-2's
    softcap and query scale) equals the head-averaged last row of the eager attention weights."""
    model, _, processor = build(family, reducer=False)
    attn = model.language_model.model.layers[K - 1].self_attn
    seen = {}
    attn.register_forward_pre_hook(lambda m, a, kw: seen.update(kw), with_kwargs=True)
    attn.register_forward_hook(lambda m, a, out: seen.update(weights=out[1]))
    inputs = processor([chat("What?"), chat("What color is the circle?")], [[image], [image]])
    with torch.no_grad():
        model(**inputs)
        valid = inputs["attention_mask"].bool()
        sigma = last_query_attention(attn, seen["hidden_states"], seen["position_embeddings"], valid)
    expected = seen["weights"][:, :, -1].mean(1)
    torch.testing.assert_close(sigma, expected.float(), atol=1e-5, rtol=1e-4)


def test_dropped_tokens_are_the_least_attended(image):
    model, _, processor = build()
    attn = model.language_model.model.layers[K - 1].self_attn
    weights = {}
    attn.register_forward_hook(lambda m, a, out: weights.update(w=out[1]))
    inputs = processor([chat("What color is the circle?")], [[image]])
    _, keep = metered(model, inputs)
    sigma = weights["w"][0, :, -1].mean(0)
    visual = model.frontend.visual_mask(inputs["input_ids"])[0]
    kept, dropped = sigma[visual & keep[0]], sigma[visual & ~keep[0]]
    assert kept.min() > dropped.max()


def _reference_logits(plain, ids, pixels, keep: torch.Tensor) -> torch.Tensor:
    """Plain layers over the whole sequence; from layer K on, no query sees a dropped prompt token."""
    llm = plain.language_model
    with torch.no_grad():
        hidden = plain.llm_inputs(ids, pixel_values=pixels).inputs_embeds
        total = hidden.shape[1]
        positions = torch.arange(total)[None]
        rope = llm.model.rotary_emb(hidden, positions)
        keep = torch.cat([keep, torch.ones(total - len(keep), dtype=torch.bool)])
        causal = torch.ones(total, total, dtype=torch.bool).tril()
        for index, layer in enumerate(llm.model.layers):
            allowed = causal if index < K else causal & keep[None, :] | torch.eye(total, dtype=torch.bool)
            mask = torch.zeros(1, 1, total, total).masked_fill(~allowed, torch.finfo(torch.float32).min)
            hidden = layer(hidden, attention_mask=mask, position_embeddings=rope, position_ids=positions)
        return llm.lm_head(llm.model.norm(hidden))[0, -1]


def test_decode_attends_to_the_prefills_kept_tokens(image):
    model, _, processor = build()
    plain, _, _ = build(reducer=False)
    inputs = processor([chat("What color is the circle?")], [[image]])
    _, keep = metered(model, inputs)
    out = greedy(model, inputs, max_new_tokens=5)
    tokens = out.sequences[0]
    for step in range(len(tokens)):
        ids = torch.cat([inputs["input_ids"][0], tokens[:step]])[None]
        reference = _reference_logits(plain, ids, inputs["pixel_values"], keep[0])
        torch.testing.assert_close(out.logits[step][0], reference, atol=1e-4, rtol=0)


def test_prefill_logits_equal_a_cache_free_forward(image):
    model, _, processor = build(attention="sdpa")
    inputs = processor([chat("What color is the circle?")], [[image]])
    out = greedy(model, inputs, max_new_tokens=1)
    with torch.no_grad():
        logits = model(**inputs, use_cache=False).logits[0, -1]
    torch.testing.assert_close(out.logits[0][0], logits, atol=1e-5, rtol=0)


# -- errors ----------------------------------------------------------------------------------------------
def test_k_must_leave_a_layer_to_prune():
    with pytest.raises(ConfigError, match="fastv k=4 must be below the LLM's 4 decoder layers"):
        build(reducer={"k": 4})


def test_sliding_window_layers_are_refused():
    with pytest.raises(ConfigError, match="'sliding_attention' attention"):
        build("gemma2")


@pytest.mark.parametrize("fields", [{"k": 0}, {"r": 1.0}, {"r": -0.1}])
def test_bad_values_are_validation_errors(fields):
    with pytest.raises(ValueError, match="k|r"):
        FastVConfig(**fields)


def test_switches_on_for_a_saved_checkpoint(image, tmp_path):
    from vlbridge.factory import load_pretrained

    plain, tokenizer, processor = build(reducer=False, attention="sdpa")
    plain.save_pretrained(tmp_path / "ckpt", tokenizer)
    model, _ = load_pretrained(tmp_path / "ckpt", reducers=[{"type": "fastv", "k": 1, "r": 0.75}])
    inputs = processor([chat("What color is the circle?")], [[image]])
    out = model.generate(**inputs, max_new_tokens=2, do_sample=False, return_dict_in_generate=True)
    seq = inputs["input_ids"].shape[1]
    assert [returned_cache(out).get_seq_length(i) for i in range(4)] == [seq + 1] + [seq - 12 + 1] * 3
    assert not (tmp_path / "ckpt" / "reducers.safetensors").exists()  # nothing to save: training-free


def test_gradient_checkpointing_recomputes_the_same_pruning(image):
    from vlbridge.testing import train_batch

    grads = []
    for checkpointing in (False, True):
        vl = build(attention="sdpa")
        model = vl[0].train()
        if checkpointing:
            model.language_model.activation_checkpointing_enable({"use_reentrant": False})
        model(**train_batch(vl, image)).loss.backward()
        layers = model.language_model.model.layers
        grads.append([layers[i].mlp.down_proj.weight.grad.clone() for i in range(4)])
    for plain, recomputed in zip(*grads, strict=True):
        assert plain.abs().sum() > 0
        torch.testing.assert_close(recomputed, plain, atol=1e-6, rtol=1e-5)
