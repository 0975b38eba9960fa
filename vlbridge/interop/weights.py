"""Reading another layout's safetensors weights and renaming them to vlbridge's module paths."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from ..errors import ConfigError

INDEX = "model.safetensors.index.json"


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint directory: `model.safetensors`, or the shards its index names."""
    if (path / INDEX).is_file():
        shards = sorted(set(json.loads((path / INDEX).read_text())["weight_map"].values()))
    elif (path / "model.safetensors").is_file():
        shards = ["model.safetensors"]
    else:
        raise ConfigError(f"{path}: no model.safetensors or {INDEX}; save the model with safe_serialization")
    state: dict[str, torch.Tensor] = {}
    for shard in shards:
        state.update(load_file(str(path / shard)))
    return state


def rename(
    state: dict[str, torch.Tensor], prefixes: list[tuple[str, str]], path: Path
) -> dict[str, torch.Tensor]:
    """Keys renamed by the first matching (theirs, ours) prefix; a key no prefix matches is an error."""
    out = {}
    for key, value in state.items():
        match = next(((theirs, ours) for theirs, ours in prefixes if key.startswith(theirs)), None)
        if match is None:
            raise ConfigError(f"{path}: weight {key!r} belongs to no part vlbridge knows how to place")
        out[match[1] + key[len(match[0]) :]] = value
    return out
