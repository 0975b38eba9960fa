"""Fixtures of the serve tests: a tiny random checkpoint and the live server most tests share."""

from __future__ import annotations

from pathlib import Path

import pytest
from serve_kit import LiveServer, server_config

from vlbridge.testing import tiny_model


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory) -> Path:
    """A tiny llama + CLIP llava model (max_length 256), saved as a checkpoint directory."""
    path = tmp_path_factory.mktemp("serve") / "tiny-vl"
    model, tokenizer, _ = tiny_model("llama", "clip_vision_model")
    model.save_pretrained(path, tokenizer)
    return path


@pytest.fixture(scope="module")
def server(checkpoint):
    """The server most tests share: API key, at most 3 images per request and 256x256 pixels each."""
    with LiveServer(server_config(checkpoint, batch_window_ms=20)) as live:
        yield live
