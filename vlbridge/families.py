"""What differs between LLM families, in one table, and the attention backend / dtype choice.

In-layer plug-ins (deep fusion, mixture-of-depths) look up where a family keeps its decoder layers
and MLP here instead of testing model names in their own code.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass

import torch

from .errors import ConfigError


@dataclass(frozen=True)
class Family:
    """Where a transformers causal LM keeps the parts that plug-ins wrap."""

    layers: str = "model.layers"
    mlp: str = "mlp"
    post_mlp_norm: str | None = None  # Gemma-2/3 normalise the MLP output before the residual add
    scales_embeddings: bool = False  # Gemma multiplies inputs_embeds by sqrt(hidden_size)


FAMILIES: dict[str, Family] = {
    "llama": Family(),
    "mistral": Family(),
    "qwen2": Family(),
    "qwen3": Family(),
    "phi3": Family(),
    "gemma": Family(scales_embeddings=True),
    "gemma2": Family(post_mlp_norm="post_feedforward_layernorm", scales_embeddings=True),
    "gemma3_text": Family(post_mlp_norm="post_feedforward_layernorm", scales_embeddings=True),
}


def family_of(model_type: str) -> Family:
    if model_type not in FAMILIES:
        raise ConfigError(
            f"LLM family {model_type!r} is not in vlbridge's family table ({', '.join(FAMILIES)}); "
            "early-fusion front-ends may still work, in-layer plug-ins will not"
        )
    return FAMILIES[model_type]


def flash_attn_available() -> bool:
    return torch.cuda.is_available() and importlib.util.find_spec("flash_attn") is not None


def choose_attention(requested: str, device: torch.device | str) -> str | None:
    """flash-attention 2 when installed on CUDA, else None: transformers' default (SDPA where the
    architecture supports it, eager otherwise, e.g. Gemma-2), unless the recipe names one."""
    if requested == "flash_attention_2" and not flash_attn_available():
        raise ConfigError(
            "llm.attn_implementation='flash_attention_2' needs CUDA and the flash-attn package "
            "(pip install 'vlbridge[flash]'); use 'auto' to fall back to SDPA"
        )
    if requested != "auto":
        return requested
    return "flash_attention_2" if torch.device(device).type == "cuda" and flash_attn_available() else None


def choose_dtype(requested: str, device: torch.device | str) -> torch.dtype:
    """bf16 on GPU, fp32 on CPU (bf16 matmuls are ~30x slower on CPUs without AMX)."""
    if requested != "auto":
        return getattr(torch, requested)
    return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
