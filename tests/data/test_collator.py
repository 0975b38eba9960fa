"""Collator / prepare_samples: LLaVA JSON on disk -> padded batches, with over-long samples counted."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from vlbridge.data.collator import Collator, prepare_samples
from vlbridge.data.formats import LlavaJsonConfig, load_source
from vlbridge.errors import DataError
from vlbridge.processing import IGNORE_INDEX, DropCounter, Encoded
from vlbridge.testing import tiny_model

COLORS = {"red": (230, 40, 40), "blue": (50, 100, 245), "green": (40, 190, 60), "white": (240, 240, 240)}


@pytest.fixture(scope="module")
def tiny():
    model, tokenizer, processor = tiny_model()
    assert processor.max_length == 256
    return model, processor


def write_dataset(folder) -> str:
    """Four LLaVA records: two short, one whose answer must be cut, one whose image would be cut."""
    (folder / "images").mkdir(parents=True)
    for name, color in COLORS.items():
        Image.new("RGB", (40, 30), color).save(folder / "images" / f"{name}.png")
    human = {"from": "human", "value": "<image>\nWhat color is the circle?"}
    records = [
        {
            "id": "short-red",
            "image": "images/red.png",
            "conversations": [human, {"from": "gpt", "value": "red"}],
        },
        {
            "id": "long-answer",
            "image": "images/blue.png",
            "conversations": [human, {"from": "gpt", "value": "blue " * 300}],
        },
        {
            "id": "image-last",
            "image": "images/white.png",
            "conversations": [
                {"from": "human", "value": "circle " * 300 + "<image>"},
                {"from": "gpt", "value": "no"},
            ],
        },
        {
            "id": "short-green",
            "image": ["images/green.png"],
            "conversations": [
                human,
                {"from": "gpt", "value": "green"},
                {"from": "human", "value": "Sure?"},
                {"from": "gpt", "value": "yes"},
            ],
        },
    ]
    path = folder / "data.json"
    path.write_text(json.dumps(records))
    return str(path)


def test_collate_llava_json_from_disk(tiny, tmp_path) -> None:
    model, processor = tiny
    samples = load_source(LlavaJsonConfig(path=write_dataset(tmp_path)))
    drops = DropCounter()
    batch = Collator(processor, drops)(list(samples))

    assert drops.counts == {"image_truncated": 1}
    image_id = processor.tokenizer.convert_tokens_to_ids("<image>")
    per_image = model.frontend.layout.num_image_tokens(None)
    assert batch["input_ids"].shape == (3, processor.max_length)  # the cut answer is the longest row
    assert batch["pixel_values"].shape == (3, 3, 32, 32)
    assert ((batch["input_ids"] == image_id).sum(dim=1) == per_image).all()
    assert (batch["labels"][batch["attention_mask"] == 0] == IGNORE_INDEX).all()
    assert (batch["input_ids"][batch["attention_mask"] == 0] == processor.tokenizer.pad_token_id).all()
    supervised = [
        processor.tokenizer.decode([t for t in row if t != IGNORE_INDEX]) for row in batch["labels"]
    ]
    assert supervised[0] == "red<|end|>" and supervised[2] == "green<|end|>yes<|end|>"
    assert supervised[1].startswith("blue blue") and not supervised[1].endswith("<|end|>")
    # the red image is the first pixel tensor: red channel brightest after normalisation
    assert batch["pixel_values"][0, :, 5, 5].argmax() == 0 and batch["pixel_values"][1, :, 5, 5].argmax() == 2
    with torch.no_grad():
        assert torch.isfinite(model(**batch).loss)


def test_prepare_samples_encodes_once_and_counts_drops(tiny, tmp_path) -> None:
    _, processor = tiny
    samples = load_source(LlavaJsonConfig(path=write_dataset(tmp_path)))
    drops = DropCounter()
    encoded = prepare_samples(samples, processor, drops)
    assert len(encoded) == 3 and all(isinstance(e, Encoded) for e in encoded)
    assert drops.counts == {"image_truncated": 1} and drops.total == 1
    assert max(len(e.input_ids) for e in encoded) == processor.max_length

    collate = Collator(processor, DropCounter())
    from_encoded, from_raw = collate(encoded), collate(list(samples))
    assert collate.drops.total == 1  # only the raw pass dropped anything
    for key in ("input_ids", "attention_mask", "labels", "pixel_values"):
        assert torch.equal(from_encoded[key], from_raw[key]), key
    assert collate([samples[2]]) is None  # every sample of the batch dropped

    left = Collator(processor, side="left")(encoded[:1] + encoded[2:])
    assert left["attention_mask"][:, -1].all() and not left["attention_mask"][0, 0]


def test_bad_samples_raise_naming_sample_and_file(tiny, tmp_path) -> None:
    _, processor = tiny
    samples = load_source(LlavaJsonConfig(path=write_dataset(tmp_path)))
    (tmp_path / "images" / "green.png").unlink()
    with pytest.raises(DataError, match=r"sample short-green: image file not found: .*images/green\.png"):
        Collator(processor)(list(samples))
    (tmp_path / "images" / "red.png").write_bytes(b"not a png")
    with pytest.raises(DataError, match=r"sample short-red: image .*red\.png is not a readable image"):
        prepare_samples(samples[:1], processor)
    no_marker = {
        "id": "x1",
        "images": [Image.new("RGB", (8, 8))],
        "messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}],
    }
    with pytest.raises(DataError, match="sample x1: 0 '<image>' markers"):
        Collator(processor)([no_marker])
