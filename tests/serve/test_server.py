"""The server's context: the LLM's position limit by default (as vLLM), lowered by --max-model-len."""

from __future__ import annotations

import pytest

from vlbridge.errors import ConfigError
from vlbridge.serve.server import context_length
from vlbridge.testing import tiny_model


def test_the_context_defaults_to_the_position_limit_and_max_model_len_lowers_it():
    model = tiny_model()[0]  # max_position_embeddings 512, trained max_length 256
    assert context_length(model, None) == 512
    assert context_length(model, 128) == 128
    with pytest.raises(ConfigError, match="--max-model-len 1024 is over the LLM's max_position_embeddings"):
        context_length(model, 1024)
