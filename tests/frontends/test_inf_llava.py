"""INF-LLaVA front-end: the spec's testable properties, a loop-by-loop reference of the whole encoder,
and the LLM family matrix (loss and gradients, KV cache, left padding, save/load)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from transformers import PretrainedConfig

from vlbridge import testing as kit
from vlbridge.errors import ConfigError
from vlbridge.frontends import dual_perspective as dp
from vlbridge.frontends.dual_perspective import (
    DEM_VARIANTS,
    deinterleave,
    dual_crop,
    interleave,
    tile,
    untile,
)
from vlbridge.frontends.inf_llava import InfLlavaConfig, InfLlavaFrontend
from vlbridge.recipe import LoRASettings, StageConfig, load_recipe
from vlbridge.testing import TINY_LLM_CONFIGS, chat, tiny_model, train_batch
from vlbridge.training.stages import apply_stage

ATOL = 1e-4
RECIPE = Path(__file__).resolve().parents[2] / "recipes" / "inf_llava.yaml"
CASES = [(family, "clip_vision_model") for family in TINY_LLM_CONFIGS] + [
    ("llama", tower) for tower in ("siglip_vision_model", "convnext", "resnet")
]


def build(family: str = "llama", tower: str = "clip_vision_model", **frontend):
    return tiny_model(family, tower, frontend={"type": "inf_llava", **frontend})


def coordinates(size: int) -> torch.Tensor:
    """[1, 2, size, size]: channel 0 holds each pixel's row, channel 1 its column."""
    rows = torch.arange(size, dtype=torch.float64)[:, None].expand(size, size)
    return torch.stack([rows, rows.T])[None]


# -- dual-perspective cropping ------------------------------------------------------------------


@pytest.mark.parametrize("n", [1, 2, 3])
def test_local_crops_and_global_subimages_each_partition_the_image(n):
    """Property 1: every pixel appears exactly once among the n² local crops, and among the n² global ones."""
    r = 5
    image = torch.randperm(3 * (n * r) ** 2).reshape(1, 3, n * r, n * r)
    local, global_ = dual_crop(image, n)
    assert local.shape == global_.shape == (1, n * n, 3, r, r)
    for crops in (local, global_):
        assert torch.equal(crops.flatten().sort().values, image.flatten().sort().values)


def test_global_subimage_pixel_mapping():
    """Property 2: G_k(u, v) == X(a + u*n, b + v*n) with k = a*n + b; n = 1 leaves the image unchanged."""
    n, r = 3, 4
    image = torch.randn(2, 3, n * r, n * r)
    local, global_ = dual_crop(image, n)
    for a in range(n):
        for b in range(n):
            for u in range(r):
                for v in range(r):
                    torch.testing.assert_close(
                        global_[:, a * n + b, :, u, v], image[:, :, a + u * n, b + v * n]
                    )
            torch.testing.assert_close(
                local[:, a * n + b], image[:, :, a * r : (a + 1) * r, b * r : (b + 1) * r]
            )
    local, global_ = dual_crop(image, 1)
    assert torch.equal(local[:, 0], image) and torch.equal(global_[:, 0], image)


@pytest.mark.parametrize(("n", "h", "w"), [(1, 3, 3), (2, 3, 5), (3, 4, 4), (4, 2, 3)])
def test_cut_and_paste_round_trips(n, h, w):
    """Property 3: tile(untile(M)) == M and interleave(deinterleave(M)) == M, and the cuts differ."""
    grid = torch.randn(2, n * h, n * w, 7)
    assert torch.equal(tile(untile(grid, n), n), grid)
    assert torch.equal(interleave(deinterleave(grid, n), n), grid)
    parts = torch.randn(2, n * n, h, w, 7)
    assert torch.equal(untile(tile(parts, n), n), parts)
    assert torch.equal(deinterleave(interleave(parts, n), n), parts)
    if n > 1:
        assert not torch.equal(untile(grid, n), deinterleave(grid, n))


@pytest.mark.parametrize(("n", "r", "p"), [(3, 336, 14), (3, 24, 4), (2, 16, 2)])
def test_global_block_k_covers_the_pixels_of_local_crop_k(n, r, p):
    """Property 4: after stitching, contiguous block k of the global map sees exactly local crop k's pixels.

    A stand-in encoder reports, per p x p patch, the smallest and largest pixel row and column it sees.
    """
    local, global_ = dual_crop(coordinates(n * r), n)  # [1, n², 2, r, r]

    def patch_extent(crops: torch.Tensor) -> torch.Tensor:  # [1, n², 2, r, r] -> [1, n², g, g, 4]
        x = crops.flatten(0, 1)
        lo, hi = -F.max_pool2d(-x, p), F.max_pool2d(x, p)
        return torch.cat([lo, hi], 1).permute(0, 2, 3, 1).reshape(1, n * n, r // p, r // p, 4)

    local_map = tile(patch_extent(local), n)
    global_map = interleave(patch_extent(global_), n)
    for k, (loc, glo) in enumerate(zip(untile(local_map, n)[0], untile(global_map, n)[0], strict=True)):
        a, b = divmod(k, n)
        expected = torch.tensor([a * r, b * r, (a + 1) * r - 1, (b + 1) * r - 1], dtype=loc.dtype)
        for block in (loc, glo):
            extent = torch.cat([block[..., :2].amin((0, 1)), block[..., 2:].amax((0, 1))])
            assert torch.equal(extent, expected)


# -- the front-end ------------------------------------------------------------------------------


def reference_encode(frontend: InfLlavaFrontend, pixels: torch.Tensor) -> torch.Tensor:
    """The spec's data flow written loop by loop (one tower call per sub-image, one attention call per
    group), sharing only the weights with the front-end under test."""
    n, r = frontend.config.crops_per_side, frontend.tower_size
    dem, official = frontend.dem, frontend.config.dem_variant == "official"
    x = F.interpolate(pixels, size=(n * r, n * r), mode="bicubic", align_corners=False)

    def encode(view):  # [B, 3, r, r] -> [B, g, g, C]
        features, (h, w) = frontend.vision_tower(view)
        return features.reshape(view.shape[0], h, w, -1)

    blocks = [(a, b) for a in range(n) for b in range(n)]
    crops = {(a, b): encode(x[:, :, a * r : (a + 1) * r, b * r : (b + 1) * r]) for a, b in blocks}
    rows = [torch.cat([crops[a, b] for b in range(n)], dim=2) for a in range(n)]
    f_loc = torch.cat(rows, dim=1)  # tiles side by side
    g = f_loc.shape[1] // n
    f_glo = torch.zeros_like(f_loc)
    for a, b in blocks:
        f_glo[:, a::n, b::n] = encode(x[:, :, a::n, b::n])

    def contiguous(m, a, b):
        return m[:, a * g : (a + 1) * g, b * g : (b + 1) * g]

    def strided(m, a, b):
        return m[:, a::n, b::n]

    def attend(attention, cut, query, context):
        out = torch.zeros_like(query)
        for a, b in blocks:
            q, kv = cut(query, a, b), cut(context, a, b)  # [B, g, g, C]
            cut(out, a, b)[...] = attention(q.flatten(1, 2), kv.flatten(1, 2)).view_as(q)
        return out

    if official:
        s = attend(dem.attention, contiguous, f_glo, f_loc)
        c = attend(dem.attention, strided, f_loc, f_glo)
        u = dem.norm(torch.cat([dem.phi_local(c), dem.phi_global(s)], -1) + s + c)
        small = F.interpolate(u.permute(0, 3, 1, 2), size=(g, g), mode="bilinear", align_corners=False)
    else:
        s = attend(dem.attend_global, strided, f_glo, f_loc)
        c = attend(dem.attend_local, contiguous, f_loc, f_glo)
        u = torch.cat([dem.proj_local(c), dem.proj_global(s)], -1)
        small = F.avg_pool2d(u.permute(0, 3, 1, 2), n)
    high = small.permute(0, 2, 3, 1).flatten(1, 2)
    low = encode(F.interpolate(x, size=(r, r), mode="bicubic", align_corners=False)).flatten(1, 2)
    blended = (low + high) / 2 if official else low + high
    return frontend.connector(blended, (g, g))


@pytest.mark.parametrize(
    ("tower", "frontend"),
    [
        ("clip_vision_model", {}),
        ("clip_vision_model", {"dem_variant": "paper"}),
        ("siglip_vision_model", {"crops_per_side": 2}),
        ("convnext", {"crops_per_side": 2, "dem_heads": 4}),
        ("resnet", {"connector": {"merge": 1}}),
    ],
)
def test_encode_matches_the_loop_by_loop_reference(tower, frontend):
    model, _, _ = build("llama", tower, **frontend)
    pixels = torch.randn(2, 3, 80, 80)
    with torch.no_grad():
        torch.testing.assert_close(model.frontend.encode(pixels), reference_encode(model.frontend, pixels))


def test_all_views_go_through_the_tower_in_one_call():
    model, _, _ = build()
    calls = []
    model.frontend.vision_tower.register_forward_hook(lambda m, args, out: calls.append(args[0].shape))
    model.frontend.encode(torch.randn(2, 3, 96, 96))
    assert calls == [(2 * (2 * 9 + 1), 3, 32, 32)]


def test_output_is_base_grid_tokens_for_any_input_size(red_image):
    """Property 5: (B, g², D) whatever the input size, and the processor gives n*r pixels."""
    model, _, processor = build()
    frontend = model.frontend
    assert frontend.layout.image_processor(red_image).shape == (3, 96, 96)
    for size in (40, 96, 150):
        assert frontend.encode(torch.randn(3, 3, size, size)).shape == (3, 4, 64)


def test_default_sizes_give_576_tokens_from_1008_pixels():
    """Property 5 at the paper's sizes: a ViT-L/14-336 geometry (1 narrow layer) and n = 3."""
    clip_l_336 = {"image_size": 336, "patch_size": 14, "num_hidden_layers": 1, "num_attention_heads": 2}
    narrow = {"hidden_size": 32, "intermediate_size": 32}
    vision = {"model_type": "clip_vision_model", "config": {**clip_l_336, **narrow}}
    config = InfLlavaConfig.model_validate({"vision": vision})
    frontend = InfLlavaFrontend(config, PretrainedConfig(hidden_size=64))
    assert frontend.layout.image_processor.size == 1008 and frontend.layout.num_image_tokens() == 576
    with torch.no_grad():
        assert frontend.encode(torch.randn(1, 3, 1008, 1008)).shape == (1, 576, 64)


# -- the enhancement module ---------------------------------------------------------------------


def tiny_dem(variant: str = "official", n: int = 3, channels: int = 32, heads: int = 4):
    torch.manual_seed(0)
    return DEM_VARIANTS[variant](channels, n, heads)


def test_official_shrink_is_centre_sampling_so_only_strided_group_4_of_c_matters():
    """Property 6: the output reads U only where row and column are ≡ 1 (mod 3); of the local-query
    branch C, only strided group k = 4 (a = b = 1) changes the output or receives gradient."""
    dem, g = tiny_dem(), 4
    u = torch.randn(2, 3 * g, 3 * g, 32)
    torch.testing.assert_close(dem.shrink(u, (g, g)), u[:, 1::3, 1::3])
    centre = torch.zeros(3 * g, 3 * g, dtype=torch.bool)
    centre[1::3, 1::3] = True
    perturbed = torch.where(centre[None, :, :, None], u, torch.randn_like(u))
    assert torch.equal(dem.shrink(perturbed, (g, g)), dem.shrink(u, (g, g)))

    local, global_ = torch.randn(2, 3 * g, 3 * g, 32), torch.randn(2, 3 * g, 3 * g, 32)
    c = dem.enhance_local(local, global_).detach().requires_grad_()
    dem.shrink(dem.fuse(c, dem.enhance_global(local, global_)), (g, g)).square().sum().backward()
    per_group = deinterleave(c.grad, 3).abs().sum((0, 2, 3, 4))  # [9]
    assert per_group[4] > 0 and (per_group[torch.arange(9) != 4] == 0).all()


@pytest.mark.parametrize("variant", ["official", "paper"])
def test_attention_matches_the_written_formula(variant):
    """official: LN(W_o concat_h softmax(Q W_q^h (K W_k^h)ᵀ / √d_h) K W_v^h + Q); paper: one head, no
    W_o, residual or norm."""
    heads = 4 if variant == "official" else 1
    dem = tiny_dem(variant, heads=heads)
    attention = dem.attention if variant == "official" else dem.attend_local
    query, context = torch.randn(3, 10, 32), torch.randn(3, 10, 32)
    q, k, v = attention.q_proj(query), attention.k_proj(context), attention.v_proj(context)
    out = []
    for h in range(heads):
        cols = slice(h * 32 // heads, (h + 1) * 32 // heads)
        weights = torch.softmax(q[..., cols] @ k[..., cols].transpose(1, 2) / (32 / heads) ** 0.5, -1)
        out.append(weights @ v[..., cols])
    expected = torch.cat(out, -1)
    if variant == "official":
        expected = attention.norm(attention.out_proj(expected) + query)
    torch.testing.assert_close(attention(query, context), expected)


@pytest.mark.parametrize("n", [2, 4])
def test_official_shrink_for_other_crop_counts(n):
    """The bilinear shrink is a 2x2 mean for n = 2 and averages rows/cols 4i+1 and 4i+2 for n = 4."""
    dem, g = tiny_dem(n=n), 3
    u = torch.randn(1, n * g, n * g, 32)
    if n == 2:
        expected = (u[:, 0::2] + u[:, 1::2]) / 2
        expected = (expected[:, :, 0::2] + expected[:, :, 1::2]) / 2
    else:
        expected = (u[:, 1::4] + u[:, 2::4]) / 2
        expected = (expected[:, :, 1::4] + expected[:, :, 2::4]) / 2
    torch.testing.assert_close(dem.shrink(u, (g, g)), expected)


def test_paper_shrink_averages_each_cell():
    dem, g = tiny_dem("paper", heads=1), 2
    u = torch.randn(1, 3 * g, 3 * g, 32)
    torch.testing.assert_close(dem.shrink(u, (g, g))[0, 1, 0], u[0, 3:6, 0:3].mean((0, 1)))


@pytest.mark.parametrize("channels", [32, 1024])
def test_official_dem_parameter_count(channels):
    """Property 7: 4(C² + C) + 2C + 2(C·C/16 + C/16 + (C/16)(C/2) + C/2) + 2C (4,400,256 for C = 1024)."""
    c, b = channels, channels // 16
    expected = 4 * (c * c + c) + 2 * c + 2 * (c * b + b + b * (c // 2) + c // 2) + 2 * c
    assert sum(p.numel() for p in tiny_dem(channels=channels, heads=8).parameters()) == expected
    if channels == 1024:
        assert expected == 4_400_256


@pytest.mark.parametrize("variant", ["official", "paper"])
def test_each_attention_call_sees_base_grid_sequences(monkeypatch, variant):
    """Property 10: attention runs inside groups of g² tokens (all groups batched), never on (n·g)²."""
    n, g, b, heads = 3, 4, 2, 4
    dem = tiny_dem(variant, n=n, heads=heads)
    seen = []
    sdpa = F.scaled_dot_product_attention

    def spy(q, k, v, *args, **kwargs):
        seen.append((tuple(q.shape), tuple(k.shape)))
        return sdpa(q, k, v, *args, **kwargs)

    monkeypatch.setattr(dp.F, "scaled_dot_product_attention", spy)
    out = dem(torch.randn(b, n * g, n * g, 32), torch.randn(b, n * g, n * g, 32), (g, g))
    assert out.shape == (b, g * g, 32)
    assert seen == [((b * n * n, heads, g * g, 32 // heads),) * 2] * 2  # one call per direction


# -- training and the LLM -----------------------------------------------------------------------


def test_stage_one_trains_exactly_the_dem_and_connector(red_image):
    """Property 8: with the tower and LLM frozen only DEM + connector require grad; the tower gets none."""
    vl = build()
    model = vl[0]
    stage = StageConfig(name="align", modules={"dem": "full", "connector": "full"}, steps=1)
    apply_stage(model, stage, LoRASettings())
    trainable = {name.split(".")[1] for name, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"dem", "connector"}
    assert all(
        p.requires_grad for p in [*model.frontend.dem.parameters(), *model.frontend.connector.parameters()]
    )
    model(**train_batch(vl, red_image)).loss.backward()
    assert all(p.grad is None for p in model.frontend.vision_tower.parameters())
    assert all(p.grad is None for p in model.language_model.parameters())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.frontend.dem.parameters())


def test_text_only_sample_gives_the_bare_llm_logits():
    """Property 9."""
    model, tokenizer, processor = build()
    ids = torch.tensor([processor.encode([{"role": "user", "content": "What shape is it?"}]).input_ids])
    torch.testing.assert_close(model(ids).logits, model.language_model(input_ids=ids).logits, atol=0, rtol=0)


def test_options_that_do_not_fit_are_config_errors():
    with pytest.raises(ConfigError, match=r"feature_select='cls_patch'.*feature_select='patch'"):
        load_recipe(RECIPE, ["model.frontend.vision.feature_select=cls_patch"])
    with pytest.raises(ConfigError, match=r"32-wide features.*dem_heads=5"):
        build(dem_heads=5)
    with pytest.raises(ConfigError, match=r"frontend.image.size .* resnet"):
        build("llama", "resnet", image={"size": None})


@pytest.fixture(scope="module", params=CASES, ids=[f"{f}-{t}" for f, t in CASES])
def vl(request):
    return build(*request.param)


def test_loss_is_finite_and_gradients_reach_every_trainable_part(vl, red_image):
    model, tokenizer, processor = vl
    batch = train_batch(vl, red_image)
    assert batch["pixel_values"].shape[-2:] == (96, 96)
    model.zero_grad()
    loss = model(**batch).loss
    assert torch.isfinite(loss)
    loss.backward()
    for group in ("dem", "connector"):
        assert all(p.grad.abs().sum() > 0 for p in model.get_group(group).parameters()), group
    # layers above vision.feature_layer get none; the rest of the tower does
    assert sum(p.grad.abs().sum() for p in model.get_group("vision_tower").parameters() if p.grad is not None)
    model.zero_grad()


def test_cached_decode_equals_full_recompute(vl, red_image):
    kit.assert_cached_decode_matches_recompute(vl, "What shape is the blue object?", red_image, atol=ATOL)


def test_left_padded_batch_equals_one_by_one(vl, red_image, blue_image):
    conversations = [chat("What color is the circle?"), chat("Is the yellow circle left or right of it?")]
    images = [[red_image], [blue_image]]
    batch = kit.assert_padded_batch_matches_one_by_one(vl, conversations, images, atol=ATOL)
    assert batch["attention_mask"][1].all()  # only row 0 is padded


def test_save_load_round_trip(vl, red_image, tmp_path):
    loaded = kit.assert_save_load_round_trip(vl, train_batch(vl, red_image), red_image, tmp_path / "ckpt")
    assert loaded.frontend.layout.image_processor == vl[0].frontend.layout.image_processor
    assert loaded.config.frontend.image.size == 32 and loaded.config.frontend.crops_per_side == 3
