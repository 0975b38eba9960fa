"""Processors come from the config alone: no model, no tower run, and the counts the model then needs."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from eval.backends.base import Request
from eval.backends.model import ModelBackend
from vlbridge import vision_towers
from vlbridge.factory import load_pretrained
from vlbridge.processing import VLProcessor
from vlbridge.testing import chat, tiny_model, tiny_tokenizer, tiny_vl_config

IMAGE = Image.new("RGB", (40, 24), (200, 30, 30))
PLAIN = {"type": "llava", "connector": {"merge": 1}}
CASES = {
    "llava": ("clip_vision_model", {}, []),
    "llava-cls": (
        "clip_vision_model",
        {"frontend": {**PLAIN, "vision": {"feature_select": "cls_patch"}}},
        [],
    ),
    "llava-convnext": ("convnext", {}, []),
    "inf_llava": ("siglip_vision_model", {"frontend": {"type": "inf_llava"}}, []),
    "llava_next": ("clip_vision_model", {"frontend": {"type": "llava_next"}}, []),
    "adem_vl": ("resnet", {"frontend": {"type": "adem_vl"}}, []),
    "solo": ("clip_vision_model", {"frontend": {"type": "solo"}}, []),
    "turbo-r": ("clip_vision_model", {"frontend": PLAIN}, [{"type": "turbo", "r": 4, "min_tokens": 0}]),
    "turbo-tokens": (
        "siglip_vision_model",
        {"frontend": PLAIN},
        [{"type": "turbo", "tokens": 9, "min_tokens": 0}],
    ),
    "tome-list": ("clip_vision_model", {"frontend": PLAIN}, [{"type": "tome", "r": [8, 3]}]),
    "tome-threshold": (
        "clip_vision_model",
        {"frontend": PLAIN},
        [{"type": "tome", "r": 8, "min_tokens": 12}],
    ),
    "turbo-first-block": (
        "clip_vision_model",
        {"frontend": PLAIN},
        [{"type": "turbo", "tokens": 8, "first_blocks": 1, "min_tokens": 0}],
    ),
}


@pytest.mark.parametrize("case", CASES)
def test_the_processor_needs_no_tower_and_counts_what_the_model_makes(case, monkeypatch):
    tower, overrides, reducers = CASES[case]
    config = tiny_vl_config("llama", tower, reducers=reducers, **overrides)
    tokenizer = tiny_tokenizer(config)

    def no_tower(*args, **kwargs):
        raise AssertionError("the processor built or ran a vision tower")

    with monkeypatch.context() as patch:
        patch.setattr(vision_towers.VisionTower, "__init__", no_tower)
        processor = VLProcessor.from_config(config, tokenizer)
        encoded = processor.encode(chat("What color?", "red"), [IMAGE])

    model, _, _ = tiny_model("llama", tower, reducers=reducers, **overrides)
    slots = sum(t == model.frontend.image_token_id for t in encoded.input_ids)
    pixels = processor.layout.collate(encoded.pixel_values)
    with torch.no_grad():
        assert model.frontend.encode(pixels).shape[:-1].numel() == slots  # as many features as slots
        model(**processor([chat("What color?")], [[IMAGE]]))  # the strict count check passes


def test_from_pretrained_gives_the_processor_the_checkpoint_was_saved_with(tmp_path):
    model, tokenizer, processor = tiny_model(image_position="after")
    model.save_pretrained(tmp_path, tokenizer)
    loaded = VLProcessor.from_pretrained(tmp_path)
    _, opened = load_pretrained(tmp_path)
    for other in (loaded, opened):
        assert other.layout == processor.layout and other.image_position == "after"
        assert other.place_images("Q?", 2) == "Q?\n<image>\n<image>"
        want, got = processor([chat("Q?")], [[IMAGE]]), other([chat("Q?")], [[IMAGE]])
        assert all(torch.equal(want[k], got[k]) for k in want)


def test_a_custom_image_token_is_honoured_by_the_processor_and_the_eval_backend():
    model, tokenizer, processor = tiny_model(image_token="<img>")
    assert processor.place_images("What color?", 1) == "<img>\nWhat color?"
    with pytest.raises(Exception, match="0 '<img>' markers"):
        processor.encode(chat("What color?"), [IMAGE])  # chat() writes <image>, which this model does not use
    ours = processor([[{"role": "user", "content": processor.place_images("What color?", 1)}]], [[IMAGE]])
    backend = ModelBackend(model, processor)
    request = Request([{"role": "user", "content": "<image>\nWhat color?"}], [IMAGE])  # eval's marker
    batch = backend.processor([backend._messages(request)], [[IMAGE]])
    assert torch.equal(batch["input_ids"], ours["input_ids"])
    assert backend.generate([request], 3) == [
        tokenizer.decode(
            model.generate(**ours, max_new_tokens=3, do_sample=False)[0], skip_special_tokens=True
        ).strip()
    ]
