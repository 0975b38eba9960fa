"""Helpers for eval tests: tiny image files and `save_to_disk` datasets in the hub copies' schemas."""

from __future__ import annotations

import io
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
from PIL import Image

from vlbridge.eval.loaders import load_examples
from vlbridge.eval.tasks import load_task, render_prompt


def write_image(path: Path, color: tuple[int, int, int], fmt: str | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (24, 16), color).save(path, format=fmt)
    return path


def image_bytes(color: tuple[int, int, int]) -> dict:
    buffer = io.BytesIO()
    Image.new("RGB", (24, 16), color).save(buffer, format="PNG")
    return {"bytes": buffer.getvalue(), "path": None}


def write_json(path: Path, data, lines: bool = False) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(json.dumps(d) for d in data) if lines else json.dumps(data))
    return path


def save_dataset(path: Path, rows: dict[str, list], features: dict, split: str | None = None) -> Path:
    """A `save_to_disk` directory (a DatasetDict with `split`, as the hub copy has, when given)."""
    import datasets

    ds = datasets.Dataset.from_dict(rows, features=datasets.Features(features))
    (datasets.DatasetDict({split: ds}) if split else ds).save_to_disk(str(path))
    return path


def task_examples(name: str, data: dict):
    """(task, examples) of a shipped task with its data section overridden."""
    task = load_task(name, {"data": data})
    return task, load_examples(task.data)


def first_pixel(example) -> tuple[int, int, int]:
    return example.load_images()[0].getpixel((0, 0))


@pytest.fixture
def kit() -> SimpleNamespace:
    """The helpers above, for test modules in sub-folders (test folders are not packages)."""
    return SimpleNamespace(
        write_image=write_image,
        image_bytes=image_bytes,
        write_json=write_json,
        save_dataset=save_dataset,
        task_examples=task_examples,
        first_pixel=first_pixel,
        render_prompt=render_prompt,
    )
