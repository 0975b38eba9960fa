"""Data formats: every source becomes a sequence of samples `{"id", "images", "messages"}`.

`messages` are `{"role", "content"}` dicts whose string content marks each image with `<image>`;
`images` are loaded lazily (paths, bytes or PIL images) by `load_image`, which names the file and
the sample when something is wrong.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..config import IMAGE_MARKER, Typed
from ..errors import DataError
from ..registry import DATA_FORMATS
from .io import LazySamples, column, open_dataset, read_records

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
            pieces.append(IMAGE_MARKER)
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


def _resolve(path: str, folder: Path) -> str:
    return path if path.startswith("data:") or Path(path).is_absolute() else str(folder / path)


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
        messages, _ = normalise_messages(column(row, "conversations", f"sample {sample_id}"), sample_id)
        image = row.get("image")
        paths = [] if image is None else [image] if isinstance(image, str) else list(image)
        return {"id": sample_id, "images": [_resolve(p, folder) for p in paths], "messages": messages}

    return LazySamples(read_records(path), convert)


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
        messages, inline = normalise_messages(column(row, "messages", f"sample {sample_id}"), sample_id)
        images = [_resolve(p, folder) for p in (row.get("images") or inline)]
        return {"id": sample_id, "images": images, "messages": messages}

    return LazySamples(read_records(path), convert)


class HFDatasetConfig(DataSourceConfig):
    type: str = "hf_datasets"
    path: str
    split: str | None = "train"
    image_column: str = "image"
    messages_column: str = "messages"


@DATA_FORMATS.register("hf_datasets", config=HFDatasetConfig)
def hf_dataset(cfg: HFDatasetConfig) -> Sequence[dict]:
    """A `datasets` dataset: a local `save_to_disk` dir, or a hub id when online."""
    ds = open_dataset(cfg.path, None, cfg.split)
    if cfg.messages_column not in ds.column_names:
        raise DataError(
            f"{cfg.path}: no column {cfg.messages_column!r}; columns are {', '.join(ds.column_names)}"
        )

    return LazySamples(ds, hf_row_converter(cfg.messages_column, cfg.image_column))


def hf_row_converter(messages_column: str, image_column: str):
    """`convert(row, index)` for `datasets` rows: messages from one column, images from another (an image,
    a list of them, or none, when content parts hold them)."""

    def convert(row: dict, index: int) -> dict:
        sample_id = str(row.get("id", index))
        messages, inline = normalise_messages(row[messages_column], sample_id)
        image = row.get(image_column)
        images = inline if image is None else image if isinstance(image, list) else [image]
        return {"id": sample_id, "images": images, "messages": messages}

    return convert


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
    """The source's samples: a sequence, or a stream (`hf_streaming`) whose epochs end at `limit` itself."""
    samples = DATA_FORMATS.get(cfg.type)(cfg)
    return samples[: cfg.limit] if cfg.limit is not None and isinstance(samples, Sequence) else samples
