"""Tiny random models for tests and examples: every supported LLM family and vision tower, CPU-sized.

`tiny_model("qwen3", "siglip_vision_model")` builds a seeded, randomly initialised VLModel (a 2-layer,
64-wide LLM and a 32x32-pixel tower) with a small trained BPE tokenizer and its VLProcessor in about
a second, so behaviour that must hold for every family can be checked without downloading anything.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import torch

from .config import VLConfig, deep_merge
from .modeling import VLModel
from .processing import VLProcessor
from .registry import FRONTENDS, VISION_TOWERS
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
    return add_frontend_tokens(tokenizer, FRONTENDS.get(config.frontend.type).tokens_for(config.frontend))


def tiny_model(
    family: str = "llama",
    tower: str = "clip_vision_model",
    *,
    seed: int = 0,
    **overrides: Any,
) -> tuple[VLModel, Any, VLProcessor]:
    """(model in eval mode, tokenizer, processor), with weights fixed by `seed`."""
    config = tiny_vl_config(family, tower, **overrides)
    tokenizer = tiny_tokenizer(config)
    torch.manual_seed(seed)
    model = VLModel.from_config(config, tokenizer).eval()
    processor = VLProcessor(
        tokenizer, model.frontend, image_token=config.image_token, max_length=config.max_length
    )
    return model, tokenizer, processor
