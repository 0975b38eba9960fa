"""The two ways to get a model and its processor: build a fresh one from a config, or open a checkpoint.

Every entry point (training, the CLI, the server, evaluation, benchmarks, tests) goes through one of
these, so a model never exists without the processor that matches it.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoTokenizer

from .checkpoint import add_reducers, load_weights, read_config
from .config import VLConfig
from .errors import ConfigError
from .frontends.layout import image_layout
from .modeling import VLModel
from .processing import VLProcessor
from .registry import CHECKPOINT_FORMATS
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
    """(model in eval mode, processor) from a checkpoint directory: vlbridge's own layout
    (`VLModel.save_pretrained`) or one `CHECKPOINT_FORMATS` recognises (transformers' LLaVA).

    `reducers` (config sections or dicts) join those saved with the model: training-free ones (turbo,
    tome, fastv) switch on for any trained or imported model this way.
    """
    path = Path(path)
    for name in CHECKPOINT_FORMATS.names():
        layout = CHECKPOINT_FORMATS.get(name)
        if layout.detect(path):
            return layout.load(path, device=device, dtype=dtype, reducers=reducers, max_length=max_length)
    config = read_config(path, reducers)
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    model = VLModel.from_config(config, tokenizer, device=device, dtype=dtype, load_weights=False)
    saved = len(config.reducers) - len(reducers or [])
    load_weights(model, path, saved_reducers=saved, device=device)
    model.eval()
    return model.to(device), VLProcessor.from_config(config, tokenizer, max_length=max_length)


def assemble(
    config: VLConfig,
    tokenizer,
    state: dict[str, torch.Tensor],
    *,
    device: str = "cpu",
    dtype: torch.dtype | None = None,
    reducers: list | None = None,
    max_length: int | None = None,
) -> tuple[VLModel, VLProcessor]:
    """A model built from `config` holding `state` (every weight under vlbridge's names), and its processor:
    how imported checkpoints become vlbridge models. Tied output embeddings may be absent from `state`."""
    if reducers:
        config = add_reducers(config, reducers)
    model = VLModel.from_config(config, tokenizer, device=device, dtype=dtype, load_weights=False)
    missing, unexpected = model.load_state_dict(state, strict=False)
    ties = model.language_model.config.get_text_config().tie_word_embeddings
    tied = {"language_model.lm_head.weight"} if ties else set()
    missing = sorted(k for k in set(missing) - tied if not k.startswith("reducers."))
    if missing or unexpected:
        raise ConfigError(
            f"the checkpoint does not fit the model its config describes: missing {missing[:5]}, "
            f"unexpected {sorted(unexpected)[:5]}"
        )
    model.eval()
    return model.to(device), VLProcessor.from_config(config, tokenizer, max_length=max_length)
