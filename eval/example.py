"""The record every eval loader produces and every metric scores: one question (or caption request) on images.

Loaders turn each dataset's own format into `Example`s; the task's prompt template reads `fields`, the
metric reads `references` (and `fields` where it needs more, e.g. the choices of a multiple-choice item).
Images stay lazy (paths, bytes, datasets image dicts, or zero-argument callables such as a shapes scene's
renderer) until a batch is built.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from PIL import Image

from vlbridge.data.formats import load_image


@dataclass
class Example:
    id: str
    images: list[Any]
    fields: dict[str, Any]
    references: list[str]
    group: str | None = None  # breakdown key: question/answer type, POPE category, NoCaps domain, ...
    meta: dict[str, Any] = field(default_factory=dict)

    def load_images(self) -> list[Image.Image]:
        return [resolve_image(ref, self.id) for ref in self.images]


def resolve_image(ref: Any, sample_id: str = "?") -> Image.Image:
    """A PIL RGB image from anything `load_image` takes, or from a callable that renders one."""
    if callable(ref) and not isinstance(ref, Image.Image):
        ref = ref()
    return load_image(ref, sample_id)


class LazyExamples(Sequence[Example]):
    """Rows converted to examples on access, so a `--limit 50` run never converts a whole dataset."""

    def __init__(self, rows: Sequence[Any], convert: Callable[[Any, int], Example]) -> None:
        self.rows, self.convert = rows, convert

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        if index < 0:
            index += len(self)
        return self.convert(self.rows[index], index)
