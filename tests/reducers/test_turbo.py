"""Turbo: the spec's testable invariants (turbo.md §8), its defaults (§4, §10), and the model-level contract.

Merge math is checked on random tensors against hand-written references; the tower patch on tiny random
CLIP / SigLIP towers (32-px images, 4-px patches: an 8x8 grid, 65 tokens with CLS, 64 without; 3
blocks, feature layer −2, so blocks 0 and 1 merge); the official token counts on a 32-wide tower with
CLIP-L/14-336's geometry (577 tokens, 24 blocks).
"""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError

from vlbridge import testing as kit
from vlbridge.config import VLConfig, deep_merge
from vlbridge.errors import ConfigError
from vlbridge.factory import load_pretrained
from vlbridge.recipe import LoRASettings, StageConfig
from vlbridge.reducers import Meter, parse_reducer_spec
from vlbridge.reducers.merge import budget, match, merge_positions, merge_weighted, token_trajectory
from vlbridge.reducers.token_merging import per_block_r, spread_budget
from vlbridge.reducers.tower_merge import (
    TowerMerger,
    cls_attention,
    mean_attention_received,
    size_biased_attention,
)
from vlbridge.reducers.turbo import TurboConfig
from vlbridge.testing import TINY_LLM_CONFIGS, chat, tiny_model, train_batch
from vlbridge.training.stages import apply_stage

CLIP, SIGLIP = "clip_vision_model", "siglip_vision_model"
TOWERS = [CLIP, SIGLIP]
FAMILIES = list(TINY_LLM_CONFIGS)
ATOL = 1e-4
GRID8 = {"vision": {"config": {"patch_size": 4, "num_hidden_layers": 3}}}  # 64 patches, 3 blocks


def build(family: str = "llama", tower: str = CLIP, reducers: list | None = None, seed: int = 0, **frontend):
    """A tiny llava model without the connector's 2x2 merge (token merging needs no grid)."""
    fe = deep_merge({"type": "llava", "connector": {"merge": 1}, **GRID8}, frontend)
    return tiny_model(family, tower, seed=seed, frontend=fe, reducers=reducers or [])


def turbo(**settings) -> dict:
    return {"type": "turbo", "r": 8, "min_tokens": 0, **settings}


def blocks_of(model):
    return model.frontend.vision_tower.model.encoder.layers


def merger_of(model) -> TowerMerger:
    return model.reducers[0].merger


def pixels(n: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def reference_tome(metric: torch.Tensor, r: int, protect_first: bool) -> list[set[tuple[int, int]]]:
    """ToMe's bipartite matching written out token by token: {(source index, destination index)} per row."""
    pairs = []
    for row in metric.double():
        row = row / row.norm(dim=-1, keepdim=True)
        evens, odds = range(0, len(row), 2), range(1, len(row), 2)
        best = {i: max((float(row[i] @ row[j]), j) for j in odds) for i in evens}
        candidates = [i for i in evens if not (protect_first and i == 0)]
        chosen = sorted(candidates, key=lambda i: -best[i][0])[:r]
        pairs.append({(i, best[i][1]) for i in chosen})
    return pairs


def plan_pairs(plan) -> list[set[tuple[int, int]]]:
    return [
        {(2 * s, 2 * d + 1) for s, d in zip(src.flatten().tolist(), dst.flatten().tolist(), strict=True)}
        for src, dst in zip(plan.sources, plan.destinations, strict=True)
    ]


# -- §4 / §10: budgets and the official token counts ---------------------------------------------------------
def test_budget_clips_to_half_the_unprotected_tokens_and_skips_below_threshold():
    assert budget(16, 577, protected=1, min_tokens=40) == 16
    assert budget(16, 20, protected=1, min_tokens=0) == 9  # ⌊(20 − 1)/2⌋
    assert budget(16, 20, protected=0, min_tokens=0) == 10
    assert budget(16, 39, protected=1, min_tokens=40) == 0
    assert budget(0, 577, protected=1, min_tokens=0) == 0


@pytest.mark.parametrize(("r", "visual"), [(16, 208), (18, 162)])
def test_official_llava_token_counts_on_clip_l14_336_geometry(r, visual):
    """577 tokens, 24 blocks, feature layer −2: 23 merging blocks (§4, §10): 577→561→…→209 for r = 16."""
    counts = token_trajectory(577, [r] * 23 + [0], protected=1, min_tokens=40)
    assert counts[1] == 577 - r and counts[-2] == visual + 1

    vision = {"config": {"num_hidden_layers": 24, "image_size": 336, "patch_size": 14}}
    model, _, _ = build(reducers=[{"type": "turbo", "r": r}], vision=vision, image={"size": 336})
    assert model.frontend.layout.num_image_tokens() == visual
    model.meter = Meter()
    assert model.frontend.encode(torch.randn(1, 3, 336, 336)).shape[1] == visual
    assert model.meter.last(Meter.TOWER_TOKENS) == counts  # measured per block = N − min(r, ⌊(N−1)/2⌋)


def test_blip_trajectory_with_r30_over_12_blocks():
    assert token_trajectory(577, [30] * 12, protected=1, min_tokens=40)[-1] == 217


def test_every_block_removes_its_clipped_budget(red_image):
    for tower, first in ((CLIP, 65), (SIGLIP, 64)):
        model, _, processor = build(tower=tower, reducers=[turbo(r=[30, 30, 30])])
        model.meter = Meter()
        model.frontend.encode(pixels())
        protected = int(tower == CLIP)
        expected = token_trajectory(first, [30, 30, 0], protected=protected, min_tokens=0)
        assert model.meter.last(Meter.TOWER_TOKENS) == expected
        # block 0 merges r, block 1 is clipped to ⌊(N − protected)/2⌋, block 2 (past the feature layer) none
        assert expected[1] == first - 30 and expected[2] == expected[1] - (expected[1] - protected) // 2
        assert expected[3] == expected[2]
        visual = expected[2] - protected
        assert model.frontend.layout.num_image_tokens() == visual
        ids = processor([chat("What is it?")], [[red_image]])["input_ids"]
        assert int((ids == model.frontend.image_token_id).sum()) == visual


# -- §8.1 / §8.8: identity --------------------------------------------------------------------------------
@pytest.mark.parametrize("tower", TOWERS)
@pytest.mark.parametrize("settings", [{"r": 0}, {"r": 8, "min_tokens": 100}], ids=["r0", "threshold"])
def test_no_merge_is_bitwise_the_plain_model(tower, settings, red_image):
    plain = build(tower=tower)
    reduced = build(tower=tower, reducers=[turbo(**settings)])
    batch = train_batch(plain, red_image)
    assert reduced[0].frontend.layout.num_image_tokens() == plain[0].frontend.layout.num_image_tokens()
    assert torch.equal(reduced[0](**batch).logits, plain[0](**batch).logits)


def test_unit_sizes_give_vanilla_attention():
    model, _, _ = build()
    layer = blocks_of(model)[0]
    h = layer.layer_norm1(torch.randn(2, 65, 32))
    vanilla = layer.self_attn(h)[0]
    for sizes in (None, torch.ones(2, 65, 1)):
        torch.testing.assert_close(size_biased_attention(layer.self_attn, h, sizes)[0], vanilla)


def test_proportional_bias_makes_a_merged_token_attend_like_its_copies():
    """A size-2 token is attended like two size-1 copies of it; its semantic value is theirs summed."""
    model, _, _ = build()
    layer = blocks_of(model)[0]
    h = layer.layer_norm1(torch.randn(1, 9, 32))
    copied = torch.cat([h, h[:, 4:5]], dim=1)  # token 4 twice
    sizes = torch.ones(1, 9, 1)
    sizes[0, 4] = 2
    out_merged, q, k, bias = size_biased_attention(layer.self_attn, h, sizes)
    out_copied, qc, kc, _ = size_biased_attention(layer.self_attn, copied, None)
    torch.testing.assert_close(out_merged, out_copied[:, :9], atol=1e-6, rtol=0)
    for semantic in (cls_attention, mean_attention_received):
        a_merged = semantic(q, k, bias, sizes, layer.self_attn.scale)[0]
        a_copied = semantic(qc, kc, None, None, layer.self_attn.scale)[0]
        torch.testing.assert_close(a_merged[4], a_copied[4] + a_copied[9], atol=1e-6, rtol=0)
        torch.testing.assert_close(a_merged[:4], a_copied[:4], atol=1e-6, rtol=0)
        torch.testing.assert_close(a_merged.sum(), torch.tensor(1.0))


@pytest.mark.parametrize("semantic", [cls_attention, mean_attention_received])
def test_semantic_values_of_a_batch_are_those_of_each_row(semantic):
    """Rows with different sizes: each row's value is what that row alone gives (batch, heads kept apart)."""
    model, _, _ = build()
    attn = blocks_of(model)[0].self_attn
    h, sizes = torch.randn(2, 9, 32), torch.randint(1, 5, (2, 9, 1)).float()
    _, q, k, bias = size_biased_attention(attn, h, sizes)
    together = semantic(q, k, bias, sizes, attn.scale)
    for i in range(2):
        _, qi, ki, bi = size_biased_attention(attn, h[i : i + 1], sizes[i : i + 1])
        alone = semantic(qi, ki, bi, sizes[i : i + 1], attn.scale)
        torch.testing.assert_close(together[i : i + 1], alone, atol=1e-6, rtol=0)


def test_semantic_values_equal_the_eager_attention_probabilities():
    """CLS row (CLIP) and mean attention received (SigLIP) against transformers' own probabilities."""
    for tower, semantic, reference in (
        (CLIP, cls_attention, lambda p: p[:, :, 0].mean(1)),
        (SIGLIP, mean_attention_received, lambda p: p.mean(dim=(1, 2))),
    ):
        model, _, _ = build(tower=tower)
        attn = blocks_of(model)[0].self_attn
        attn.config._attn_implementation = "eager"  # eager attention returns its probabilities
        h = torch.randn(2, 17, 32)
        _, probs = attn(h)  # [B, H, N, N]
        _, q, k, _ = size_biased_attention(attn, h, None)
        torch.testing.assert_close(semantic(q, k, None, None, attn.scale), reference(probs))


# -- §8.3 / §8.4 / §8.10: merging -------------------------------------------------------------------------
def random_plan(n: int = 17, r: int = 5, *, lam: float = 0.0, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    metric, semantic = torch.randn(3, n, 8, generator=g), torch.rand(3, n, generator=g) / n
    return match(metric, r, semantic=semantic, lam=lam, protect_first=True), metric, semantic


def test_merge_conserves_mass_and_keeps_cls_bitwise():
    plan, _, _ = random_plan(lam=500.0)
    x = torch.randn(3, 17, 6)
    sizes = torch.randint(1, 4, (3, 17, 1)).float()
    sizes[:, 0] = 1
    merged, new_sizes = merge_weighted(x, sizes, plan)
    assert merged.shape == (3, 12, 6) and new_sizes.shape == (3, 12, 1)
    torch.testing.assert_close(new_sizes.sum(1), sizes.sum(1), atol=0, rtol=0)
    torch.testing.assert_close((new_sizes * merged).sum(1), (sizes * x).sum(1))
    assert torch.equal(merged[:, 0], x[:, 0]) and (new_sizes[:, 0] == 1).all()


def test_sizes_sum_to_the_original_token_count_after_a_tower_forward():
    model, _, _ = build(reducers=[turbo(r=[30, 30, 30])])
    model.frontend.encode(pixels())
    sizes = merger_of(model).state.sizes
    assert sizes.shape[1] == 65 - 30 - 17 and (sizes.sum(1) == 65).all() and (sizes[:, 0] == 1).all()


def test_output_order_is_unmerged_evens_ascending_then_all_odds():
    plan, _, _ = random_plan()
    positions = torch.arange(17).expand(3, -1)[..., None]
    order = merge_positions(positions, plan)[..., 0]
    for row, unmerged in zip(order, plan.unmerged[..., 0], strict=True):
        assert row.tolist() == (2 * unmerged).tolist() + list(range(1, 17, 2))
        assert row[0] == 0 and (row[: len(unmerged)].diff() > 0).all()


# -- §8.5 / §8.6 / §8.7 / §8.9: matching ------------------------------------------------------------------
def test_lambda_zero_matches_reference_tome():
    plan, metric, _ = random_plan(n=33, r=9)
    assert plan_pairs(plan) == reference_tome(metric, 9, protect_first=True)


@pytest.mark.parametrize("lam", [0.0, 5.0, 500.0, 1e6])
def test_destination_is_always_the_most_similar_odd_token(lam):
    plan, metric, _ = random_plan(lam=lam)
    unit = torch.nn.functional.normalize(metric, dim=-1)
    best = (unit[:, ::2] @ unit[:, 1::2].transpose(1, 2)).argmax(-1)  # [B, |𝒜|]
    assert torch.equal(plan.destinations[..., 0], best.gather(1, plan.sources[..., 0]))


def test_huge_lambda_merges_the_least_attended_sources():
    n, r = 33, 6
    g = torch.Generator().manual_seed(1)
    metric = torch.randn(2, n, 8, generator=g)
    semantic = (
        torch.stack([torch.randperm(n, generator=g) for _ in range(2)]).float() / n**2
    )  # distinct values
    plan = match(metric, r, semantic=semantic, lam=1e3 * n**2, protect_first=True)
    for row, sources in zip(semantic, plan.sources[..., 0], strict=True):
        evens = row[::2].clone()
        evens[0] = torch.inf  # CLS never merges
        assert set(sources.tolist()) == set(evens.argsort()[:r].tolist())
    assert not plan_pairs(plan) == plan_pairs(match(metric, r, protect_first=True))  # λ changed the choice


def test_identical_even_and_odd_tokens_merge_first():
    metric = torch.randn(1, 17, 8, generator=torch.Generator().manual_seed(2))
    metric[0, 9] = metric[0, 6]  # even 6 (𝒜 index 3) duplicates odd 9 (𝓑 index 4)
    plan = match(metric, 1, protect_first=True)
    assert plan.sources.flatten().tolist() == [3] and plan.destinations.flatten().tolist() == [4]


def test_cls_is_never_a_source_even_when_it_is_the_best_match():
    metric = torch.randn(2, 9, 4)
    metric[:, 1] = metric[:, 0]  # CLS identical to token 1
    plan = match(metric, 4, protect_first=True)
    assert 0 not in plan.sources.flatten().tolist()
    assert 0 in match(metric, 4, protect_first=False).sources[:, :1].flatten().tolist()


# -- model level --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("tower", TOWERS)
def test_semantic_term_and_proportional_attention_change_the_features(tower):
    x = pixels()
    features = {
        name: build(tower=tower, reducers=[turbo(**settings)])[0].frontend.encode(x)
        for name, settings in {
            "turbo": {},
            "tome-like": {"lam": 0},
            "unbiased": {"proportional": False},
        }.items()
    }
    assert features["turbo"].shape == features["tome-like"].shape == features["unbiased"].shape
    assert not torch.allclose(features["turbo"], features["tome-like"])
    assert not torch.allclose(features["turbo"], features["unbiased"])


def test_lambda_zero_turbo_is_tome():
    x = pixels()
    tome = build(tower=CLIP, reducers=[{"type": "tome", "r": 8}])[0]
    zero = build(tower=CLIP, reducers=[turbo(lam=0)])[0]
    assert torch.equal(tome.frontend.encode(x), zero.frontend.encode(x))


def test_unbiased_mode_runs_every_block_as_plain_attention_on_the_merged_tokens():
    """proportional=False (official LLaVA path): after a merge, a block is the plain block on fewer tokens."""
    model, _, _ = build(reducers=[turbo(proportional=False, r=[8, 0, 0])])
    hidden = model.frontend.vision_tower.model(pixel_values=pixels(), output_hidden_states=True).hidden_states
    assert [h.shape[1] for h in hidden] == [65, 57, 57, 57]
    block = blocks_of(model)[1]
    torch.testing.assert_close(hidden[2], type(block).forward(block, hidden[1], None))


def test_raster_order_sorts_the_output_by_original_position():
    x = pixels()
    merged = build(reducers=[turbo()])[0].frontend.vision_tower(x)[0]
    model, _, _ = build(reducers=[turbo(order="raster")])
    raster = model.frontend.vision_tower(x)[0]
    positions = merger_of(model).state.positions[..., 0]
    assert (positions.diff(dim=1) > 0).all() and (positions[:, 0] == 0).all()
    for a, b in zip(merged, raster, strict=True):  # same tokens, another order
        torch.testing.assert_close(a[a[:, 0].argsort()], b[b[:, 0].argsort()])
    assert not torch.equal(merged, raster)


def test_images_in_a_batch_are_merged_independently():
    model, _, _ = build(reducers=[turbo()])
    x = pixels(3)
    together = model.frontend.encode(x)
    for i in range(3):
        torch.testing.assert_close(
            together[i : i + 1], model.frontend.encode(x[i : i + 1]), atol=1e-5, rtol=0
        )


@pytest.mark.parametrize(
    ("tower", "tokens", "schedule"), [(CLIP, 32, [16, 16, 0]), (SIGLIP, 30, [17, 17, 0])]
)
def test_token_target_spreads_r_over_the_blocks_before_the_feature_layer(tower, tokens, schedule):
    model, _, _ = build(tower=tower, reducers=[{"type": "turbo", "tokens": tokens, "min_tokens": 0}])
    assert model.frontend.layout.num_image_tokens() == tokens
    assert model.frontend.encode(pixels(1)).shape[1] == tokens
    assert merger_of(model).state.schedule.r == tuple(schedule)
    assert spread_budget(577, 289, 23, 1, 40, "turbo") == [13] * 12 + [12] * 11  # 50% of 576 tokens


def test_schedules_follow_tome_int_inflect_and_short_lists():
    assert per_block_r(16, 0.0, 24, "turbo") == [16] * 24
    assert per_block_r(8, 0.5, 3, "turbo") == [4, 8, 12]  # ⌊r(1 − i)⌋ up to 2r − that
    assert per_block_r(13, 0.3, 4, "turbo") == [9, 11, 14, 17]  # int() truncates, as in ToMe
    assert per_block_r(13, -0.5, 4, "turbo") == [19, 15, 11, 7]  # decreasing
    assert per_block_r([5, 3], 0.0, 4, "turbo") == [5, 3, 0, 0]
    model, _, _ = build(reducers=[turbo(r=[8])])
    model.meter = Meter()
    model.frontend.encode(pixels())
    assert model.meter.last(Meter.TOWER_TOKENS) == [65, 57, 57, 57]


def test_first_blocks_confines_the_budget_to_the_early_blocks():
    """Same tokens reach the LLM, merged sooner: the tower's later blocks run the shorter sequence."""
    even, _, _ = build(reducers=[{"type": "turbo", "tokens": 32, "min_tokens": 0}])
    early, _, _ = build(reducers=[{"type": "turbo", "tokens": 32, "min_tokens": 0, "first_blocks": 1}])
    for model in (even, early):
        model.meter = Meter()
        model.frontend.encode(pixels())
    assert merger_of(early).state.schedule.r == (32, 0, 0)
    assert early.meter.last(Meter.TOWER_TOKENS) == [65, 33, 33, 33]
    assert even.meter.last(Meter.TOWER_TOKENS) == [65, 49, 33, 33]
    assert early.frontend.layout.num_image_tokens() == even.frontend.layout.num_image_tokens() == 32
    ramp, _, _ = build(reducers=[turbo(r=8, inflect=-0.5, first_blocks=2)])
    ramp.frontend.encode(pixels())
    assert merger_of(ramp).state.schedule.r == (12, 4, 0)  # the ramp spans the first two blocks only


def test_layer_decay_counts_blocks_with_a_scheduled_merge():
    model, _, _ = build(reducers=[turbo(r=[0, 8, 8], lam=100, beta=0.5, gamma=1)])
    model.frontend.encode(pixels())
    schedule = merger_of(model).state.schedule
    assert schedule.r == (0, 8, 0)  # block 2 comes after the feature layer
    assert schedule.lam == (50.0, 50.0, 100.0)  # β^|γ − t|·λ with t = 0, 0, 1


def test_merging_is_differentiable_for_training(red_image):
    vl = build(reducers=[turbo()])
    model = vl[0].train()
    loss = model(**train_batch(vl, red_image)).loss
    loss.backward()
    q_grad = blocks_of(model)[0].self_attn.q_proj.weight.grad
    assert q_grad is not None and q_grad.abs().sum() > 0


def test_lora_on_the_tower_trains_through_the_merge_and_folds_back(red_image):
    """The patch calls the attention's own projections, so LoRA on them is used, trained and mergeable."""
    vl = build(reducers=[turbo()])
    model = vl[0]
    stage = StageConfig(name="s", modules={"vision_tower": "lora", "connector": "full"}, steps=1)
    apply_stage(model, stage, LoRASettings(r=4, target_modules=["q_proj", "k_proj", "v_proj"]))
    batch = train_batch(vl, red_image)
    model.train()
    model(**batch).loss.backward()
    blocks = blocks_of(model)[:2]  # block 2 runs after the feature layer: its output is unused
    grads = [block.self_attn.q_proj.lora_B["default"].weight.grad for block in blocks]
    assert all(g is not None and g.abs().sum() > 0 for g in grads)
    model.eval()
    with torch.no_grad():
        # Turbo's matching is discrete: merged weights differ from adapter sums by float error, which flips a
        # match that is that close to a tie (seed 0 here draws one); fixed draws keep the test about folding
        torch.manual_seed(1)
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_()  # make the adapters matter
        before = model(**batch).logits
        assert not torch.allclose(before, build(reducers=[turbo()])[0](**batch).logits)
        model.merge_lora()
        torch.testing.assert_close(model(**batch).logits, before, atol=1e-4, rtol=0)
    assert model.frontend.layout.num_image_tokens() == 64 - 8 - 8


# -- the conformance kit over LLM families and towers -------------------------------------------------------
@pytest.fixture(
    scope="module", params=[(f, CLIP) for f in FAMILIES] + [("qwen3", SIGLIP)], ids=lambda p: "-".join(p)
)
def reduced_vl(request):
    family, tower = request.param
    return build(family, tower, reducers=[turbo()])


def test_cached_decode_equals_full_recompute(reduced_vl, red_image):
    assert reduced_vl[0].frontend.layout.num_image_tokens() < 64
    kit.assert_cached_decode_matches_recompute(
        reduced_vl, "What shape is the blue object?", red_image, atol=ATOL
    )


@pytest.mark.parametrize("tower", TOWERS)
def test_left_padded_batch_equals_one_by_one(tower, red_image, blue_image):
    vl = build("gemma2", tower, reducers=[turbo()])
    conversations = [chat("What color is the circle?"), chat("Is the yellow circle left or right of it?")]
    kit.assert_padded_batch_matches_one_by_one(vl, conversations, [[red_image], [blue_image]], atol=ATOL)


@pytest.mark.parametrize("tower", TOWERS)
def test_save_load_round_trip_keeps_the_reducer(tower, red_image, tmp_path):
    vl = build("phi3", tower, reducers=[turbo(lam=300, order="raster")])
    loaded = kit.assert_save_load_round_trip(vl, train_batch(vl, red_image), red_image, tmp_path / "ckpt")
    assert loaded.config.reducers == vl[0].config.reducers
    assert loaded.frontend.layout.num_image_tokens() == vl[0].frontend.layout.num_image_tokens()
    assert not (tmp_path / "ckpt" / "reducers.safetensors").exists()  # training-free: no parameters


def test_reducer_switched_on_for_a_plain_checkpoint(red_image, tmp_path):
    model, tokenizer, processor = build("qwen2")
    model.save_pretrained(tmp_path / "plain", tokenizer)
    section = parse_reducer_spec("turbo:r=[8,8,8],min_tokens=0")
    reduced, _ = load_pretrained(tmp_path / "plain", reducers=[section])
    assert reduced.frontend.layout.num_image_tokens() == 65 - 8 - 8 - 1
    same = build("qwen2", reducers=[section])
    batch = train_batch(same, red_image)
    assert torch.equal(reduced(**batch).logits, same[0](**batch).logits)


# -- positions: contiguous (official) or the dense layout ------------------------------------------------
def test_dense_positions_put_the_text_after_a_reduced_image_where_it_was(red_image, blue_image):
    plain, _, processor = build()
    reduced, _, reduced_processor = build(reducers=[turbo(positions="dense")])
    assert reduced.frontend.layout.num_image_tokens() == 64 - 16 and reduced.reducers[0].image_span() == 64
    conversations = [chat("What color is it?"), chat("Is the yellow circle left or right of the big one?")]
    dense = processor(conversations, [[red_image], [blue_image]])  # row 0 is left-padded
    short = reduced_processor(conversations, [[red_image], [blue_image]])
    assert (
        plain.llm_inputs(dense["input_ids"], dense["attention_mask"], dense["pixel_values"]).position_ids
        is None
    )  # nothing reduced
    positions = reduced.llm_inputs(
        short["input_ids"], short["attention_mask"], short["pixel_values"]
    ).position_ids
    expected = (dense["attention_mask"].cumsum(-1) - 1).clamp(min=0)  # what the LLM counts unreduced
    visual = reduced.frontend.visual_mask(short["input_ids"])
    for row in range(2):
        real, dense_real = short["attention_mask"][row].bool(), dense["attention_mask"][row].bool()
        text = real & ~visual[row]
        tail = int((text & (visual[row].cumsum(0) > 0)).sum())  # text tokens after the image
        head = int(text.sum()) - tail
        assert positions[row][real][-tail:].tolist() == expected[row][dense_real][-tail:].tolist()
        assert positions[row][real][:head].tolist() == expected[row][dense_real][:head].tolist()
        image = positions[row][visual[row]]  # 48 tokens evenly over 64 positions
        assert set(image.diff().tolist()) == {1, 2} and int(image[-1] - image[0]) < 64


def test_dense_positions_change_the_answer_logits_only_through_rope(red_image):
    contiguous = build(reducers=[turbo()])
    dense = build(reducers=[turbo(positions="dense")])[0]
    batch = train_batch(contiguous, red_image)
    assert not torch.allclose(contiguous[0](**batch).logits, dense(**batch).logits)
    positions = dense.llm_inputs(
        batch["input_ids"], batch["attention_mask"], batch["pixel_values"]
    ).position_ids
    torch.testing.assert_close(contiguous[0](**batch, position_ids=positions).logits, dense(**batch).logits)


@pytest.mark.parametrize("llm_side", [[], [{"type": "pmod"}]], ids=["alone", "with-pmod"])
def test_dense_positions_decode_with_the_cache_as_in_a_full_recompute(llm_side, red_image, blue_image):
    vl = build("qwen2", reducers=[turbo(positions="dense"), *llm_side])
    kit.assert_cached_decode_matches_recompute(vl, "What shape is the blue object?", red_image, atol=ATOL)
    conversations = [chat("What color is the circle?"), chat("Is the yellow circle left or right of it?")]
    kit.assert_padded_batch_matches_one_by_one(vl, conversations, [[red_image], [blue_image]], atol=ATOL)


def test_original_positions_put_each_token_at_its_representative_patch(red_image, blue_image):
    reduced, _, processor = build(reducers=[turbo(positions="original", order="raster")])
    conversations = [chat("What color is it?"), chat("Is the yellow circle left or right of the big one?")]
    batch = processor(conversations, [[red_image], [blue_image]])  # row 0 is left-padded
    positions = reduced.llm_inputs(
        batch["input_ids"], batch["attention_mask"], batch["pixel_values"]
    ).position_ids
    visual = reduced.frontend.visual_mask(batch["input_ids"])
    patches = merger_of(reduced).output_positions()[:, 1:] - 1  # the tower's indices, CLS dropped
    assert patches.shape == (2, 64 - 16)
    for row in range(2):
        real = batch["attention_mask"][row].bool()
        start = int(positions[row][visual[row]][0] - patches[row, 0])  # where the full image would begin
        assert positions[row][visual[row]].tolist() == (start + patches[row]).tolist()
        assert bool((patches[row].diff() > 0).all())  # raster order: distinct, increasing
        after = positions[row][real & ~visual[row] & (visual[row].cumsum(0) > 0)]
        assert int(after[0]) == start + 64  # the text after sits where it would after the full image
        assert positions[row][real][0] == 0


def test_original_positions_without_merges_leave_the_llm_counting(red_image):
    vl = build(reducers=[turbo(r=0, positions="original")])
    batch = train_batch(vl, red_image)
    assert (
        vl[0].llm_inputs(batch["input_ids"], batch["attention_mask"], batch["pixel_values"]).position_ids
        is None
    )
    assert torch.equal(vl[0](**batch).logits, build()[0](**batch).logits)


# -- configs and errors -------------------------------------------------------------------------------------
def test_config_defaults_follow_the_official_llava_code():
    cfg = TurboConfig()
    assert (cfg.r, cfg.tokens, cfg.lam, cfg.beta, cfg.gamma, cfg.min_tokens) == (
        16,
        None,
        500.0,
        1.0,
        0.0,
        40,
    )
    assert cfg.proportional and cfg.order == "merge" and cfg.semantic == "auto"
    assert cfg.positions == "contiguous"  # the LLM numbers the kept tokens 0..V'-1, as the official code
    assert TurboConfig(tokens=288).r is None
    section = VLConfig.model_validate({"reducers": [{"type": "turbo", "r": [1, 2]}]}).reducers[0]
    assert isinstance(section, TurboConfig)
    assert TurboConfig.model_validate(section.model_dump()) == section


@pytest.mark.parametrize(
    ("settings", "match_text"),
    [
        ({"r": 4, "tokens": 10}, "either r"),
        ({"r": -1}, "greater than or equal to 0"),
        ({"lam": -1}, "greater than or equal to 0"),
        ({"semantic": "max"}, "semantic"),
        ({"r": [4, 4], "inflect": 0.5}, "inflect"),
        ({"tokens": 100, "inflect": 0.5}, "inflect"),
        ({"r": [4, 4], "first_blocks": 1}, "first_blocks"),
        ({"tokens": 100, "first_blocks": 0}, "greater than 0"),
        ({"inflect": 2}, "less than or equal to 1"),
        ({"rate": 3}, "rate"),
        ({"positions": "sparse"}, "positions"),
    ],
)
def test_invalid_settings_are_rejected_with_the_key(settings, match_text):
    with pytest.raises(ValidationError, match=match_text):
        TurboConfig.model_validate(settings)


@pytest.mark.parametrize(
    ("kwargs", "match_text"),
    [
        ({"reducers": [turbo(r=[1, 2, 3, 4])]}, "lists 4 values but the vision tower has only 3 encoder"),
        ({"reducers": [turbo(first_blocks=4)]}, "first_blocks=4 but the vision tower has only 3"),
        ({"tower": SIGLIP, "reducers": [turbo(semantic="cls")]}, "has no CLS token"),
        ({"reducers": [{"type": "turbo", "tokens": 5, "min_tokens": 0}]}, "cannot be reached"),
        ({"reducers": [{"type": "turbo", "tokens": 100}]}, "asks for 101 tokens"),
        ({"reducers": [turbo(), {"type": "tome"}]}, "one of them at a time"),
        ({"reducers": [turbo()], "vision": {"feature_layer": 0}}, "nothing to merge"),
        ({"reducers": [turbo()], "connector": {"merge": 2}}, "merge: 1"),
    ],
)
def test_unsupported_combinations_are_config_errors(kwargs, match_text):
    with pytest.raises(ConfigError, match=match_text):
        build(**kwargs)


@pytest.mark.parametrize("tower", ["resnet", "convnext"])
def test_cnn_towers_are_refused(tower):
    with pytest.raises(ConfigError, match="merges tokens inside ViT encoder blocks"):
        tiny_model("llama", tower, frontend={"connector": {"merge": 1}}, reducers=[turbo()])


@pytest.mark.parametrize("frontend", ["solo", "inf_llava", "adem_vl"])
def test_frontends_without_a_plain_tower_refuse_turbo(frontend):
    with pytest.raises(ConfigError, match=f"{frontend!r} front-end does not support"):
        tiny_model(frontend={"type": frontend}, reducers=[turbo()])
