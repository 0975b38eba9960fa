"""SOLO front-end: resize rule, patch layout, additive patch embedding, loss mask, LoRA token rows and the
LLM-family matrix (spec /work/shared/specs/solo.md §7, properties 1-10)."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from transformers import PretrainedConfig

from vlbridge import testing as kit
from vlbridge.errors import ConfigError, DataError
from vlbridge.factory import load_pretrained
from vlbridge.frontends.solo import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    PATCH,
    ROW_SEP,
    VISION_END,
    VISION_START,
    SoloConfig,
    SoloFrontend,
    patchify,
    solo_size,
)
from vlbridge.modeling import build_llm
from vlbridge.processing import IGNORE_INDEX, DropCounter, pad_batch
from vlbridge.recipe import LoRASettings, StageConfig, load_recipe
from vlbridge.registry import FRONTENDS
from vlbridge.testing import TINY_LLM_CONFIGS, chat, tiny_model, train_batch
from vlbridge.training.stages import apply_stage, optimizer_groups

RECIPE = Path(__file__).resolve().parents[2] / "recipes" / "solo.yaml"
FAMILIES = list(TINY_LLM_CONFIGS)
SOLO = {"type": "solo"}  # the tiny config: 8-px patches, long side capped at 48 px
P = 8
ATOL = 1e-4


def scene(color: tuple[int, int, int], size: tuple[int, int]) -> Image.Image:
    """A one-colour image with a contrasting square, so patches differ."""
    image = Image.new("RGB", size, color)
    image.paste(tuple(255 - c for c in color), (size[0] // 4, size[1] // 4, size[0] // 2, size[1] // 2))
    return image


RED = scene((230, 40, 40), (32, 32))  # 4 x 4 patches
BLUE = scene((50, 100, 245), (48, 40))  # 5 rows x 6 columns


def vision_ids(vl) -> list[int]:
    _, tokenizer, _ = vl
    return tokenizer.convert_tokens_to_ids([VISION_START, PATCH, ROW_SEP, VISION_END])


@pytest.fixture(scope="module")
def vl():
    return tiny_model("llama", frontend=SOLO)


@pytest.fixture(scope="module", params=FAMILIES)
def family_vl(request):
    return tiny_model(request.param, frontend=SOLO)


# -- config -----------------------------------------------------------------------------------------
def test_registered_with_paper_defaults():
    assert "solo" in FRONTENDS and FRONTENDS.config_class("solo") is SoloConfig
    config = SoloConfig()
    assert (config.patch_size, config.max_side, config.end_token, config.init_std) == (
        32,
        1024,
        "</vision>",
        0.02,
    )


@pytest.mark.parametrize(
    ("override", "fix"),
    [
        ("model.frontend.max_side=100", "set frontend.max_side to 96 or 104"),
        ("model.frontend.max_side=4", "to 8"),
    ],
)
def test_cap_that_is_not_whole_patches_is_a_config_error(override, fix):
    with pytest.raises(ConfigError) as err:
        load_recipe(RECIPE, [override])
    message = str(err.value)
    assert "frontend.max_side=" in message and "frontend.patch_size=8" in message and fix in message


def test_unknown_end_token_is_rejected():
    with pytest.raises(
        ConfigError, match=r"model.frontend.end_token: Input should be '</vision>' or '<vision>'"
    ):
        load_recipe(RECIPE, ["model.frontend.end_token=<end>"])


# -- resize, normalise, patchify (properties 2 and 3) ----------------------------------------------------
@pytest.mark.parametrize(
    ("size", "resized", "n_tokens"),
    [
        ((640, 480), (640, 480), 316),
        ((480, 640), (480, 640), 15 * 20 + 20 + 1),  # portrait: the axes keep their roles
        ((1024, 1024), (1024, 1024), 1057),
        ((2000, 1000), (1024, 512), 529),
        ((33, 33), (64, 64), 7),
    ],
)
def test_paper_examples_sizes_and_token_counts(size, resized, n_tokens):
    assert solo_size(*size, 32, 1024) == resized
    frontend = SoloFrontend(SoloConfig(), PretrainedConfig(hidden_size=8))
    patches = frontend.layout.image_processor(Image.new("RGB", size, (10, 200, 30)))
    assert patches.shape == (resized[1] // 32, resized[0] // 32, 3 * 32 * 32)
    assert frontend.layout.num_image_tokens(patches) == n_tokens


def test_resize_rule_invariants_and_degenerate_clamp():
    rng = np.random.default_rng(0)
    for width, height in rng.integers(1, 3000, size=(300, 2)).tolist():
        new_w, new_h = solo_size(width, height, 32, 1024)
        assert new_w % 32 == 0 and new_h % 32 == 0
        assert 32 <= min(new_w, new_h) <= max(new_w, new_h) <= 1024
        assert new_w >= new_h if width >= height else new_h >= new_w  # the long side stays on its axis
        long, short = max(width, height), min(width, height)
        new_long = min(-(-long // 32) * 32, 1024)
        assert max(new_w, new_h) == new_long
        assert min(new_w, new_h) == max(-(-(new_long * short // long) // 32) * 32, 32)
    # §8: beyond ~1024:1 the short side would scale to 0 px; it is clamped to one patch.
    assert solo_size(5000, 2, 32, 1024) == (1024, 32)
    assert solo_size(2, 5000, 32, 1024) == (32, 1024)
    assert solo_size(20, 12, 8, 48) == (24, 16)


def test_patchify_is_the_channel_major_bijection():
    x = torch.randn(3, 2 * P, 3 * P)
    patches = patchify(x, P)
    assert patches.shape == (2, 3, 3 * P * P)
    for r, c, ch, y, xx in [(0, 0, 0, 0, 0), (1, 2, 2, 7, 5), (0, 1, 1, 3, 6), (1, 0, 2, 0, 7)]:
        assert patches[r, c, ch * P * P + y * P + xx] == x[ch, r * P + y, c * P + xx]
    # un-patchify by the same index rule restores every pixel exactly
    unpatched = patches.reshape(2, 3, 3, P, P).permute(2, 0, 3, 1, 4).reshape(3, 2 * P, 3 * P)
    assert torch.equal(unpatched, x)
    assert torch.equal(patches.flatten(0, 1).unique(), x.unique())


def test_processor_uses_pil_bilinear_and_imagenet_statistics():
    rng = np.random.default_rng(1)
    image = Image.fromarray(rng.integers(0, 256, size=(12, 20, 3), dtype=np.uint8))  # W 20 x H 12
    frontend = SoloFrontend(SoloConfig(patch_size=P, max_side=48), PretrainedConfig(hidden_size=8))
    patches = frontend.layout.image_processor(image)
    assert patches.shape == (2, 3, 3 * P * P)  # resized to 24 x 16
    for resample, same in ((Image.BILINEAR, True), (Image.BICUBIC, False)):
        pixels = np.asarray(image.resize((24, 16), resample), dtype=np.float32) / 255.0  # [H, W, 3]
        normalised = (pixels - np.array(IMAGENET_MEAN, dtype=np.float32)) / np.array(
            IMAGENET_STD, dtype=np.float32
        )
        expected = patchify(torch.from_numpy(normalised.transpose(2, 0, 1).copy()), P)
        assert torch.equal(patches, expected) is same


# -- token layout ----------------------------------------------------------------------------------
@pytest.mark.parametrize("end_token", ["</vision>", "<vision>"])
def test_image_block_layout(end_token):
    model, tokenizer, processor = tiny_model("llama", frontend={**SOLO, "end_token": end_token})
    sample = processor.encode(chat("What shape is the blue object?", "square"), [BLUE])
    ids = torch.tensor(sample.input_ids)
    start = tokenizer.convert_tokens_to_ids(VISION_START)
    first = int((ids == start).nonzero()[0])
    n = model.frontend.layout.num_image_tokens(sample.pixel_values[0])
    assert n == 5 * 6 + 5 + 1
    row = [PATCH] * 6
    expected = [VISION_START, *row, ROW_SEP, *row, ROW_SEP, *row, ROW_SEP, *row, ROW_SEP, *row, end_token]
    assert tokenizer.convert_ids_to_tokens(ids[first : first + n].tolist()) == expected
    assert int((ids == model.frontend.image_token_id).sum()) == 30


# -- model side (properties 1, 4, 5, 6, 7) --------------------------------------------------------------
def test_only_new_weights_are_the_bias_free_patch_projection(vl):
    model, tokenizer, _ = vl
    d = model.language_model.config.hidden_size
    assert {k: tuple(v.shape) for k, v in model.frontend.state_dict().items()} == {
        "patch_proj.weight": (d, 3 * P * P)
    }
    assert sum(p.numel() for p in model.frontend.parameters()) == 3 * P**2 * d
    bare = build_llm(model.config, tokenizer)  # the same LLM, no front-end
    assert {k: v.shape for k, v in model.language_model.state_dict().items()} == {
        k: v.shape for k, v in bare.state_dict().items()
    }
    hooked = [n for n, m in model.language_model.named_modules() if m._forward_hooks or m._forward_pre_hooks]
    assert hooked == []


def test_patch_embeddings_are_added_to_the_vpatch_rows(vl):
    model, tokenizer, processor = vl
    batch = pad_batch(
        [processor.encode(chat("Red?", "yes"), [RED]), processor.encode(chat("Blue?", "no"), [BLUE])],
        tokenizer.pad_token_id,
        model.frontend.layout,
    )
    ids = batch["input_ids"]
    table = model.language_model.get_input_embeddings().weight
    embeds = model.llm_inputs(ids, pixel_values=batch["pixel_values"]).inputs_embeds
    slots = ids == model.frontend.image_token_id
    assert int(slots.sum()) == 16 + 30 == len(batch["pixel_values"])
    assert torch.equal(embeds[~slots], table[ids[~slots]])  # text, markers, separators, padding untouched
    projected = batch["pixel_values"] @ model.frontend.patch_proj.weight.T  # [N, D], raster order per image
    torch.testing.assert_close(
        embeds[slots], table[model.frontend.image_token_id] + projected, atol=1e-6, rtol=0
    )
    assert (embeds[slots] - table[model.frontend.image_token_id]).abs().amax(-1).min() > 0


def test_text_only_batch_is_the_bare_llm_and_skips_the_projection(vl):
    model, tokenizer, processor = vl
    calls = []
    handle = model.frontend.patch_proj.register_forward_pre_hook(lambda *_: calls.append(1))
    try:
        batch = pad_batch(
            [
                processor.encode(
                    [
                        {"role": "user", "content": "Is there a green diamond?"},
                        {"role": "assistant", "content": "yes"},
                    ]
                )
            ],
            tokenizer.pad_token_id,
            model.frontend.layout,
        )
        assert batch["pixel_values"] is None
        logits = model(**batch).logits
        bare = model.language_model(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
        ).logits
        assert torch.equal(logits, bare)
        assert calls == []
        # A batch mixing a text-only sample and an image sample collates only the image's patches.
        mixed = pad_batch(
            [
                processor.encode(chat("Red?", "yes"), [RED]),
                processor.encode([{"role": "user", "content": "Hi"}]),
            ],
            tokenizer.pad_token_id,
            model.frontend.layout,
        )
        assert mixed["pixel_values"].shape == (16, 3 * P * P) and torch.isfinite(model(**mixed).loss)
    finally:
        handle.remove()


def test_changing_a_patch_only_changes_later_positions(vl):
    model, _, _ = vl
    batch = train_batch(vl, BLUE)
    slots = (batch["input_ids"][0] == model.frontend.image_token_id).nonzero().flatten()
    k = 13  # row 2, column 1 of the 5 x 6 grid
    changed = dict(batch, pixel_values=batch["pixel_values"].clone())
    changed["pixel_values"][k] += 1.0
    before, after = model(**batch).logits, model(**changed).logits
    t = int(slots[k])
    assert torch.equal(before[:, :t], after[:, :t])
    assert (before[:, t:] - after[:, t:]).abs().amax(-1).min() > 1e-6


def test_vision_tokens_are_never_targets_and_patch_proj_learns(vl):
    model, tokenizer, processor = vl
    forbidden = set(vision_ids(vl))
    assert min(forbidden) == len(tokenizer) - 4  # appended after the text vocabulary
    # Even an image inside an assistant reply (pre-training style captions) gives no vision targets.
    sample = processor.encode(chat("Draw it.", "here", image_in="assistant"), [RED])
    supervised = [t for t in sample.labels if t != IGNORE_INDEX]
    assert supervised and not forbidden & set(supervised)
    assert tokenizer.decode(supervised) == "\nhere<|end|>"

    batch = train_batch(vl, RED)
    out = model(**batch)
    manual = F.cross_entropy(out.logits[0, :-1], batch["labels"][0, 1:], ignore_index=IGNORE_INDEX)
    torch.testing.assert_close(out.loss, manual)
    model.zero_grad()
    out.loss.backward()
    assert model.frontend.patch_proj.weight.grad.abs().sum() > 0
    model.zero_grad()


def test_wrong_patch_count_is_a_data_error(vl):
    model, _, _ = vl
    batch = train_batch(vl, RED)
    with pytest.raises(DataError, match=r"16 '<vpatch>' slots in input_ids but 15 patches"):
        model(batch["input_ids"], batch["attention_mask"], batch["pixel_values"][1:])
    with pytest.raises(DataError, match=r"but 0 patches.*VLProcessor"):
        model(batch["input_ids"], batch["attention_mask"], None)


def test_truncation_never_cuts_inside_an_image(vl):
    _, _, processor = vl
    sample = processor.encode(chat("What shape is the blue object?", "square"), [BLUE])
    limited = copy.copy(processor)
    limited.max_length = 20  # inside the 36-token image block
    drops = DropCounter()
    assert limited.truncate(sample, drops) is None and drops.counts == {"image_truncated": 1}


def test_generation_never_emits_vision_tokens(vl):
    model, _, processor = vl
    model = copy.deepcopy(model)
    ids = vision_ids(vl)
    assert sorted(model.frontend.special_token_ids) == sorted(ids)
    inputs = processor([chat("What color is the circle?")], [[RED]])
    first = int(model(**inputs).logits[0, -1].argmax())
    with torch.no_grad():  # make every vision token outscore the token greedy decoding would pick
        model.language_model.lm_head.weight[ids] = 4 * model.language_model.lm_head.weight[first]
    assert int(model(**inputs).logits[0, -1].argmax()) in ids
    generated = model.generate(**inputs, max_new_tokens=5, min_new_tokens=5, do_sample=False)
    assert not set(generated.flatten().tolist()) & set(ids)


# -- LoRA: the new embedding rows still train ------------------------------------------------------------
@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_lora_stage_trains_the_new_token_rows_and_round_trips(tmp_path, tied):
    model, tokenizer, processor = tiny_model(
        "llama", frontend=SOLO, llm={"config": {"tie_word_embeddings": tied}}
    )
    assert (model.language_model.lm_head.weight is model.language_model.get_input_embeddings().weight) is tied
    stage = StageConfig(name="lora", modules={"llm": "lora", "patch_proj": "full"}, steps=1, lr=1e-2)
    apply_stage(model, stage, LoRASettings(r=4, alpha=8, dropout=0.0))
    ids = vision_ids((model, tokenizer, processor))
    vocab = torch.arange(len(tokenizer))
    embedding = model.language_model.get_input_embeddings()
    before = embedding(vocab).detach().clone()

    batch = train_batch((model, tokenizer, processor), RED)
    model.train()
    model(**batch).loss.backward()
    deltas = [p for n, p in model.named_parameters() if "trainable_tokens_delta" in n]
    assert len(deltas) == 1 and deltas[0].shape == (4, model.language_model.config.hidden_size)
    assert (deltas[0].grad.abs().sum(-1) > 0).all()  # every vision token appears in the input
    assert not any(p.requires_grad for n, p in embedding.named_parameters() if "delta" not in n)
    assert model.frontend.patch_proj.weight.grad.abs().sum() > 0
    optimizer = torch.optim.AdamW(optimizer_groups(model, stage))
    optimizer.step()
    model.eval()

    after = embedding(vocab).detach()
    new = torch.zeros(len(tokenizer), dtype=torch.bool)
    new[ids] = True
    assert torch.equal(after[~new], before[~new])  # old rows frozen
    assert (after[new] - before[new]).abs().amax(-1).min() > 0  # new rows trained

    logits = model(**batch).logits
    model.save_pretrained(tmp_path / "ckpt", tokenizer)
    reloaded, _ = load_pretrained(tmp_path / "ckpt")
    assert torch.equal(reloaded(**batch).logits, logits)
    merged = reloaded.merge_lora()
    assert not merged.lora_groups()
    torch.testing.assert_close(merged(**batch).logits, logits, atol=1e-5, rtol=1e-5)


# -- every LLM family (properties 7, 8, 9, 10 and save/load) -----------------------------------------------
def test_family_loss_and_gradients(family_vl):
    model, _, _ = family_vl
    batch = train_batch(family_vl, BLUE)
    out = model(**batch)
    assert torch.isfinite(out.loss)
    model.zero_grad()
    out.loss.backward()
    grads = model.language_model.get_input_embeddings().weight.grad
    assert model.frontend.patch_proj.weight.grad.abs().sum() > 0
    assert (grads[vision_ids(family_vl)].abs().sum(-1) > 0).all()
    model.zero_grad()


def test_family_cached_decode_equals_full_recompute(family_vl):
    kit.assert_cached_decode_matches_recompute(family_vl, "What shape is the blue object?", BLUE, atol=ATOL)


def test_family_padded_batch_of_two_image_sizes_equals_one_by_one(family_vl):
    conversations = [chat("What color is the circle?"), chat("Is the yellow circle left or right of it?")]
    images = [[RED], [BLUE]]  # 21 and 36 image tokens
    batch = kit.assert_padded_batch_matches_one_by_one(
        family_vl, conversations, images, atol=ATOL, prompt_logits=True
    )
    assert batch["attention_mask"][1].all()  # only row 0 is padded
    assert batch["pixel_values"].shape == (16 + 30, 3 * P * P)


def test_family_packed_documents_are_independent(family_vl):
    """Two documents in one row with a block-diagonal causal mask and restarting positions (spec §3)."""
    model, tokenizer, processor = family_vl
    doc2 = processor.encode(chat("What shape is the blue object?", "square"), [BLUE])
    alone = model(
        torch.tensor([doc2.input_ids]), pixel_values=model.frontend.layout.collate(doc2.pixel_values)
    ).logits[0]
    for first_image in (RED, scene((40, 190, 60), (40, 48))):
        doc1 = processor.encode(chat("What color is the circle?", "red"), [first_image])
        n1, n2 = len(doc1.input_ids), len(doc2.input_ids)
        document = torch.cat([torch.zeros(n1), torch.ones(n2)])
        allowed = (document[:, None] == document[None]) & torch.ones(
            n1 + n2, n1 + n2, dtype=torch.bool
        ).tril()
        mask = torch.zeros(n1 + n2, n1 + n2).masked_fill(~allowed, torch.finfo(torch.float32).min)
        packed = model(
            torch.tensor([doc1.input_ids + doc2.input_ids]),
            mask[None, None],
            model.frontend.layout.collate(doc1.pixel_values + doc2.pixel_values),
            position_ids=torch.cat([torch.arange(n1), torch.arange(n2)])[None],
        ).logits[0]
        torch.testing.assert_close(packed[n1:], alone, atol=ATOL, rtol=0)


def test_family_save_load_round_trip(family_vl, tmp_path):
    model = family_vl[0]
    loaded = kit.assert_save_load_round_trip(family_vl, train_batch(family_vl, BLUE), RED, tmp_path / "ckpt")
    assert isinstance(loaded.frontend, SoloFrontend) and loaded.frontend.config == model.frontend.config
