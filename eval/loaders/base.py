"""Loader registry and the helpers every loader shares: where the data is, and reading it.

A task's `data.path` is a Hugging Face hub id (loaded with `datasets.load_dataset` when online), a local
directory written by `Dataset.save_to_disk` (`load_from_disk`), or the dataset's own files (JSON annotation
files next to an image folder). Each loader turns either form into `Example`s; native files are first read
into rows shaped like the hub copy's, so one conversion serves both.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from vlbridge.config import Typed
from vlbridge.errors import ConfigError, DataError
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


def is_saved_dataset(path: str | Path) -> bool:
    """True for a directory written by `Dataset.save_to_disk` / `DatasetDict.save_to_disk`."""
    path = Path(path)
    return path.is_dir() and any(
        (path / f).is_file() for f in ("state.json", "dataset_dict.json", "dataset_info.json")
    )


def is_native(path: str | Path) -> bool:
    """True when `path` is a local file or a folder that is not a saved `datasets` directory."""
    path = Path(path)
    return path.is_file() or (path.is_dir() and not is_saved_dataset(path))


def open_dataset(path: str, name: str | None, split: str):
    """A `datasets.Dataset` from a save_to_disk directory or a hub id (the error says which was tried)."""
    import datasets

    if is_saved_dataset(path):
        ds = datasets.load_from_disk(path)
        if isinstance(ds, datasets.DatasetDict):
            if split not in ds:
                raise DataError(f"{path}: no split {split!r}; it has {', '.join(ds)} (set data.split)")
            ds = ds[split]
        return ds
    if Path(path).exists():
        raise ConfigError(f"{path} is neither a saved `datasets` directory nor a file this loader reads")
    try:
        return datasets.load_dataset(path, name, split=split)
    except Exception as err:  # noqa: BLE001 - offline, unknown id, gated, ...: all need the same advice
        raise DataError(
            f"could not load hub dataset {path!r} (config {name!r}, split {split!r}): {err}. Offline, point "
            "data.path at a local copy: a `save_to_disk` directory or the dataset's own files"
        ) from err


def read_json(path: str | Path) -> Any:
    path = Path(path)
    if not path.is_file():
        raise DataError(f"file not found: {path}")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise DataError(f"{path}: invalid JSON at line {err.lineno}: {err.msg}") from err


def read_jsonl(path: str | Path) -> list[dict]:
    """JSON lines (POPE ships them under a .json name)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"file not found: {path}")
    rows = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise DataError(f"{path}: invalid JSON on line {number}: {err.msg}") from err
    return rows


def need(value: Any, what: str, task_hint: str) -> Any:
    if value is None:
        raise ConfigError(f"{what} is required here; set it on the command line, e.g. {task_hint}")
    return value


def column(row: dict, key: str, where: str) -> Any:
    if key not in row:
        raise DataError(f"{where}: record has no {key!r} field; it has {', '.join(sorted(row)) or 'none'}")
    return row[key]


def load_examples(config: SourceConfig) -> Sequence[Example]:
    return LOADERS.get(config.type)(config)
