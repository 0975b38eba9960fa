"""`vlbridge export --format llava-hf` writes what transformers alone loads: same logits, same answers."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from vlbridge.cli import main
from vlbridge.errors import ConfigError
from vlbridge.factory import load_pretrained
from vlbridge.interop import llava_hf
from vlbridge.lora import lora_config, wrap
from vlbridge.testing import tiny_model

QUESTION = "What color is the circle?"
PLAIN = {"type": "llava", "connector": {"merge": 1}}

# Runs in a fresh interpreter where importing vlbridge fails: only transformers reads the export.
TRANSFORMERS_ONLY = """
import json, sys
sys.modules["vlbridge"] = None
import torch
from PIL import Image
import transformers
from transformers import AutoProcessor
out, image, question, result = sys.argv[1:5]
processor = AutoProcessor.from_pretrained(out)
architecture = json.load(open(out + "/config.json"))["architectures"][0]
model = getattr(transformers, architecture).from_pretrained(out).eval()
conversation = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
text = processor.apply_chat_template(conversation, add_generation_prompt=True)
inputs = processor(images=[Image.open(image)], text=text, return_tensors="pt")
tok = processor.tokenizer
with torch.no_grad():
    logits = model(**inputs).logits
    new = model.generate(**inputs, max_new_tokens=8, do_sample=False, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id, suppress_tokens=[model.config.image_token_id])
torch.save({"input_ids": inputs["input_ids"], "logits": logits,
            "tokens": new[0, inputs["input_ids"].shape[1]:]}, result)
"""


def transformers_alone(out, image_path, tmp_path) -> dict:
    result = tmp_path / "result.pt"
    subprocess.run(
        [sys.executable, "-c", TRANSFORMERS_ONLY, str(out), str(image_path), QUESTION, str(result)],
        check=True,
        env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"},
    )
    return torch.load(result)


def vlbridge_answer(model, processor, image) -> dict:
    batch = processor([[{"role": "user", "content": processor.place_images(QUESTION, 1)}]], [[image]])
    tok = processor.tokenizer
    with torch.no_grad():
        logits = model(**batch).logits
        tokens = model.generate(
            **batch,
            max_new_tokens=8,
            do_sample=False,
            eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id,
        )
    return {"input_ids": batch["input_ids"], "logits": logits, "tokens": tokens[0]}


@pytest.mark.parametrize(
    ("family", "tower", "frontend", "position"),
    [
        ("llama", "clip_vision_model", PLAIN, "before"),
        ("qwen2", "siglip_vision_model", {**PLAIN, "image": {"resize": "pad"}}, "after"),
        ("gemma", "clip_vision_model", {**PLAIN, "connector": {"merge": 1, "type": "linear"}}, "before"),
        ("qwen3", "clip_vision_model", {"type": "llava_next"}, "before"),  # LlavaNextForConditionalGeneration
    ],
)
def test_export_loads_in_transformers_alone_with_the_same_logits_and_answers(
    tmp_path, red_image, family, tower, frontend, position
):
    model, tokenizer, processor = tiny_model(
        family, tower, frontend=frontend, image_position=position, seed=3
    )
    with torch.no_grad():  # larger than the tiny init, so that answers are not near-ties
        for name, param in model.named_parameters():
            if param.dim() > 1 and "embed" not in name:
                param.normal_(0, 0.08)
    model.save_pretrained(tmp_path / "ckpt", tokenizer)
    main(["export", str(tmp_path / "ckpt"), str(tmp_path / "hf"), "--format", "llava-hf"])
    written = json.loads((tmp_path / "hf" / "config.json").read_text())["architectures"]
    next_ = frontend["type"] == "llava_next"
    assert written == ["LlavaNextForConditionalGeneration" if next_ else llava_hf.ARCHITECTURE]
    image = red_image.resize((40, 28))
    image.save(tmp_path / "image.png")
    theirs = transformers_alone(tmp_path / "hf", tmp_path / "image.png", tmp_path)
    ours = vlbridge_answer(model, processor, image)
    assert torch.equal(theirs["input_ids"], ours["input_ids"])  # the exported template and processor agree
    assert (theirs["logits"] - ours["logits"]).abs().max() < 1e-5
    assert torch.equal(theirs["tokens"], ours["tokens"])
    reloaded, reprocessor = load_pretrained(tmp_path / "hf")  # and back in: the same model
    again = vlbridge_answer(reloaded, reprocessor, image)
    assert (again["logits"] - ours["logits"]).abs().max() < 1e-5


@pytest.mark.parametrize(
    ("overrides", "named"),
    [
        ({"frontend": {"type": "solo"}}, "'solo' front-end"),
        ({"frontend": {"type": "adem_vl"}}, "'adem_vl' front-end"),
        ({"frontend": {"type": "llava"}}, "connector other than"),  # the tiny llava merges 2x2 tokens
        ({"frontend": {**PLAIN, "vision": {"stem": "conv"}}}, "vision.stem='conv'"),
        ({"frontend": PLAIN, "reducers": [{"type": "tome", "r": 2}]}, "active reducers"),
    ],
)
def test_what_llava_cannot_express_is_refused_by_name(overrides, named):
    model, _, processor = tiny_model(**overrides)
    with pytest.raises(ConfigError, match=named):
        llava_hf.refuse_unless_exportable(model, processor)


def test_an_unmerged_adapter_is_refused():
    model, _, processor = tiny_model(frontend=PLAIN)
    model.set_group("llm", wrap(model.get_group("llm"), lora_config(2, 4, 0.0, "all-linear"), "llm"))
    with pytest.raises(ConfigError, match="unmerged LoRA"):
        llava_hf.refuse_unless_exportable(model, processor)
