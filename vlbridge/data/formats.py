"""Data formats: every source becomes a sequence of samples `{"id", "images", "messages"}`.

`messages` are `{"role", "content"}` dicts whose string content marks each image with `<image>`;
`images` are loaded lazily (paths, bytes or PIL images) by `load_image`, which names the file and
the sample when something is wrong.
"""

from __future__ import annotations

import base64
import io
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from PIL import Image, UnidentifiedImageError

from ..config import Typed
from ..errors import DataError
from ..registry import DATA_FORMATS

IMAGE_TOKEN = "<image>"
_LLAVA_ROLES = {
    "human": "user",
    "gpt": "assistant",
    "system": "system",
    "user": "user",
    "assistant": "assistant",
}


class DataSourceConfig(Typed):
    """Base of every data source section of a recipe."""

    limit: int | None = None


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


def _content_to_text(content: Any, images: list, sample_id: str) -> str:
    """OpenAI-style content parts -> text with `<image>` markers (image URLs appended to `images`)."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise DataError(f"sample {sample_id}: message content must be a string or a list of parts")
    pieces = []
    for part in content:
        kind = part.get("type")
        if kind == "text":
            pieces.append(part["text"])
        elif kind in ("image_url", "image"):
            url = part.get("image_url", {}).get("url") if kind == "image_url" else part.get("image")
            if url is not None:
                images.append(url)
            pieces.append(IMAGE_TOKEN)
        else:
            raise DataError(
                f"sample {sample_id}: unknown content part type {kind!r} (use 'text' or 'image_url')"
            )
    return "\n".join(pieces)


def normalise_messages(messages: list[dict], sample_id: str) -> tuple[list[dict], list]:
    """Plain `{"role", "content": str}` messages plus the images that content parts referenced."""
    images: list = []
    out = []
    for m in messages:
        role = _LLAVA_ROLES.get(m.get("role", m.get("from", "")))
        if role is None:
            raise DataError(f"sample {sample_id}: unknown role {m.get('role', m.get('from'))!r}")
        text = _content_to_text(m.get("content", m.get("value")), images, sample_id)
        out.append({"role": role, "content": text})
    return out, images


def _field(row: dict, key: str, sample_id: str) -> Any:
    if key not in row:
        raise DataError(f"sample {sample_id}: record has no {key!r} field; it has {', '.join(row) or 'none'}")
    return row[key]


def _resolve(path: str, folder: Path) -> str:
    return path if path.startswith("data:") or Path(path).is_absolute() else str(folder / path)


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


def _read_json_records(path: Path) -> list[dict]:
    if not path.is_file():
        raise DataError(f"data file not found: {path}")
    text = path.read_text()
    jsonl = path.suffix == ".jsonl"
    # (first line number, text) of each JSON document: every non-empty line of a JSONL file, else the file
    chunks = [(i + 1, line) for i, line in enumerate(text.splitlines()) if line.strip()]
    chunks = chunks if jsonl else [(1, text)]
    records: Any = []
    for first_line, chunk in chunks:
        try:
            records.append(json.loads(chunk))
        except json.JSONDecodeError as err:
            raise DataError(f"{path}: invalid JSON at line {first_line + err.lineno - 1}: {err.msg}") from err
    records = records if jsonl else records[0]
    if not isinstance(records, list) or not all(isinstance(r, dict) for r in records):
        raise DataError(f"{path}: expected a list of records (JSON objects), one per sample")
    return records


class LlavaJsonConfig(DataSourceConfig):
    type: str = "llava_json"
    path: str
    image_folder: str | None = None


@DATA_FORMATS.register("llava_json", config=LlavaJsonConfig)
def llava_json(cfg: LlavaJsonConfig) -> Sequence[dict]:
    """LLaVA's format: `[{"id", "image": path | [paths], "conversations": [{"from", "value"}]}]`."""
    path = Path(cfg.path)
    folder = Path(cfg.image_folder) if cfg.image_folder else path.parent

    def convert(row: dict, index: int) -> dict:
        sample_id = str(row.get("id", index))
        messages, _ = normalise_messages(_field(row, "conversations", sample_id), sample_id)
        image = row.get("image")
        paths = [] if image is None else [image] if isinstance(image, str) else list(image)
        return {"id": sample_id, "images": [_resolve(p, folder) for p in paths], "messages": messages}

    return LazySamples(_read_json_records(path), convert)


class MessagesConfig(DataSourceConfig):
    type: str = "messages"
    path: str
    image_folder: str | None = None


@DATA_FORMATS.register("messages", config=MessagesConfig)
def messages_json(cfg: MessagesConfig) -> Sequence[dict]:
    """OpenAI-style `{"messages": [...], "images"?: [...]}` records, JSON list or JSONL."""
    path = Path(cfg.path)
    folder = Path(cfg.image_folder) if cfg.image_folder else path.parent

    def convert(row: dict, index: int) -> dict:
        sample_id = str(row.get("id", index))
        messages, inline = normalise_messages(_field(row, "messages", sample_id), sample_id)
        images = [_resolve(p, folder) for p in (row.get("images") or inline)]
        return {"id": sample_id, "images": images, "messages": messages}

    return LazySamples(_read_json_records(path), convert)


class HFDatasetConfig(DataSourceConfig):
    type: str = "hf_datasets"
    path: str
    split: str | None = "train"
    image_column: str = "image"
    messages_column: str = "messages"


@DATA_FORMATS.register("hf_datasets", config=HFDatasetConfig)
def hf_dataset(cfg: HFDatasetConfig) -> Sequence[dict]:
    """A `datasets` dataset: a local `save_to_disk` dir, or a hub id when online."""
    import datasets

    if Path(cfg.path).exists():
        ds = datasets.load_from_disk(cfg.path)
    else:
        ds = datasets.load_dataset(cfg.path, split=cfg.split)
    if isinstance(ds, datasets.DatasetDict):
        if cfg.split not in ds:
            raise DataError(f"{cfg.path}: no split {cfg.split!r}; it has {', '.join(ds)}")
        ds = ds[cfg.split]
    for column in (cfg.messages_column,):
        if column not in ds.column_names:
            raise DataError(f"{cfg.path}: no column {column!r}; columns are {', '.join(ds.column_names)}")

    def convert(row: dict, index: int) -> dict:
        sample_id = str(row.get("id", index))
        messages, inline = normalise_messages(row[cfg.messages_column], sample_id)
        image = row.get(cfg.image_column)
        images = inline if image is None else image if isinstance(image, list) else [image]
        return {"id": sample_id, "images": images, "messages": messages}

    return LazySamples(ds, convert)


class ShapesSourceConfig(DataSourceConfig):
    type: str = "shapes"
    variant: str = "base"
    max_objects: int | None = None  # fewer objects than the variant allows (e.g. 1 for a curriculum stage)
    split: str = "train"
    n: int = 1000
    seed: int = 0
    questions_per_image: int | None = 1
    types: list[str] | None = None  # question types dealt in rounds; list one twice to ask it twice as often
    caption: bool = False
    image_first: bool = True  # False puts the question before the image, so image tokens can attend to it


@DATA_FORMATS.register("shapes", config=ShapesSourceConfig)
def shapes(cfg: ShapesSourceConfig) -> Sequence[dict]:
    """The synthetic shapes dataset, generated in memory (deterministic from the seed)."""
    from . import shapes as shapes_data
    from .shapes_samples import ShapesSamples

    variant = shapes_data.resolve_variant(cfg.variant, cfg.max_objects)
    scenes = shapes_data.generate(variant, cfg.split, cfg.n, seed=cfg.seed)
    return ShapesSamples(
        scenes,
        questions_per_image=cfg.questions_per_image,
        types=cfg.types,
        caption=cfg.caption,
        rng_seed=cfg.seed,
        image_first=cfg.image_first,
    )


def load_source(cfg: DataSourceConfig) -> Sequence[dict]:
    samples = DATA_FORMATS.get(cfg.type)(cfg)
    return samples[: cfg.limit] if cfg.limit is not None else samples
