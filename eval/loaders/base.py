"""Loader registry and the helpers every loader shares: where the data is, and reading it.

A task's `data.path` is a Hugging Face hub id (loaded with `datasets.load_dataset` when online), a local
directory written by `Dataset.save_to_disk` (`load_from_disk`), or the dataset's own files (JSON annotation
files next to an image folder). Each loader turns either form into `Example`s; native files are first read
into rows shaped like the hub copy's, so one conversion serves both.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from vlbridge.config import Typed
from vlbridge.errors import ConfigError
from vlbridge.registry import Registry

from ..example import Example

LOADERS: Registry[Any] = Registry("eval data loader")


class SourceConfig(Typed):
    """Base of every task's `data:` section."""


class HubSourceConfig(SourceConfig):
    """A dataset that may come from the hub, a `save_to_disk` directory, or its native files."""

    path: str
    name: str | None = None  # hub configuration
    split: str = "test"
    image_folder: str | None = None  # native files: where the images are


def need(value: Any, what: str, task_hint: str) -> Any:
    if value is None:
        raise ConfigError(f"{what} is required here; set it on the command line, e.g. {task_hint}")
    return value


def load_examples(config: SourceConfig) -> Sequence[Example]:
    return LOADERS.get(config.type)(config)
