"""transformers' LLaVA checkpoints open as vlbridge models with transformers' own logits and answers."""

from __future__ import annotations

import pytest
import torch
from PIL import Image
from transformers import (
    AutoConfig,
    CLIPImageProcessorPil,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaImageProcessorPil,
    LlavaProcessor,
)

from vlbridge.errors import ConfigError
from vlbridge.factory import load_pretrained
from vlbridge.testing import _TEXTS, TINY_LLM_CONFIGS, TINY_TOWER_CONFIGS
from vlbridge.tokenization import train_bpe

# llava-1.5-hf's template: content parts, images first, "USER: ... ASSISTANT:"
LLAVA_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': ' }}"
    "{% endif %}{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}"
    "{{ '<image>\n' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{{ content['text'] + ' ' }}{% endfor %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)
FAMILIES = list(TINY_LLM_CONFIGS)
WIDE = Image.new("RGB", (48, 30), (220, 40, 40))
WIDE.paste((30, 30, 200), (10, 5, 30, 25))


def write_llava_hf(
    path,
    family: str = "llama",
    tower: str = "clip_vision_model",
    *,
    strategy: str = "default",
    feature_layer: int | list[int] = -2,
    pad: bool = False,
    act: str = "gelu",
    seed: int = 0,
):
    """A tiny random `LlavaForConditionalGeneration` + `LlavaProcessor` saved with transformers' classes."""
    tokenizer = train_bpe(_TEXTS * 10, 300)
    tokenizer.add_special_tokens(
        {"additional_special_tokens": ["<image>"]}, replace_extra_special_tokens=False
    )
    tokenizer.pad_token = tokenizer.eos_token
    text = AutoConfig.for_model(family, **TINY_LLM_CONFIGS[family], vocab_size=len(tokenizer) + 3)
    for name in ("bos", "eos", "pad"):
        setattr(text, f"{name}_token_id", getattr(tokenizer, f"{name}_token_id"))
    config = LlavaConfig(
        vision_config=AutoConfig.for_model(tower, **TINY_TOWER_CONFIGS[tower]),
        text_config=text,
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        vision_feature_layer=feature_layer,
        vision_feature_select_strategy=strategy,
        projector_hidden_act=act,
    )
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config).eval()
    with torch.no_grad():  # larger than the default init, so that logits differ clearly between tokens
        for param in model.parameters():
            if param.dim() > 1:
                param.normal_(0, 0.08)
    if pad:
        images = LlavaImageProcessorPil(do_pad=True, size={"height": 32, "width": 32}, do_center_crop=False)
    else:
        images = CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    extra = 1 if tower == "clip_vision_model" else 0  # CLS
    processor = LlavaProcessor(
        image_processor=images,
        tokenizer=tokenizer,
        patch_size=8,
        vision_feature_select_strategy=strategy,
        num_additional_image_tokens=extra,
        chat_template=LLAVA_TEMPLATE,
    )
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return model, processor


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
    hf_model, hf_processor = write_llava_hf(tmp_path, family)
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
    hf_model, hf_processor = write_llava_hf(
        tmp_path, "qwen2", tower, strategy=strategy, feature_layer=feature_layer, pad=pad, act=act
    )
    model, processor = load_pretrained(tmp_path)
    want_inputs, want_logits, want_tokens = reference(hf_model, hf_processor, "Is it red?", WIDE)
    batch, logits, tokens = ours(model, processor, "Is it red?", WIDE)
    assert torch.equal(batch["input_ids"], want_inputs["input_ids"])
    assert (logits - want_logits).abs().max() < 1e-5
    assert torch.equal(tokens, want_tokens)


def test_a_strategy_vlbridge_cannot_reproduce_is_a_config_error(tmp_path):
    write_llava_hf(tmp_path, tower="siglip_vision_model", strategy="default")
    with pytest.raises(ConfigError, match="drops the first token of a siglip_vision_model tower"):
        load_pretrained(tmp_path)
