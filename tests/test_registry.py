"""Registries: decorator registration, lookup by the recipe's string, helpful unknown-name errors."""

from __future__ import annotations

import pytest

from vlbridge.errors import ConfigError
from vlbridge.registry import CONNECTORS, DATA_FORMATS, FRONTENDS, VISION_TOWERS, Registry


def test_builtins_are_registered():
    assert "llava" in FRONTENDS
    assert {"linear", "mlp2x_gelu"} <= set(CONNECTORS.names())
    assert {"shapes", "llava_json", "messages", "hf_datasets"} <= set(DATA_FORMATS.names())
    assert {"clip_vision_model", "siglip_vision_model", "convnext", "resnet"} <= set(VISION_TOWERS.names())


def test_register_lookup_and_errors():
    things: Registry = Registry("thing")

    @things.register("a", config=dict)
    def make_a():
        return "A"

    assert things.get("a")() == "A" and things.config_class("a") is dict
    with pytest.raises(ValueError, match="registered twice"):
        things.register("a")(make_a)
    with pytest.raises(ConfigError, match="unknown thing 'b'; available: a"):
        things.get("b")
