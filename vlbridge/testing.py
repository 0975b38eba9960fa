"""Tiny random models for tests and examples: every supported LLM family and vision tower, CPU-sized.

`tiny_model("qwen3", "siglip_vision_model")` builds a seeded, randomly initialised VLModel (a 2-layer,
64-wide LLM and a 32x32-pixel tower) with a small trained BPE tokenizer and its VLProcessor in about
a second, so behaviour that must hold for every family can be checked without downloading anything.

The conformance kit below (`chat`, `train_batch`, `greedy` and the `assert_*` checks) states, once, the
properties every front-end's VLModel must keep: KV-cached decoding equals full recomputation, a
left-padded batch equals its rows run alone, and a save/load round trip changes nothing.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import torch

from .config import VLConfig, deep_merge
from .factory import build, load_pretrained
from .frontends.layout import image_layout
from .llm_calls import returned_cache
from .modeling import VLModel
from .processing import VLProcessor, pad_batch
from .registry import VISION_TOWERS
from .tokenization import add_frontend_tokens, train_bpe

_LLM_COMMON: dict[str, Any] = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 512,
}

# transformers `model_type` -> config kwargs for a tiny random LLM of that family.
TINY_LLM_CONFIGS: dict[str, dict[str, Any]] = {
    "llama": {**_LLM_COMMON},
    "qwen2": {**_LLM_COMMON, "use_sliding_window": False},
    "qwen3": {**_LLM_COMMON, "head_dim": 16, "use_sliding_window": False},
    "mistral": {**_LLM_COMMON, "head_dim": 16, "sliding_window": None},
    "gemma": {**_LLM_COMMON, "head_dim": 16},
    "gemma2": {**_LLM_COMMON, "head_dim": 16, "sliding_window": 512, "query_pre_attn_scalar": 16},
    "phi3": {**_LLM_COMMON, "original_max_position_embeddings": 512, "sliding_window": None},
}

_TINY_VIT: dict[str, Any] = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "image_size": 32,
    "patch_size": 8,
}

# transformers `model_type` -> config kwargs for a tiny random vision tower on 32x32 images.
TINY_TOWER_CONFIGS: dict[str, dict[str, Any]] = {
    "clip_vision_model": {**_TINY_VIT},
    "siglip_vision_model": {**_TINY_VIT},
    "convnext": {
        "num_channels": 3,
        "num_stages": 2,
        "patch_size": 4,
        "hidden_sizes": [16, 32],
        "depths": [1, 1],
        "image_size": 32,
    },
    "resnet": {
        "num_channels": 3,
        "embedding_size": 16,
        "hidden_sizes": [16, 32],
        "depths": [1, 1],
        "layer_type": "basic",
    },
}

TINY_IMAGE_SIZE = 32

# (model, tokenizer, processor), as `tiny_model` returns them and the conformance kit takes them.
VL = tuple[VLModel, Any, VLProcessor]

_TEXTS = [
    "What color is the circle? red",
    "What shape is the blue object? square",
    "How many triangles are there? two",
    "Is there a green diamond? yes",
    "Is the yellow circle left or right of the square? left",
    "Describe the image. A small purple triangle and a large orange square.",
    "Write a short caption for the image. Three shapes: red circle, cyan cross, white diamond.",
]


def _tiny_vision(tower: str) -> dict[str, Any]:
    return {"model_type": tower, "config": copy.deepcopy(TINY_TOWER_CONFIGS[tower])}


# front-end type -> its tiny config for a given tower (front-ends without a tower ignore it).
TINY_FRONTEND_CONFIGS: dict[str, Callable[[str], dict[str, Any]]] = {
    # Scales 16 + 4 = 20 visual features fit a ViT's 4x4 grid and a CNN's 8x8 map; ViTs get adapters, and
    # towers without a CLS token use the mean patch feature (feature_select 'patch').
    "adem_vl": lambda tower: {
        "type": "adem_vl",
        "vision": {
            **_tiny_vision(tower),
            "feature_select": "cls_patch" if VISION_TOWERS.get(tower).has_cls else "patch",
        },
        "tower_adapters": {"dim": 4} if VISION_TOWERS.get(tower).layout == "tokens" else None,
        "scales": [16, 4],
        "projector_dim": 16,
        "image": {"size": TINY_IMAGE_SIZE},
    },
    "llava_next": lambda tower: {
        "type": "llava_next",
        "vision": _tiny_vision(tower),
        "image": {"size": TINY_IMAGE_SIZE},
        "image_grid_pinpoints": [[32, 32], [32, 64], [64, 32], [64, 64], [32, 96], [96, 32]],
    },
    "llava": lambda tower: {
        "type": "llava",
        "vision": _tiny_vision(tower),
        "connector": {"type": "mlp2x_gelu", "merge": 2},
        "image": {"size": TINY_IMAGE_SIZE},
    },
    # 3x3 crops of 32-px views (96-px images); a tiny ViT's 4x4 grid is 4 tokens after the 2x2 merge.
    "inf_llava": lambda tower: {
        "type": "inf_llava",
        "vision": _tiny_vision(tower),
        "connector": {"type": "mlp2x_gelu", "merge": 2},
        "image": {"size": TINY_IMAGE_SIZE},
        "dem_heads": 2,
    },
    # 8-px patches: a 32x32 image is a 4x4 grid (21 tokens), a 48x40 one 6x5 (36 tokens).
    "solo": lambda tower: {"type": "solo", "patch_size": 8, "max_side": 48},
}


def tiny_recipe_model(max_length: int) -> dict[str, Any]:
    """A recipe's `model` section: the tiny llama over a tiny ConvNeXt, llava front-end, 32 px images."""
    return {
        "llm": {"model_type": "llama", "config": copy.deepcopy(TINY_LLM_CONFIGS["llama"])},
        "frontend": {
            "type": "llava",
            "vision": {
                "model_type": "convnext",
                "config": copy.deepcopy(TINY_TOWER_CONFIGS["convnext"]),
                "feature_layer": -1,
            },
            "connector": {"type": "mlp2x_gelu"},
            "image": {"size": 32},
        },
        "max_length": max_length,
    }


def tiny_vl_config(family: str = "llama", tower: str = "clip_vision_model", **overrides: Any) -> VLConfig:
    """A fresh VLConfig for a tiny `family` LLM + front-end over `tower`; overrides merge recursively.

    `frontend={"type": "solo", ...}` starts from that front-end's tiny config (default `llava`).
    """
    frontend = overrides.get("frontend", {}).get("type", "llava")
    raw = {
        "llm": {"model_type": family, "config": copy.deepcopy(TINY_LLM_CONFIGS[family])},
        "frontend": TINY_FRONTEND_CONFIGS[frontend](tower),
        "max_length": 256,
    }
    return VLConfig.model_validate(deep_merge(raw, overrides))


def tiny_tokenizer(config: VLConfig | None = None, vocab_size: int = 300):
    """A byte-level BPE trained on a few shapes-like sentences, holding `config`'s front-end tokens."""
    config = config or tiny_vl_config()
    tokenizer = train_bpe(_TEXTS * 10, vocab_size)
    return add_frontend_tokens(tokenizer, list(image_layout(config).special_tokens))


def tiny_processor(family: str = "llama", tower: str = "clip_vision_model", **overrides: Any) -> VLProcessor:
    """The processor `tiny_model` would come with, without building the model (data pipelines, benchmarks)."""
    config = tiny_vl_config(family, tower, **overrides)
    return VLProcessor.from_config(config, tiny_tokenizer(config))


def tiny_model(
    family: str = "llama",
    tower: str = "clip_vision_model",
    *,
    seed: int = 0,
    **overrides: Any,
) -> VL:
    """(model in eval mode, tokenizer, processor), with weights fixed by `seed`."""
    config = tiny_vl_config(family, tower, **overrides)
    torch.manual_seed(seed)
    model, processor = build(config, train_bpe(_TEXTS * 10, 300))
    return model.eval(), processor.tokenizer, processor


# -- conformance kit -----------------------------------------------------------------------------------
def chat(
    question: str,
    answer: str | None = None,
    *,
    image_in: Literal["user", "assistant"] | None = "user",
) -> list[dict]:
    """A one-turn conversation whose `<image>` marker opens the user turn, the reply, or (None) neither."""

    def content(role: str, text: str) -> str:
        return f"<image>\n{text}" if image_in == role else text

    messages = [{"role": "user", "content": content("user", question)}]
    if answer is not None:
        messages.append({"role": "assistant", "content": content("assistant", answer)})
    return messages


def train_batch(
    vl: VL,
    image,
    question: str = "What color is the circle?",
    answer: str = "red circle",
) -> dict:
    """One labelled sample (`question` on `image`, replied with `answer`), collated as training sees it."""
    model, tokenizer, processor = vl
    sample = processor.encode(chat(question, answer), [image])
    return pad_batch([sample], tokenizer.pad_token_id, model.frontend.layout)


def greedy(model: VLModel, inputs: dict, max_new_tokens: int = 6, **kwargs: Any):
    """Greedy generation that also returns the raw logits of every step (and the KV cache)."""
    return model.generate(
        **inputs,
        max_new_tokens=max_new_tokens,
        do_sample=False,
        return_dict_in_generate=True,
        output_logits=True,
        **kwargs,
    )


def assert_cached_decode_matches_recompute(
    vl: VL,
    question: str,
    image,
    *,
    max_new_tokens: int = 8,
    atol: float = 1e-4,
) -> None:
    """KV-cached greedy decoding gives, step by step, the logits and token of a full forward recompute."""
    model, _, processor = vl
    inputs = processor([chat(question)], [[image]])
    out = greedy(model, inputs, max_new_tokens=max_new_tokens)
    assert returned_cache(out) is not None
    tokens = out.sequences[0]
    assert len(tokens) >= 1
    for step, token in enumerate(tokens):
        ids = torch.cat([inputs["input_ids"][0], tokens[:step]])[None]
        logits = model(ids, torch.ones_like(ids), inputs["pixel_values"]).logits[0, -1]
        torch.testing.assert_close(out.logits[step][0], logits, atol=atol, rtol=0)
        assert int(logits.argmax()) == int(token)


def assert_padded_batch_matches_one_by_one(
    vl: VL,
    conversations: list[list[dict]],
    images: list[list],
    *,
    atol: float = 1e-4,
    prompt_logits: bool = False,
) -> dict:
    """A left-padded batch generates each row's tokens and step logits as that prompt alone (row 0 is padded).

    `prompt_logits` also compares the last prompt position of one forward pass. Returns the batch.
    """
    model, tokenizer, processor = vl
    batch = processor(conversations, images)
    assert batch["attention_mask"][0, 0] == 0  # row 0 is left-padded
    batched = greedy(model, batch)
    batch_last = model(**batch).logits[:, -1] if prompt_logits else None
    for row, (conversation, imgs) in enumerate(zip(conversations, images, strict=True)):
        single = processor([conversation], [imgs])
        alone = greedy(model, single)
        n = alone.sequences.shape[1]
        assert torch.equal(batched.sequences[row, :n], alone.sequences[0])
        assert (batched.sequences[row, n:] == tokenizer.pad_token_id).all()
        for step in range(n):
            torch.testing.assert_close(batched.logits[step][row], alone.logits[step][0], atol=atol, rtol=0)
        if batch_last is not None:
            torch.testing.assert_close(batch_last[row], model(**single).logits[0, -1], atol=atol, rtol=0)
    return batch


def assert_save_load_round_trip(vl: VL, batch: dict, image, path: str | Path) -> VLModel:
    """A model saved to `path` reloads in eval mode with bit-identical logits and greedy generations.

    Generation is compared on "How many triangles are there?" about `image`. Returns the loaded model.
    """
    model, tokenizer, processor = vl
    model.save_pretrained(path, tokenizer)
    loaded, _ = load_pretrained(path)
    assert not loaded.training
    assert torch.equal(loaded(**batch).logits, model(**batch).logits)
    inputs = processor([chat("How many triangles are there?")], [[image]])
    kwargs = {"max_new_tokens": 5, "do_sample": False}
    assert torch.equal(loaded.generate(**inputs, **kwargs), model.generate(**inputs, **kwargs))
    return loaded


# -- imported layouts ------------------------------------------------------------------------------
# llava-1.5-hf's template: content parts, images first, "USER: ... ASSISTANT:"
TINY_LLAVA_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': ' }}"
    "{% endif %}{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}"
    "{{ '<image>\n' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{{ content['text'] + ' ' }}{% endfor %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)


def _tiny_llava_text(family: str, extra_vocab: int = 0, **overrides: Any):
    """(tokenizer with `<image>`, the tiny LLM's transformers config) of the imported-layout writers."""
    from transformers import AutoConfig

    tokenizer = train_bpe(_TEXTS * 10, 300)
    tokenizer.add_special_tokens(
        {"additional_special_tokens": ["<image>"]}, replace_extra_special_tokens=False
    )
    tokenizer.pad_token = tokenizer.eos_token
    config = {**TINY_LLM_CONFIGS[family], **overrides, "vocab_size": len(tokenizer) + extra_vocab}
    text = AutoConfig.for_model(family, **config)
    for name in ("bos", "eos", "pad"):
        setattr(text, f"{name}_token_id", getattr(tokenizer, f"{name}_token_id"))
    return tokenizer, text


def write_tiny_llava_hf(
    path,
    family: str = "llama",
    tower: str = "clip_vision_model",
    *,
    strategy: str = "default",
    feature_layer: int | list[int] = -2,
    pad: bool = False,
    act: str = "gelu",
    seed: int = 0,
    **text_config: Any,
):
    """A tiny random `LlavaForConditionalGeneration` + `LlavaProcessor` saved with transformers' classes;
    `text_config` overrides the tiny LLM's config (e.g. num_hidden_layers)."""
    from transformers import (
        AutoConfig,
        CLIPImageProcessorPil,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaImageProcessorPil,
        LlavaProcessor,
    )

    tokenizer, text = _tiny_llava_text(family, extra_vocab=3, **text_config)
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
        chat_template=TINY_LLAVA_TEMPLATE,
    )
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return model, processor


def write_tiny_llava_next(path, family: str = "llama"):
    """A tiny random `LlavaNextForConditionalGeneration` + `LlavaNextProcessor` (4 pinpoints over 32-px tiles)
    saved with transformers' classes; its lm_head is its own even where the LLM ties (transformers' way)."""
    from transformers import (
        AutoConfig,
        LlavaNextConfig,
        LlavaNextForConditionalGeneration,
        LlavaNextImageProcessorPil,
        LlavaNextProcessor,
    )

    tokenizer, text = _tiny_llava_text(family)
    pinpoints = [[32, 32], [32, 64], [64, 32], [64, 64]]
    config = LlavaNextConfig(
        vision_config=AutoConfig.for_model("clip_vision_model", **TINY_TOWER_CONFIGS["clip_vision_model"]),
        text_config=text,
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        image_grid_pinpoints=pinpoints,
    )
    torch.manual_seed(0)
    model = LlavaNextForConditionalGeneration(config).eval()
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() > 1:
                param.normal_(0, 0.08)
    images = LlavaNextImageProcessorPil(
        size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}, image_grid_pinpoints=pinpoints
    )
    processor = LlavaNextProcessor(
        image_processor=images,
        tokenizer=tokenizer,
        patch_size=8,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=TINY_LLAVA_TEMPLATE,
    )
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return model, processor
