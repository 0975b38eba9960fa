"""LoRA on any named part of a VLModel through PEFT, and the clean (adapter-free) view of its weights."""

from __future__ import annotations

import hashlib
import re

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from torch import nn

from .errors import ConfigError

_PEFT_PREFIX = re.compile(r"base_model\.model\.")
_ADAPTER_TAGS = ("lora_", "trainable_tokens_")  # LoRA matrices; per-token embedding deltas


def lora_config(
    r: int, alpha: float, dropout: float, target_modules, trainable_tokens: list[int] | None = None
) -> LoraConfig:
    """`trainable_tokens`: embedding rows trained alongside LoRA (new tokens a front-end gave meaning)."""
    return LoraConfig(
        r=r,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=target_modules,
        bias="none",
        trainable_token_indices=list(trainable_tokens) if trainable_tokens else None,
    )


def is_adapter_param(name: str) -> bool:
    return any(tag in name for tag in _ADAPTER_TAGS)


def wrap(module: nn.Module, config: LoraConfig, group: str, seed: int | None = None) -> PeftModel:
    """PEFT-wrap one module group; an empty target match is a config error, not a silent no-op.

    With `seed`, the adapters' initial values depend only on it and the group, not on what drew random
    numbers before (a sharded run wraps every group up front, an unsharded one at its stage)."""
    if isinstance(module, PeftModel):
        return module
    try:
        if seed is None:
            return get_peft_model(module, config)
        with torch.random.fork_rng():
            digest = hashlib.sha256(f"{seed}:{group}".encode()).digest()
            torch.manual_seed(int.from_bytes(digest[:7], "little"))
            return get_peft_model(module, config)
    except ValueError as err:
        raise ConfigError(
            f"LoRA on {group!r}: target_modules={config.target_modules!r} matched nothing ({err}); "
            "set train.lora.target_modules to names of nn.Linear layers in that module, or 'all-linear'"
        ) from err


def clean_state_dict(state: dict) -> dict:
    """A module's state dict with every adapter parameter dropped and PEFT's renaming undone (base weights
    only)."""
    clean = {}
    for key, value in state.items():
        if is_adapter_param(key):
            continue
        key = key.replace(".token_adapter.base_layer.", ".").replace(".base_layer.", ".")
        clean[_PEFT_PREFIX.sub("", key, count=1)] = value
    return clean


def merge(module: nn.Module) -> nn.Module:
    """Fold LoRA into the base weights and return the plain module."""
    return module.merge_and_unload() if isinstance(module, PeftModel) else module
