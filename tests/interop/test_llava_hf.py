"""transformers' LLaVA checkpoints open as vlbridge models with transformers' own logits and answers."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from vlbridge.errors import ConfigError
from vlbridge.factory import load_pretrained
from vlbridge.testing import TINY_LLM_CONFIGS, write_tiny_llava_hf, write_tiny_llava_next

FAMILIES = list(TINY_LLM_CONFIGS)
WIDE = Image.new("RGB", (48, 30), (220, 40, 40))
WIDE.paste((30, 30, 200), (10, 5, 30, 25))


def reference(model, processor, question: str, image, new_tokens: int = 8):
    """transformers' own prompt, logits and greedy answer for one question on one image."""
    conversation = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    text = processor.apply_chat_template(conversation, add_generation_prompt=True)
    inputs = processor(images=[image], text=text, return_tensors="pt")
    with torch.no_grad():
        logits = model(**inputs).logits
        tokens = model.generate(**inputs, **greedy(processor.tokenizer, new_tokens))
    return inputs, logits, tokens[0, inputs["input_ids"].shape[1] :]


def greedy(tokenizer, new_tokens: int) -> dict:
    image_id = tokenizer.convert_tokens_to_ids("<image>")
    return {
        "max_new_tokens": new_tokens,
        "do_sample": False,
        "suppress_tokens": [image_id],
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }


def ours(model, processor, question: str, image, new_tokens: int = 8):
    batch = processor([[{"role": "user", "content": processor.place_images(question, 1)}]], [[image]])
    with torch.no_grad():
        logits = model(**batch).logits
        tokens = model.generate(**batch, **greedy(processor.tokenizer, new_tokens))
    return batch, logits, tokens[0]


@pytest.mark.parametrize("family", FAMILIES)
def test_import_matches_transformers_logits_and_greedy_answers(tmp_path, family):
    hf_model, hf_processor = write_tiny_llava_hf(tmp_path, family)
    model, processor = load_pretrained(tmp_path)
    assert model.config.frontend.image.resize == "crop" and processor.chat_content == "parts"
    want_inputs, want_logits, want_tokens = reference(hf_model, hf_processor, "What color?", WIDE)
    batch, logits, tokens = ours(model, processor, "What color?", WIDE)
    assert torch.equal(batch["input_ids"], want_inputs["input_ids"])  # same prompt, BOS and 16 placeholders
    assert (batch["pixel_values"] - want_inputs["pixel_values"]).abs().max() < 1e-6  # same resize and crop
    assert (logits - want_logits).abs().max() < 1e-5
    assert torch.equal(tokens, want_tokens)


@pytest.mark.parametrize(
    ("tower", "strategy", "feature_layer", "pad", "act"),
    [
        ("clip_vision_model", "full", -1, False, "gelu"),  # CLS kept
        ("clip_vision_model", "default", [-2, -1], True, "silu"),  # layers concatenated, padded to square
        ("siglip_vision_model", "full", -2, False, "gelu_pytorch_tanh"),
    ],
)
def test_import_reads_feature_layers_strategy_padding_and_activation(
    tmp_path, tower, strategy, feature_layer, pad, act
):
    hf_model, hf_processor = write_tiny_llava_hf(
        tmp_path, "qwen2", tower, strategy=strategy, feature_layer=feature_layer, pad=pad, act=act
    )
    model, processor = load_pretrained(tmp_path)
    want_inputs, want_logits, want_tokens = reference(hf_model, hf_processor, "Is it red?", WIDE)
    batch, logits, tokens = ours(model, processor, "Is it red?", WIDE)
    assert torch.equal(batch["input_ids"], want_inputs["input_ids"])
    assert (logits - want_logits).abs().max() < 1e-5
    assert torch.equal(tokens, want_tokens)


def test_a_strategy_vlbridge_cannot_reproduce_is_a_config_error(tmp_path):
    write_tiny_llava_hf(tmp_path, tower="siglip_vision_model", strategy="default")
    with pytest.raises(ConfigError, match="drops the first token of a siglip_vision_model tower"):
        load_pretrained(tmp_path)


@pytest.mark.parametrize("family", ["llama", "gemma"])
def test_llava_next_import_matches_transformers(tmp_path, family):
    hf_model, hf_processor = write_tiny_llava_next(tmp_path, family)
    model, processor = load_pretrained(tmp_path)
    assert model.config.frontend.type == "llava_next"
    for image in (WIDE, WIDE.transpose(Image.Transpose.ROTATE_90)):
        want_inputs, want_logits, want_tokens = reference(hf_model, hf_processor, "What color?", image)
        batch, logits, tokens = ours(model, processor, "What color?", image)
        assert torch.equal(batch["input_ids"], want_inputs["input_ids"])  # anyres count known up front
        assert (logits - want_logits).abs().max() < 1e-5
        assert torch.equal(tokens, want_tokens)
