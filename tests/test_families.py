"""Behaviour every LLM family and vision tower must share once wrapped in a VLModel.

Each case builds a tiny random model (vlbridge.testing) and checks real properties: supervised
tokens, image splicing, generation, KV-cache vs full recompute, left-padded batching, save/load.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from vlbridge import testing as kit
from vlbridge.errors import DataError
from vlbridge.processing import IGNORE_INDEX
from vlbridge.testing import TINY_LLM_CONFIGS, TINY_TOWER_CONFIGS, chat, tiny_model, train_batch

FAMILIES = list(TINY_LLM_CONFIGS)
TOWERS = list(TINY_TOWER_CONFIGS)
ATOL = 1e-4

# Every family with a CLIP tower, plus llama with every other tower.
CASES = [(family, "clip_vision_model") for family in FAMILIES] + [
    ("llama", tower) for tower in TOWERS if tower != "clip_vision_model"
]
FAMILY_CASES = CASES[: len(FAMILIES)]


def _ids(case: tuple[str, str]) -> str:
    return f"{case[0]}-{case[1]}"


@pytest.fixture(scope="module", params=CASES, ids=_ids)
def vl(request):
    return tiny_model(*request.param)


@pytest.fixture(scope="module", params=FAMILY_CASES, ids=_ids)
def family_vl(request):
    return tiny_model(*request.param)


def prompt(batch: dict) -> dict:
    return {k: v for k, v in batch.items() if k != "labels"}


def test_loss_only_on_assistant_tokens(vl, red_image):
    model, tokenizer, _ = vl
    batch = train_batch(vl, red_image)
    ids, labels = batch["input_ids"][0], batch["labels"][0]
    supervised = (labels != IGNORE_INDEX).nonzero().flatten()
    first = int(supervised[0])
    # Supervised tokens are exactly the reply (and its end-of-turn token), contiguous, labelled by themselves.
    assert tokenizer.decode(ids[supervised]) == "red circle<|end|>"
    assert supervised.tolist() == list(range(first, first + len(supervised)))
    assert torch.equal(labels[supervised], ids[supervised])
    assert (labels[:first] == IGNORE_INDEX).all()
    image_pos = ids == model.frontend.image_token_id
    assert int(image_pos.sum()) == model.frontend.layout.num_image_tokens()
    assert int(image_pos.nonzero().max()) < first

    out = model(**batch)
    assert torch.isfinite(out.loss)
    manual = F.cross_entropy(out.logits[0, :-1], labels[1:], ignore_index=IGNORE_INDEX)
    torch.testing.assert_close(out.loss, manual)

    # Change the second reply token: the loss moves, logits at earlier positions do not.
    p = first + 1
    changed = {k: (v.clone() if torch.is_tensor(v) else v) for k, v in batch.items()}
    new_token = tokenizer.convert_tokens_to_ids("x")
    assert new_token != ids[p]
    changed["input_ids"][0, p] = changed["labels"][0, p] = new_token
    out2 = model(**changed)
    assert abs(out2.loss.item() - out.loss.item()) > 1e-6
    torch.testing.assert_close(out2.logits[:, :p], out.logits[:, :p], atol=1e-5, rtol=0)
    assert (out2.logits[:, p:] - out.logits[:, p:]).abs().max() > 1e-4


def test_image_embeddings_are_spliced(vl, red_image, blue_image):
    model, _, _ = vl
    red, blue = train_batch(vl, red_image), train_batch(vl, blue_image)
    assert torch.equal(red["input_ids"], blue["input_ids"])
    ids = red["input_ids"]
    image_pos = (ids[0] == model.frontend.image_token_id).nonzero().flatten()
    start, end = int(image_pos[0]), int(image_pos[-1]) + 1

    inputs = model.llm_inputs(ids, red["attention_mask"], red["pixel_values"])
    features = model.frontend.encode(red["pixel_values"])[0]
    torch.testing.assert_close(inputs.inputs_embeds[0, start:end], features, atol=0, rtol=0)
    torch.testing.assert_close(inputs.image_hidden_states[0], features, atol=0, rtol=0)
    torch.testing.assert_close(model(**red).image_hidden_states[0], features, atol=0, rtol=0)

    red_logits, blue_logits = model(**red).logits, model(**blue).logits
    torch.testing.assert_close(red_logits[:, :start], blue_logits[:, :start], atol=1e-5, rtol=0)
    assert (red_logits[:, end:] - blue_logits[:, end:]).abs().amax(-1).min() > 1e-5


def test_generate_greedy_and_sampling(family_vl, red_image, blue_image):
    model, tokenizer, processor = family_vl
    inputs = processor(
        [chat("What color is the circle?"), chat("Is the yellow circle left or right of the square?")],
        [[red_image], [blue_image]],
    )
    kwargs = {"max_new_tokens": 6, "min_new_tokens": 6}
    greedy = model.generate(**inputs, do_sample=False, **kwargs)
    assert greedy.shape == (2, 6) and greedy.dtype == torch.long
    assert ((greedy >= 0) & (greedy < len(tokenizer))).all()
    assert torch.equal(model.generate(**inputs, do_sample=False, **kwargs), greedy)

    samples = []
    for seed in (0, 0, 1):
        torch.manual_seed(seed)
        samples.append(model.generate(**inputs, do_sample=True, top_k=0, top_p=1.0, **kwargs))
    assert samples[0].shape == (2, 6)
    assert torch.equal(samples[0], samples[1])
    assert not torch.equal(samples[0], samples[2])
    assert not torch.equal(samples[0], greedy)


def test_cached_decode_equals_full_recompute(vl, red_image):
    kit.assert_cached_decode_matches_recompute(vl, "What shape is the blue object?", red_image, atol=ATOL)


def test_left_padded_batch_equals_one_by_one(vl, red_image, blue_image):
    conversations = [chat("What color is the circle?"), chat("Is the yellow circle left or right of it?")]
    images = [[red_image], [blue_image]]
    batch = kit.assert_padded_batch_matches_one_by_one(
        vl, conversations, images, atol=ATOL, prompt_logits=True
    )
    assert batch["attention_mask"][1].all()  # only row 0 is padded


def test_save_load_round_trip(vl, red_image, tmp_path):
    kit.assert_save_load_round_trip(vl, train_batch(vl, red_image), red_image, tmp_path / "ckpt")


def test_wrong_image_token_count_is_a_data_error(family_vl, red_image):
    model, _, processor = family_vl
    batch = prompt(train_batch(family_vl, red_image))
    ids = batch["input_ids"]
    image_pos = (ids[0] == model.frontend.image_token_id).nonzero().flatten()
    for bad in (
        ids[:, torch.arange(ids.shape[1]) != image_pos[0]],  # one placeholder too few
        torch.cat([ids[:, :1], ids[:, image_pos[:1]], ids[:, 1:]], dim=1),
    ):  # one too many
        with pytest.raises(DataError, match=r"placeholder count mismatch.*build inputs with VLProcessor"):
            model(bad, torch.ones_like(bad), batch["pixel_values"])
    with pytest.raises(DataError, match=r"no images.*pixel_values"):
        model(ids, batch["attention_mask"], None)
    with pytest.raises(DataError, match="one marker per image"):
        processor.encode(chat("<image> twice?"), [red_image])


def test_connector_position_embedding_marks_each_visual_slot(red_image):
    """The same features at two grid positions become different LLM inputs only with the embedding on."""
    from vlbridge.testing import tiny_model as build

    for enabled in (False, True):
        model, _, _ = build("llama", "convnext", frontend={"connector": {"position_embedding": enabled}})
        channels = model.frontend.connector.proj[0].in_features // 4  # the tiny config merges 2x2
        side = int((4 * model.frontend.layout.num_image_tokens()) ** 0.5)
        out = model.frontend.connector(torch.ones(1, side * side, channels), (side, side))  # same everywhere
        assert out.shape[1] == model.frontend.layout.num_image_tokens()
        assert torch.equal(out[0, 0], out[0, 3]) is not enabled
