"""The two ways to get a model and its processor: build a fresh one from a config, or open a checkpoint.

Every entry point (training, the CLI, the server, evaluation, benchmarks, tests) goes through one of
these, so a model never exists without the processor that matches it.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoTokenizer

from .checkpoint import load_weights, read_config
from .config import VLConfig
from .frontends.layout import image_layout
from .modeling import VLModel
from .processing import VLProcessor
from .tokenization import add_frontend_tokens


def build(
    config: VLConfig, tokenizer, *, device: str = "cpu", dtype: torch.dtype | None = None
) -> tuple[VLModel, VLProcessor]:
    """A fresh model (random or pretrained parts, as `config` says) and its processor.

    The front-end's special tokens are added to `tokenizer` first (it is the processor's tokenizer).
    """
    add_frontend_tokens(tokenizer, list(image_layout(config).special_tokens))
    model = VLModel.from_config(config, tokenizer, device=device, dtype=dtype)
    return model, VLProcessor.from_config(config, tokenizer)


def load_pretrained(
    path,
    *,
    device: str = "cpu",
    dtype: torch.dtype | None = None,
    reducers: list | None = None,
    max_length: int | None = None,
) -> tuple[VLModel, VLProcessor]:
    """(model in eval mode, processor) from a checkpoint directory written by `VLModel.save_pretrained`.

    `reducers` (config sections or dicts) join those saved with the model: training-free ones (turbo,
    tome, fastv) switch on for any trained model this way.
    """
    path = Path(path)
    config = read_config(path, reducers)
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    model = VLModel.from_config(config, tokenizer, device=device, dtype=dtype, load_weights=False)
    saved = len(config.reducers) - len(reducers or [])
    load_weights(model, path, saved_reducers=saved, device=device)
    model.eval()
    return model.to(device), VLProcessor.from_config(config, tokenizer, max_length=max_length)
