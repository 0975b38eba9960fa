"""ADEM-VL front-end: the spec's testable properties (§5), the LLM-family matrix, training modes, configs.

Tiny random models (vlbridge.testing): a 2-layer, 64-wide LLM; a 2-block, 32-wide ViT on 32-px images
(4x4 grid) or a small CNN; scales [16, 4] -> N_v = 20 visual features; γ = 0.1 drops int(2.0) = 2.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoConfig

from vlbridge import testing as kit
from vlbridge.errors import ConfigError, DataError
from vlbridge.factory import load_pretrained
from vlbridge.frontends.adem_vl import AdemVLConfig, AdemVLFrontend
from vlbridge.frontends.adem_vl_fusion import VisualMemory, adaptive_drop, drop_count, fuse, multiscale
from vlbridge.llm_calls import VISUAL_MEMORY, returned_cache
from vlbridge.modeling import build_llm
from vlbridge.processing import pad_batch
from vlbridge.recipe import LoRASettings, StageConfig, load_recipe
from vlbridge.testing import TINY_LLM_CONFIGS, chat, greedy, tiny_model
from vlbridge.training.stages import apply_stage
from vlbridge.vision_towers import VisionTower

RECIPES = Path(__file__).resolve().parents[2] / "recipes"
FAMILIES = list(TINY_LLM_CONFIGS)
ATOL = 1e-4


def build(family: str = "llama", tower: str = "clip_vision_model", seed: int = 0, **frontend):
    return tiny_model(family, tower, seed=seed, frontend={"type": "adem_vl", **frontend})


def train_batch(vl, images: list, answers=("red circle", "blue square")) -> dict:
    """One sample per entry of `images` (None = a text-only sample), right-padded with labels."""
    model, tokenizer, processor = vl
    samples = [
        processor.encode(
            chat("What is there?", answer, image_in="user" if image is not None else None),
            [image] if image else [],
        )
        for image, answer in zip(images, answers, strict=False)
    ]
    return pad_batch(samples, tokenizer.pad_token_id, model.frontend.layout)


def expected_trainable(cfg: AdemVLConfig, width: int, blocks: int, hidden: int) -> int:
    """Spec §3: CLIP adapters + ψ + ψ_cls + E₁ + E₂, from the config and the tower / LLM sizes."""
    adapters = blocks * 2 * width * cfg.tower_adapters.dim if cfg.tower_adapters else 0
    projector = width * cfg.projector_dim + cfg.projector_dim + cfg.projector_dim * hidden + hidden
    return adapters + 2 * projector + 2 * sum(cfg.scales) * hidden


def memory_of(model, batch: dict) -> VisualMemory:
    """The visual memory `VLModel.llm_inputs` hands to every LLM call over `batch`."""
    with torch.no_grad():
        inputs = model.llm_inputs(batch["input_ids"], batch["attention_mask"], batch["pixel_values"])
    return inputs.frontend_kwargs[VISUAL_MEMORY]


def hand_memory(model, pixel_values: torch.Tensor, batch_rows: torch.Tensor, n_rows: int):
    """V, keys SiLU(V+E₁) and values V+E₂ recomputed from the tower's public parts (CLIP, spec §2.2-2.4)."""
    fe, cfg = model.frontend, model.frontend.config
    hidden, grid = fe.vision_tower(pixel_values)  # [N_img, 1 + 16, C]
    hidden = fe.vision_tower.model.post_layernorm(hidden)  # CLIP's ln_post on every token
    prompts = multiscale(hidden[:, 1:], grid, cfg.scales)
    visual = torch.zeros(n_rows, fe.num_visual, fe.text_hidden_size)
    visual[batch_rows] = cfg.beta * fe.fusion.psi(prompts)
    return visual, F.silu(visual + fe.fusion.key_offset), visual + fe.fusion.value_offset


def record_fusion(model) -> list[dict]:
    """Per decoder layer and call: the MLP input u and the term the adem hooks added to the MLP branch.

    Hooks registered after the front-end's see the fused output; the unfused one is recomputed by
    calling the modules' `forward` directly (which bypasses hooks).
    """
    family, records, current = model.frontend.family, [], {}

    def on_mlp(module, args, output):
        current["u"] = args[0]
        if family.post_mlp_norm is None:
            records.append({"u": args[0], "added": output - module.forward(args[0])})
        else:
            current["mlp_out"] = output

    def on_norm(module, args, output):
        records.append({"u": current["u"], "added": output - module.forward(current["mlp_out"])})

    for layer in model.language_model.get_submodule(family.layers):
        layer.get_submodule(family.mlp).register_forward_hook(on_mlp)
        if family.post_mlp_norm is not None:
            layer.get_submodule(family.post_mlp_norm).register_forward_hook(on_norm)
    return records


# -- §5.1 parameter budget -------------------------------------------------------------------------
def test_default_sizes_give_the_papers_trainable_budget():
    cfg = AdemVLConfig()
    assert (cfg.scales, cfg.projector_dim, cfg.tower_adapters.dim) == ([256, 64], 128, 12)
    assert (cfg.alpha, cfg.beta, cfg.gamma, cfg.vision.feature_layer) == (0.1, 0.01, 0.1, -2)
    assert expected_trainable(cfg, width=1024, blocks=24, hidden=4096) == 4_530_432  # LLaMA-7B
    assert expected_trainable(cfg, width=1024, blocks=24, hidden=5120) == 5_449_984  # LLaMA-13B


@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_llm_gains_no_parameters_and_trainable_count_matches_formula(family):
    model, tokenizer, _ = build(family)
    plain = build_llm(model.config, tokenizer)
    shapes = {n: p.shape for n, p in model.language_model.named_parameters()}
    assert shapes == {n: p.shape for n, p in plain.named_parameters()}
    assert [n for n, _ in model.language_model.named_modules()] == [n for n, _ in plain.named_modules()]

    stage = StageConfig(name="adem", modules={"tower_adapters": "full", "fusion": "full"}, steps=1)
    trainable = sum(r.trainable for r in apply_stage(model, stage, LoRASettings()))
    tower = model.frontend.vision_tower.hf_config
    expected = expected_trainable(model.frontend.config, tower.hidden_size, tower.num_hidden_layers, 64)
    assert trainable == expected == 2 * 2 * 32 * 4 + 2 * (32 * 16 + 16 + 16 * 64 + 64) + 2 * 20 * 64


# -- §5.2 / §5.3 the operator -----------------------------------------------------------------------
@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_hooks_add_exactly_the_pure_fusion_of_u_v_e1_e2(family, red_image, blue_image):
    """Every layer adds α·drop(SiLU(u)SiLU(V+E₁)ᵀ)(V+E₂), nothing else; Gemma-2 after its post-MLP norm."""
    vl = build(family)
    model = vl[0]
    batch = train_batch(vl, [red_image, blue_image])
    records = record_fusion(model)
    with torch.no_grad():
        model(**batch)
        _, keys, values = hand_memory(model, batch["pixel_values"], torch.tensor([0, 1]), 2)
        assert len(records) == 2  # one per decoder layer
        for record in records:
            scores = F.silu(record["u"]) @ keys.transpose(1, 2)  # [B, T, 20]
            threshold = scores.sort(dim=-1).values[..., 2:3]  # sort_ascending(A)[int(0.1 * 20)]
            expected = 0.1 * (scores * (scores >= threshold)) @ values
            torch.testing.assert_close(record["added"], expected, atol=1e-6, rtol=1e-5)
            again = fuse(record["u"], keys, values, 0.1, 0.1)
            assert torch.equal(again, fuse(record["u"], keys, values, 0.1, 0.1))  # pure: no state
            torch.testing.assert_close(again, expected, atol=1e-6, rtol=1e-5)


def test_gamma_zero_is_unnormalised_linear_attention_not_softmax():
    torch.manual_seed(0)
    u, visual = torch.randn(2, 5, 8), torch.randn(2, 6, 8)
    e1, e2 = 0.02 * torch.randn(6, 8), torch.randn(6, 8)
    keys, values = F.silu(visual + e1), visual + e2
    out = fuse(u, keys, values, gamma=0.0, alpha=0.1)
    scores = F.silu(u) @ F.silu(visual + e1).transpose(1, 2)
    assert torch.equal(out, 0.1 * (scores @ (visual + e2)))
    assert not torch.allclose(scores.sum(-1), torch.ones(2, 5), atol=0.1)  # rows do not sum to 1
    softmax = 0.1 * torch.softmax(scores, dim=-1) @ (visual + e2)
    assert (out - softmax).abs().max() > 0.1


# -- §5.4 adaptive drop -----------------------------------------------------------------------------
def test_each_token_keeps_all_but_int_gamma_n_scores():
    torch.manual_seed(0)
    scores = torch.randn(2, 7, 320)  # distinct almost surely
    kept = adaptive_drop(scores, 0.1) != 0
    assert (kept.sum(-1) == 288).all()
    assert not torch.equal(kept[0, 0], kept[0, 1])  # the kept set differs between tokens
    assert torch.equal(adaptive_drop(scores, 0.1)[kept], scores[kept])  # kept scores are unchanged
    assert drop_count(0.1, 320) == 32 and drop_count(0.1, 20) == 2
    assert drop_count(0.57, 100) == 56  # Python int(γ·N), as the official code (floor would give 57)
    assert ((adaptive_drop(torch.randn(1, 3, 100), 0.57) != 0).sum(-1) == 44).all()
    assert torch.equal(adaptive_drop(scores, 0.0), scores)


def test_ties_at_the_threshold_are_kept():
    scores = torch.tensor([[[1.0, 2.0, 2.0, 2.0, 3.0]]])
    assert adaptive_drop(scores, 0.4).tolist() == [[[0.0, 2.0, 2.0, 2.0, 3.0]]]  # drops 2, keeps 4


def test_kept_sets_differ_between_layers(red_image):
    model, _, processor = build()
    records = record_fusion(model)
    inputs = processor([chat("What color is the circle?")], [[red_image]])
    with torch.no_grad():
        model(**inputs)
        keys = memory_of(model, inputs).keys
        masks = [adaptive_drop(F.silu(r["u"]) @ keys.transpose(1, 2), 0.1) != 0 for r in records]
    assert all((m.sum(-1) == 18).all() for m in masks)
    assert not torch.equal(masks[0], masks[1])


# -- §5.5 multiscale --------------------------------------------------------------------------------
def test_multiscale_keeps_the_grid_and_pools_2x2_blocks():
    torch.manual_seed(0)
    patches = torch.randn(2, 16, 3)  # a 4x4 grid, row-major
    out = multiscale(patches, (4, 4), [16, 4])
    assert out.shape == (2, 20, 3)
    assert torch.equal(out[:, :16], patches)
    grid = patches.view(2, 4, 4, 3)
    for i in range(2):
        for j in range(2):
            block = grid[:, 2 * i : 2 * i + 2, 2 * j : 2 * j + 2].mean(dim=(1, 2))
            torch.testing.assert_close(out[:, 16 + 2 * i + j], block)
    assert multiscale(patches, (4, 4), [4]).shape == (2, 4, 3)  # one scale is fine (the reference crashes)


def test_visual_memory_has_sum_of_scales_rows(red_image):
    model, _, processor = build("llama", "resnet", scales=[64, 16, 4])  # CNN: an 8x8 map
    inputs = processor([chat("What color is the circle?")], [[red_image]])
    assert memory_of(model, inputs).keys.shape == (1, 84, 64)
    assert model.frontend.fusion.key_offset.shape == model.frontend.fusion.value_offset.shape == (84, 64)


# -- §5.6 permutation invariance ----------------------------------------------------------------------
def test_permuting_the_visual_set_changes_nothing():
    torch.manual_seed(0)
    u, visual = torch.randn(2, 5, 8), torch.randn(2, 20, 8)
    e1, e2 = 0.02 * torch.randn(20, 8), torch.randn(20, 8)
    perm = torch.randperm(20)
    out = fuse(u, F.silu(visual + e1), visual + e2, 0.1, 0.1)
    permuted = fuse(u, F.silu(visual[:, perm] + e1[perm]), visual[:, perm] + e2[perm], 0.1, 0.1)
    torch.testing.assert_close(permuted, out, atol=1e-6, rtol=1e-6)


# -- §5.7 identities at initialisation -----------------------------------------------------------------
def test_text_only_sample_gets_zero_fusion_at_init(red_image):
    vl = build()
    model, tokenizer, _ = vl
    batch = train_batch(vl, [red_image, None])
    records = record_fusion(model)
    with torch.no_grad():
        out = model(**batch)
    assert all(torch.equal(r["added"][1], torch.zeros_like(r["added"][1])) for r in records)
    assert all(r["added"][0].abs().max() > 0 for r in records)  # the image row does get fused
    plain = build_llm(model.config, tokenizer)
    plain.load_state_dict(model.language_model.state_dict())
    text = {k: batch[k][1:] for k in ("input_ids", "attention_mask")}
    with torch.no_grad():
        reference = plain(
            inputs_embeds=model.llm_inputs(text["input_ids"]).inputs_embeds,
            attention_mask=text["attention_mask"],
        )
    assert torch.equal(out.logits[1:], reference.logits)  # exactly the plain LLM


def test_tower_adapters_are_identities_at_init():
    model, _, _ = build()
    tower = model.frontend.vision_tower
    plain = VisionTower(tower.spec)
    plain.load_state_dict(tower.state_dict())
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(tower(pixels)[0], plain(pixels)[0])
        for adapter in model.frontend.tower_adapters:
            adapter.up.weight.normal_()
        assert (tower(pixels)[0] - plain(pixels)[0]).abs().max() > 1e-3  # the hooks do run


# -- §5.8 KV cache -------------------------------------------------------------------------------------
def test_decode_needs_no_extra_cache(red_image):
    model, _, processor = build()
    inputs = processor([chat("What shape is the blue object?")], [[red_image]])
    out = greedy(model, inputs, max_new_tokens=4, min_new_tokens=4)
    cache = returned_cache(out)
    assert len(cache.layers) == model.language_model.config.num_hidden_layers
    prompt_len = inputs["input_ids"].shape[1]
    assert all(layer.keys.shape[-2] == prompt_len + 3 for layer in cache.layers)


# -- §5.9 sequence length ------------------------------------------------------------------------------
def test_one_input_embedding_per_image_whatever_n_v(red_image):
    sequences = []
    for scales in ([16], [16, 4], [16, 4, 1]):
        model, tokenizer, processor = build(scales=scales)
        messages = chat("What color is the circle?", "red")
        sample = processor.encode(messages, [red_image])
        rendered = processor.render(messages)
        before, after = rendered.split("<image>")
        ids = tokenizer(before + "Image: ", add_special_tokens=False).input_ids
        ids += [model.frontend.image_token_id] + tokenizer(after, add_special_tokens=False).input_ids
        assert sample.input_ids == ids
        pixels = model.frontend.layout.collate(sample.pixel_values)
        embeds = model.llm_inputs(torch.tensor([sample.input_ids]), pixel_values=pixels).inputs_embeds
        assert embeds.shape[1] == len(ids)
        sequences.append(sample.input_ids)
    assert sequences[0] == sequences[1] == sequences[2]


# -- §5.10 gradients of dropped pairs -------------------------------------------------------------------
def test_dropped_pairs_pass_no_gradient():
    torch.manual_seed(0)
    u = torch.randn(1, 1, 8, requires_grad=True)
    visual = torch.randn(1, 10, 8, requires_grad=True)
    e1 = (0.02 * torch.randn(10, 8)).requires_grad_()
    e2 = torch.randn(10, 8, requires_grad=True)
    scores = F.silu(u) @ F.silu(visual + e1).transpose(1, 2)
    dropped = scores[0, 0].argsort()[:3]  # γ = 0.3 drops the 3 weakest
    kept = scores[0, 0].argsort()[3:]
    fuse(u, F.silu(visual + e1), visual + e2, 0.3, 0.1).square().sum().backward()
    for grad in (visual.grad[0], e1.grad, e2.grad):
        assert (grad[dropped] == 0).all() and (grad[kept] != 0).any(dim=-1).all()
    u_grad = u.grad.clone()
    u.grad = None
    # u's gradient is the one of an attention over the kept features alone, without drop
    fuse(
        u, F.silu(visual[:, kept] + e1[kept]), visual[:, kept] + e2[kept], 0.0, 0.1
    ).square().sum().backward()
    torch.testing.assert_close(u.grad, u_grad)


def test_feature_dropped_everywhere_gets_zero_gradient(red_image):
    model, tokenizer, processor = build()
    j = 7
    with torch.no_grad():  # SiLU's minimum in every channel: feature j scores lowest for every token
        model.frontend.fusion.key_offset[j] = -1.2785
    batch = train_batch((model, tokenizer, processor), [red_image, red_image])
    keys = memory_of(model, batch).keys
    psi_out = []
    model.frontend.fusion.psi.register_forward_hook(
        lambda m, a, out: psi_out.append(out) or out.retain_grad()
    )
    records = record_fusion(model)
    model(**batch).loss.backward()
    for r in records:  # the premise: j is dropped for every token in every layer
        assert not (adaptive_drop(F.silu(r["u"]) @ keys.transpose(1, 2), 0.1)[..., j] != 0).any()
    fusion = model.frontend.fusion
    for grad in (fusion.key_offset.grad, fusion.value_offset.grad, psi_out[0].grad[0], psi_out[0].grad[1]):
        assert (grad[j] == 0).all()
        assert (torch.cat([grad[:j], grad[j + 1 :]]).abs().sum(-1) > 0).all()


# -- the LLM-family matrix -----------------------------------------------------------------------------
@pytest.fixture(scope="module", params=FAMILIES)
def family_vl(request):
    return build(request.param)


def test_loss_is_finite_and_gradients_reach_every_trained_part(family_vl, red_image, blue_image):
    model, tokenizer, processor = family_vl
    model.zero_grad()
    out = model(**train_batch(family_vl, [red_image, blue_image]))
    assert torch.isfinite(out.loss)
    out.loss.backward()
    fe = model.frontend
    trained = {
        "psi": fe.fusion.psi[0].weight,
        "psi_cls": fe.fusion.psi_cls[0].weight,
        "E1": fe.fusion.key_offset,
        "E2": fe.fusion.value_offset,
        "adapter.up": fe.tower_adapters[0].up.weight,  # block 1 of 2: the feature layer is -2
        "tower": fe.vision_tower.model.embeddings.patch_embedding.weight,
        "llm": model.language_model.get_input_embeddings().weight,
    }
    for name, param in trained.items():
        assert param.grad is not None and torch.isfinite(param.grad).all(), name
        assert param.grad.abs().max() > 0, name
    model.zero_grad()


def test_cached_decode_equals_full_recompute(family_vl, red_image):
    with torch.no_grad():
        kit.assert_cached_decode_matches_recompute(
            family_vl, "What shape is the blue object?", red_image, max_new_tokens=6, atol=ATOL
        )


def test_left_padded_batch_equals_one_by_one(family_vl, red_image, blue_image):
    """Mixed batch: a text-only prompt between two images, so images map to rows by their placeholders."""
    conversations = [chat("What color is it?"), chat("How many triangles are there?", image_in=None)]
    conversations.append(chat("Is the yellow circle left or right of the square?"))
    images = [[red_image], [], [blue_image]]
    kit.assert_padded_batch_matches_one_by_one(family_vl, conversations, images, atol=ATOL)


def test_save_load_round_trip(family_vl, red_image, blue_image, tmp_path):
    model = family_vl[0]
    with torch.no_grad():  # move E₂ and the adapters off their zero init so the round trip covers them
        model.frontend.fusion.value_offset.normal_(std=0.02)
        model.frontend.tower_adapters[0].up.weight.normal_(std=0.02)
    batch = train_batch(family_vl, [red_image, None])
    with torch.no_grad():
        kit.assert_save_load_round_trip(family_vl, batch, blue_image, tmp_path / "ckpt")


# -- generation modes, training modes ------------------------------------------------------------------
def test_beam_search_and_multiple_returns_expand_the_memory(red_image, blue_image):
    model, _, processor = build()
    conversations, images = [chat("What color?"), chat("What shape?")], [[red_image], [blue_image]]
    kwargs = {"max_new_tokens": 5, "num_beams": 3, "num_return_sequences": 2, "do_sample": False}
    batched = model.generate(**processor(conversations, images), **kwargs)
    assert batched.shape[0] == 4
    for row, (conversation, imgs) in enumerate(zip(conversations, images, strict=True)):
        alone = model.generate(**processor([conversation], [imgs]), **kwargs)
        assert torch.equal(batched[2 * row : 2 * row + 2, : alone.shape[1]], alone)
    torch.manual_seed(0)
    sampled = model.generate(
        **processor(conversations, images), max_new_tokens=3, do_sample=True, num_return_sequences=3
    )
    assert sampled.shape == (6, 3)


def test_memory_expansion_repeats_each_prompt_and_refuses_other_batches():
    keys = torch.arange(2.0)[:, None, None].expand(2, 3, 4)
    memory = VisualMemory(keys=keys, values=keys + 10)
    expanded_keys, expanded_values = memory.for_batch(6)
    assert expanded_keys[:, 0, 0].tolist() == [0, 0, 0, 1, 1, 1]
    assert expanded_values[:, 0, 0].tolist() == [10, 10, 10, 11, 11, 11]
    assert memory.for_batch(6)[0] is expanded_keys  # built once, reused by every layer and decode step
    with pytest.raises(DataError, match="batch of 5 rows.*holds 2 prompts"):
        memory.for_batch(5)


def test_lora_on_the_llm_keeps_the_hooks_and_round_trips(red_image, tmp_path):
    vl = build("qwen2")
    model, tokenizer, processor = vl
    batch = train_batch(vl, [red_image, red_image])
    with torch.no_grad():
        before = model(**batch).logits
    stage = StageConfig(
        name="lora", modules={"llm": "lora", "fusion": "full", "tower_adapters": "full"}, steps=1
    )
    apply_stage(model, stage, LoRASettings(r=4))
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, before)  # LoRA B = 0: the same model, hooks still active
    model.train()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    model(**batch).loss.backward()
    lora_grads = [p.grad for n, p in model.language_model.named_parameters() if "lora_B" in n]
    assert lora_grads and all(g is not None for g in lora_grads)
    assert model.frontend.fusion.value_offset.grad.abs().max() > 0
    optimizer.step()
    model.eval()
    model.save_pretrained(tmp_path / "ckpt", tokenizer)
    loaded, _ = load_pretrained(tmp_path / "ckpt")
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch).logits, model(**batch).logits, atol=1e-5, rtol=0)
    inputs = processor([chat("What color?")], [[red_image]])
    assert torch.equal(
        loaded.generate(**inputs, max_new_tokens=4, do_sample=False),
        model.generate(**inputs, max_new_tokens=4, do_sample=False),
    )


def test_gradient_checkpointing_recomputes_with_the_same_memory(red_image, blue_image):
    grads = []
    for checkpointing in (False, True):
        vl = build("llama", "resnet")
        model = vl[0].train()
        if checkpointing:
            model.language_model.activation_checkpointing_enable({"use_reentrant": False})
        batch = train_batch(vl, [red_image, blue_image])
        model(**batch).loss.backward()
        grads.append(
            [p.grad for p in (model.frontend.fusion.key_offset, model.frontend.fusion.psi[0].weight)]
        )
    for plain, recomputed in zip(*grads, strict=True):
        torch.testing.assert_close(recomputed, plain, atol=1e-6, rtol=1e-5)
    inputs = model.llm_inputs(batch["input_ids"], batch["attention_mask"], batch["pixel_values"])
    with pytest.raises(DataError, match="without the visual memory"):  # the bare LLM has no memory
        model.language_model(inputs_embeds=inputs.inputs_embeds, attention_mask=batch["attention_mask"])


# -- errors ---------------------------------------------------------------------------------------------
def test_more_than_one_image_per_sample_is_a_data_error(red_image, blue_image):
    model, _, processor = build()
    inputs = processor([[{"role": "user", "content": "<image><image> same?"}]], [[red_image, blue_image]])
    with pytest.raises(DataError, match=r"one image per sample.*row\(s\) \[0\]"):
        model(**inputs)


def test_calling_the_bare_llm_before_embed_is_an_error():
    model, _, _ = build()
    ids = torch.tensor([[5, 6, 7]])
    with pytest.raises(DataError, match="without the visual memory.*VLModel.forward"):
        model.language_model(input_ids=ids)


def test_adapters_on_a_cnn_tower_are_a_config_error():
    with pytest.raises(ConfigError, match=r"resnet tower has none.*frontend.tower_adapters: null"):
        build("llama", "resnet", tower_adapters={"dim": 4})


def test_scales_larger_than_the_grid_are_a_config_error():
    with pytest.raises(ConfigError, match=r"frontend.scales=\[64, 16\]: \[64\] do not fit the tower's 4x4"):
        build(scales=[64, 16])


def test_cls_on_a_tower_without_one_is_a_config_error():
    with pytest.raises(ConfigError, match="has no CLS token; use 'patch'"):
        build("llama", "siglip_vision_model", vision={"feature_select": "cls_patch"})


def test_an_llm_family_without_a_hook_table_entry_is_a_config_error():
    text_config = AutoConfig.for_model("gpt2", n_embd=64, n_layer=2, n_head=2)
    with pytest.raises(ConfigError, match="'gpt2' is not in vlbridge's family table"):
        AdemVLFrontend(AdemVLConfig(), text_config)


@pytest.mark.parametrize(
    ("override", "fragments"),
    [
        ("model.frontend.scales=[16,5]", ["model.frontend.scales", "square", "got 5"]),
        ("model.frontend.scales=[]", ["model.frontend.scales", "at least 1"]),
        ("model.frontend.gamma=1.0", ["model.frontend.gamma", "less than 1"]),
        ("model.frontend.tower_adapters={rank: 4}", ["model.frontend.tower_adapters.rank", "Extra inputs"]),
    ],
)
def test_bad_recipe_values_name_the_key(override, fragments):
    with pytest.raises(ConfigError) as err:
        load_recipe(RECIPES / "adem_vl.yaml", [override])
    for fragment in fragments:
        assert fragment in str(err.value)


def test_shipped_recipe_scales_fit_its_tower():
    recipe = load_recipe(RECIPES / "adem_vl.yaml")
    llm = recipe.model.llm
    frontend = AdemVLFrontend(recipe.model.frontend, AutoConfig.for_model(llm.model_type, **llm.config))
    assert frontend.num_visual == sum(recipe.model.frontend.scales) and frontend.tower_adapters is None
