"""Reading data from disk and the hub, for training sources (`data/formats.py`) and eval loaders
(`eval/loaders/`) alike: JSON and JSON-lines records, `datasets` directories and hub ids, images from any
reference, rows converted lazily. Every failure is a DataError or ConfigError naming the file and what to do.
"""

from __future__ import annotations

import base64
import io
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from PIL import Image, UnidentifiedImageError

from ..errors import ConfigError, DataError
from .records import RecordIndex


def load_image(ref: Any, sample_id: str = "?") -> Image.Image:
    """A PIL RGB image from a path, bytes, data URL, datasets Image dict or PIL image."""
    if isinstance(ref, Image.Image):
        return ref.convert("RGB")
    if isinstance(ref, dict):  # datasets.Image() undecoded: {"bytes": ..., "path": ...}
        ref = ref.get("bytes") or ref.get("path")
    if isinstance(ref, str) and ref.startswith("data:"):
        try:
            ref = base64.b64decode(ref.split(",", 1)[1], validate=True)
        except (IndexError, ValueError) as err:
            raise DataError(f"sample {sample_id}: invalid base64 data URL for an image") from err
    if not isinstance(ref, (str, bytes, Path)):
        raise DataError(f"sample {sample_id}: no usable image reference (got {type(ref).__name__})")
    where = "inline bytes" if isinstance(ref, bytes) else str(ref)
    try:
        source = io.BytesIO(ref) if isinstance(ref, bytes) else ref
        with Image.open(source) as image:
            return image.convert("RGB")
    except FileNotFoundError as err:
        raise DataError(f"sample {sample_id}: image file not found: {where}") from err
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise DataError(f"sample {sample_id}: image {where} is not a readable image ({err})") from err


class LazySamples(Sequence):
    """Raw rows converted on access (datasets stay memory-mapped; `--limit 50` converts 50 rows).

    `convert(row, index)` gets the row's non-negative index.
    """

    def __init__(self, rows: Sequence, convert) -> None:
        self.rows, self.convert = rows, convert

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        if index < 0:
            index += len(self)
        return self.convert(self.rows[index], index)


def read_records(path: Path) -> RecordIndex:
    """The records of a JSON list file, or of a `.jsonl` file (one object per line), parsed on access:
    only their byte offsets are held, so a file of any size costs 16 bytes a record (`data/records.py`)."""
    return RecordIndex.build(path)


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
                raise DataError(f"{path}: invalid JSON at line {number}: {err.msg}") from err
    return rows


def column(row: dict, key: str, where: str) -> Any:
    if key not in row:
        raise DataError(f"{where}: record has no {key!r} field; it has {', '.join(sorted(row)) or 'none'}")
    return row[key]
