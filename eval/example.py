"""The record every eval loader produces and every metric scores: one question (or caption request) on images.

Loaders turn each dataset's own format into `Example`s; the task's prompt template reads `fields`, the
metric reads `references` (and `fields` where it needs more, e.g. the choices of a multiple-choice item).
Images stay lazy (paths, bytes, datasets image dicts, or zero-argument callables such as a shapes scene's
renderer) until a batch is built.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from PIL import Image

from vlbridge.data.io import load_image


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
