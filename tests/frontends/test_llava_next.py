"""LLaVA-NeXT front-end: parity with transformers' LlavaNext (pixels, token counts, image features, prefill
logits), the processor's per-image counts through VLProcessor, training, and the conformance kit."""

from __future__ import annotations

import pytest
import torch
from PIL import Image
from transformers import LlavaNextConfig as HFLlavaNextConfig
from transformers import LlavaNextForConditionalGeneration, LlavaNextImageProcessorPil, LlavaNextProcessor
from transformers.image_processing_utils import get_patch_output_size
from transformers.image_processing_utils import select_best_resolution as hf_select_best_resolution
from transformers.image_utils import ChannelDimension, PILImageResampling
from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

from vlbridge import testing as kit
from vlbridge.errors import ConfigError, DataError
from vlbridge.frontends.llava_next import (  # importing registers the front-end
    LlavaNextConfig,
    LlavaNextFrontend,
    fit_size,
    read_headers,
    select_best_resolution,
)
from vlbridge.processing import pad_batch
from vlbridge.recipe import LoRASettings, StageConfig
from vlbridge.registry import FRONTENDS
from vlbridge.testing import chat, train_batch
from vlbridge.training.stages import apply_stage
from vlbridge.vision_towers import CLIP_MEAN, CLIP_STD

S = 32  # the tiny tower's input: 8-px patches, a 4 x 4 grid per view
PINPOINTS = [[32, 32], [32, 64], [64, 32], [64, 64], [32, 96], [96, 32]]
SIZES = {  # (width, height): which pinpoint wins, and how much unpadding cuts
    "wide": (90, 30),
    "tall": (28, 75),
    "square": (50, 50),
    "tiny": (7, 5),
    "tile": (32, 32),
    "large": (140, 100),
    "flat": (64, 20),
    "narrow": (20, 64),
}
ATOL = 1e-5


def build(family: str = "llama", tower: str = "clip_vision_model", **frontend):
    return kit.tiny_model(family, tower, frontend={"type": "llava_next", **frontend})


def scene(size: tuple[int, int], seed: int = 0) -> Image.Image:
    """Random RGB noise of (width, height), so every resize and tile differs."""
    gen = torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, 256, (size[1], size[0], 3), generator=gen, dtype=torch.uint8)
    return Image.fromarray(pixels.numpy())


IMAGES = {name: scene(size, seed) for seed, (name, size) in enumerate(SIZES.items())}


def transformers_image_processor() -> LlavaNextImageProcessorPil:
    """transformers' PIL processor set up as our config: s-px shortest edge and crop, bicubic, CLIP stats."""
    return LlavaNextImageProcessorPil(
        size={"shortest_edge": S},
        crop_size={"height": S, "width": S},
        image_grid_pinpoints=PINPOINTS,
        resample=PILImageResampling.BICUBIC,
        image_mean=list(CLIP_MEAN),
        image_std=list(CLIP_STD),
    )


def from_transformers(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers' LlavaNextForConditionalGeneration state dict (in-memory names) -> VLModel's."""
    renames = [
        ("model.vision_tower.", "frontend.vision_tower.model."),
        ("model.multi_modal_projector.linear_1.", "frontend.connector.proj.0."),
        ("model.multi_modal_projector.linear_2.", "frontend.connector.proj.2."),
        ("model.image_newline", "frontend.image_newline.weight"),
        ("model.language_model.", "language_model.model."),
        ("lm_head.", "language_model.lm_head."),
    ]
    out = {}
    for key, value in state.items():
        old, new = next((o, n) for o, n in renames if key.startswith(o))
        out[new + key[len(old) :]] = value
    return out


@pytest.fixture(scope="module")
def vl():
    return build()


@pytest.fixture(scope="module")
def pair():
    """(our model, tokenizer, processor, transformers' model) with transformers' weights in ours."""
    model, tokenizer, processor = build()
    config = HFLlavaNextConfig(
        vision_config=model.frontend.vision_tower.hf_config.to_dict(),
        text_config=model.language_model.config.to_dict(),
        image_grid_pinpoints=PINPOINTS,
        image_token_index=model.frontend.image_token_id,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
    )
    config.text_config._attn_implementation = model.language_model.config._attn_implementation
    torch.manual_seed(1)
    theirs = LlavaNextForConditionalGeneration(config).eval()
    model.load_state_dict(from_transformers(theirs.state_dict()), strict=True)
    return model, tokenizer, processor, theirs


# -- geometry -------------------------------------------------------------------------------------


def test_resolution_choice_fit_and_count_are_transformers_rules():
    sizes = [
        (h, w) for h in (1, 5, 20, 31, 32, 33, 47, 64, 65, 100, 333) for w in (1, 7, 32, 50, 96, 101, 640)
    ]
    for height, width in sizes:
        best = select_best_resolution(height, width, PINPOINTS)
        assert best == hf_select_best_resolution((height, width), PINPOINTS)
        image = torch.zeros(3, height, width)
        assert fit_size(height, width, *best) == get_patch_output_size(image, best, ChannelDimension.FIRST)
        layout = build_layout()
        assert layout.anyres.views(height, width) == image_size_to_num_patches((height, width), PINPOINTS, S)


def build_layout(**frontend):
    return LlavaNextFrontend.image_layout(
        LlavaNextConfig.model_validate(
            {**kit.TINY_FRONTEND_CONFIGS["llava_next"]("clip_vision_model"), **frontend}
        )
    )


def test_default_pinpoints_are_llava_next_s_at_the_tower_size():
    """A 336-px, 14-px-patch tower: LLaVA-NeXT's own pinpoints and counts (e.g. 2928 tokens at 672 x 672)."""
    config = LlavaNextConfig(vision={"config": {"image_size": 336, "patch_size": 14}})
    anyres = LlavaNextFrontend.image_layout(config).anyres
    hf = HFLlavaNextConfig()
    assert [list(p) for p in anyres.pinpoints] == hf.image_grid_pinpoints
    assert (anyres.tile, anyres.grid) == (336, 24)
    assert anyres.num_tokens(672, 672) == 24 * 24 + 48 * 49 == 2928
    processor = LlavaNextProcessor(
        LlavaNextImageProcessorPil(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336}),
        kit.tiny_tokenizer(kit.tiny_vl_config()),
        patch_size=14,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
    )
    for height, width in [(480, 640), (768, 1024), (1080, 1920), (300, 2000), (2000, 300), (100, 100)]:
        expected = processor._get_number_of_features(height, width, 336, 336) - 1  # "default": no CLS
        assert anyres.num_tokens(height, width) == expected


# -- parity with transformers ---------------------------------------------------------------------


def test_transparent_and_palette_images_are_made_rgb_as_transformers_does(vl):
    processor = vl[2]
    rgba = scene((45, 70), seed=9).convert("RGBA")
    rgba.putalpha(Image.linear_gradient("L").resize(rgba.size))
    for image in (rgba, scene((60, 30), seed=10).convert("P"), scene((20, 20), seed=11).convert("L")):
        item = processor.layout.image_processor(image)
        theirs = transformers_image_processor()(image, return_tensors="pt")["pixel_values"][0]
        torch.testing.assert_close(item[:, :, :S], theirs, atol=1e-6, rtol=0)


@pytest.mark.parametrize("name", SIZES)
def test_pixels_and_token_count_match_transformers(pair, name):
    model, tokenizer, processor, _ = pair
    image = IMAGES[name]
    item = processor.layout.image_processor(image)
    theirs = transformers_image_processor()(image, return_tensors="pt")
    views = theirs["pixel_values"][0]
    assert item.shape == (len(views), 3, S + 1, S)
    torch.testing.assert_close(item[:, :, :S], views, atol=1e-6, rtol=0)
    assert read_headers(item, model.frontend.anyres) == [(image.height, image.width, len(views))]

    hf_processor = LlavaNextProcessor(
        transformers_image_processor(),
        tokenizer,
        patch_size=8,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
    )
    hf_ids = hf_processor(images=[image], text=["<image>"], return_tensors="pt")["input_ids"]
    count = int((hf_ids == model.frontend.image_token_id).sum())
    assert processor.layout.num_image_tokens(item) == count
    assert processor.layout.placeholder(item) == "<image>" * count
    encoded = processor.encode(chat("What color?", "red"), [image])
    assert sum(t == model.frontend.image_token_id for t in encoded.input_ids) == count


def test_image_features_match_transformers(pair):
    """Every size in one batch: tower, projector, stitching, unpadding, newlines, base view first."""
    model, _, processor, theirs = pair
    images = list(IMAGES.values())
    pixels = processor.layout.collate([processor.layout.image_processor(im) for im in images])
    hf = transformers_image_processor()(images, return_tensors="pt")
    with torch.no_grad():
        ours = model.frontend.encode_images(pixels)
        packed = model.frontend.encode(pixels)
        expected = theirs.get_image_features(hf["pixel_values"], hf["image_sizes"]).pooler_output
    assert [len(f) for f in ours] == [len(f) for f in expected]
    for got, want in zip(ours, expected, strict=True):
        torch.testing.assert_close(got, want, atol=ATOL, rtol=0)
    torch.testing.assert_close(packed, torch.cat(expected)[None], atol=ATOL, rtol=0)


def test_prefill_logits_match_transformers(pair):
    """A left-padded batch (two images in row 0, one in row 1): VLModel.forward vs transformers' forward."""
    model, _, processor, theirs = pair
    images = [[IMAGES["wide"], IMAGES["tall"]], [IMAGES["large"]]]
    conversations = [
        [{"role": "user", "content": "<image>\n<image>\nWhich one is wider?"}],
        chat("What shape is the blue object?"),
    ]
    batch = processor(conversations, images)
    hf = transformers_image_processor()([im for row in images for im in row], return_tensors="pt")
    with torch.no_grad():
        ours = model(**batch).logits
        expected = theirs(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            pixel_values=hf["pixel_values"],
            image_sizes=hf["image_sizes"],
        ).logits
    real = batch["attention_mask"].bool()
    assert not real.all()  # row 1 is left-padded
    torch.testing.assert_close(ours[real], expected[real], atol=ATOL, rtol=0)


# -- the processor's counts through the pipeline ---------------------------------------------------


def test_every_size_expands_to_its_count_and_the_forward_passes_the_strict_check(vl):
    model, tokenizer, processor = vl
    counts = []
    for name, image in IMAGES.items():
        batch = processor([chat("What color is the circle?")], [[image]])
        slots = int((batch["input_ids"] == model.frontend.image_token_id).sum())
        assert slots == model.frontend.anyres.num_tokens(image.height, image.width), name
        with torch.no_grad():
            out = model(**batch)
        assert out.image_hidden_states.shape == (1, slots, model.frontend.text_hidden_size)
        counts.append(slots)
    assert len(set(counts)) > 3  # the count really follows the image


def test_a_placeholder_too_few_is_a_data_error_naming_the_counts(vl):
    model, _, processor = vl
    batch = processor([chat("What color?")], [[IMAGES["wide"]]])
    ids = batch["input_ids"].clone()
    ids[0, (ids[0] == model.frontend.image_token_id).nonzero()[0, 0]] = 0  # one placeholder becomes text
    with pytest.raises(DataError, match=r"placeholder count mismatch.*1 images make \[\d+\]"):
        model(ids, batch["attention_mask"], batch["pixel_values"])


def test_pixel_items_survive_a_half_precision_cast_and_refuse_being_cut(vl):
    model, _, processor = vl
    images = [IMAGES["large"], IMAGES["tiny"], scene((4000, 300))]
    pixels = processor.layout.collate([processor.layout.image_processor(im) for im in images])
    sizes = [(im.height, im.width) for im in images]
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        assert [(h, w) for h, w, _ in read_headers(pixels.to(dtype), model.frontend.anyres)] == sizes
    with pytest.raises(DataError, match="cut or reordered"):
        read_headers(pixels[:3], model.frontend.anyres)
    with pytest.raises(DataError, match="no llava_next header"):
        read_headers(pixels[1:], model.frontend.anyres)
    with pytest.raises(DataError, match=r"\[views, 3, 33, 32\]"):
        read_headers(pixels[:, :, :S], model.frontend.anyres)


# -- training -------------------------------------------------------------------------------------


def test_loss_backward_reaches_the_connector_and_image_newline(vl):
    model = build()[0]
    stage = StageConfig(name="align", modules={"connector": "full", "image_newline": "full"}, steps=1)
    apply_stage(model, stage, LoRASettings())
    batch = train_batch((model, *vl[1:]), IMAGES["wide"])
    loss = model.train()(**batch).loss
    assert torch.isfinite(loss)
    loss.backward()
    for group in ("connector", "image_newline"):
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.get_group(group).parameters())
    assert all(p.grad is None for p in model.frontend.vision_tower.parameters())
    assert all(p.grad is None for p in model.language_model.parameters())


def test_module_groups_and_newline_init():
    model = build()[0]
    assert model.frontend.group_paths() == {
        "vision_tower": "vision_tower.model",
        "connector": "connector",
        "image_newline": "image_newline",
    }
    torch.manual_seed(0)
    newline = type(model.frontend.image_newline)(4096).weight
    assert newline.shape == (4096,) and abs(float(newline.detach().std()) - 4096**-0.5) < 0.05 * 4096**-0.5


# -- config ---------------------------------------------------------------------------------------


def test_registered():
    assert "llava_next" in FRONTENDS and FRONTENDS.config_class("llava_next") is LlavaNextConfig


@pytest.mark.parametrize(
    ("override", "match"),
    [
        ({"image_grid_pinpoints": [[32, 48]]}, r"multiples of the tower's 32-px.*\[\[32, 64\]\]"),
        ({"image_grid_pinpoints": [[32]]}, r"\[height, width\] pairs"),
        ({"vision": {"feature_select": "cls_patch"}}, r"feature_select='patch'"),
        ({"connector": {"merge": 2}}, r"merge: 1"),
        ({"image": {"size": S, "resize": "pad"}}, r"resize: squash"),
    ],
)
def test_options_that_do_not_fit_are_config_errors(override, match):
    with pytest.raises(ValueError, match=match):  # a ConfigError, wrapped by pydantic when in the config
        build(**override)


def test_tower_reducers_are_refused():
    with pytest.raises(ConfigError, match="tower reducer"):
        kit.tiny_model(frontend={"type": "llava_next"}, reducers=[{"type": "turbo", "r": 2}])


# -- conformance kit ------------------------------------------------------------------------------


def test_cached_decode_equals_full_recompute(vl):
    kit.assert_cached_decode_matches_recompute(
        vl, "What shape is the blue object?", IMAGES["wide"], atol=1e-4
    )


def test_left_padded_batch_equals_one_by_one(vl):
    conversations = [chat("What color is the circle?"), chat("Is the yellow circle left or right of it?")]
    kit.assert_padded_batch_matches_one_by_one(
        vl, conversations, [[IMAGES["tiny"]], [IMAGES["tall"]]], atol=1e-4
    )


def test_save_load_round_trip(vl, tmp_path):
    batch = train_batch(vl, IMAGES["large"])
    loaded = kit.assert_save_load_round_trip(vl, batch, IMAGES["square"], tmp_path / "ckpt")
    assert loaded.frontend.layout == vl[0].frontend.layout
    assert loaded.config.frontend.image_grid_pinpoints == PINPOINTS and loaded.config.frontend.image.size == S


def test_text_only_batch_gives_the_bare_llm_logits(vl):
    model, _, processor = vl
    ids = torch.tensor([processor.encode([{"role": "user", "content": "What shape is it?"}]).input_ids])
    torch.testing.assert_close(model(ids).logits, model.language_model(input_ids=ids).logits, atol=0, rtol=0)


def test_pad_batch_stacks_views_of_all_samples(vl):
    model, tokenizer, processor = vl
    samples = [processor.encode(chat("Q?", "A"), [IMAGES[n]]) for n in ("wide", "tiny")]
    batch = pad_batch(samples, tokenizer.pad_token_id, processor.layout)
    views = [model.frontend.anyres.views(IMAGES[n].height, IMAGES[n].width) for n in ("wide", "tiny")]
    assert batch["pixel_values"].shape == (sum(views), 3, S + 1, S)
