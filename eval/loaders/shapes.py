"""Shapes tasks: the synthetic scenes generated locally (always available, any variant)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

from pydantic import Field

from vlbridge.data import shapes as shapes_data
from vlbridge.data.io import LazySamples
from vlbridge.data.shapes_samples import ShapesSamples

from ..example import Example
from .base import LOADERS, SourceConfig


class ShapesTaskSource(SourceConfig):
    """`kind: vqa` asks one question per scene, dealt exactly as a recipe's shapes eval split deals them
    (same seed, same order), so scores compare with the training report; `kind: caption` asks for the
    scene's caption."""

    type: str = "shapes"
    kind: Literal["vqa", "caption"] = "vqa"
    variant: str = "base"
    max_objects: int | None = None  # e.g. 1: the variant's canvas with lone objects
    split: Literal["train", "val", "test"] = "test"
    n: int = Field(default=1000, ge=1)
    seed: int = 0
    types: list[str] | None = None


@LOADERS.register("shapes", config=ShapesTaskSource)
def load_shapes(cfg: ShapesTaskSource) -> Sequence[Example]:
    variant = shapes_data.resolve_variant(cfg.variant, cfg.max_objects)
    scenes = shapes_data.generate(variant, cfg.split, cfg.n, seed=cfg.seed)
    if cfg.kind == "caption":
        return LazySamples(
            scenes,
            lambda scene, _: Example(
                scene.id, [scene.image], {}, [scene.caption], None, {"seed": scene.seed}
            ),
        )
    samples = ShapesSamples(scenes, questions_per_image=1, types=cfg.types, rng_seed=cfg.seed)

    def convert(scene, index: int) -> Example:
        question, answer, kind = samples.turns[index][0]
        return Example(scene.id, [scene.image], {"question": question}, [answer], kind, {"seed": scene.seed})

    return LazySamples(scenes, convert)
