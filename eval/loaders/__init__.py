"""Eval data loaders (registry: `LOADERS`, looked up by a task's `data.type`): each reads one family of
datasets from the hub, a `save_to_disk` directory, or the dataset's native files, into `Example`s."""

from . import captions, choice, shapes, vqa  # noqa: F401  (registration)
from .base import LOADERS, SourceConfig, load_examples

__all__ = ["LOADERS", "SourceConfig", "load_examples"]
