"""Sample records and on-disk exports of shapes scenes (`shapes.py` makes and renders the scenes).

Records follow vlbridge's common sample format, built on access so that images render only when read;
`export_llava` and `export_datasets` write the formats real loaders consume (LLaVA JSON + PNG files, a
Hugging Face `datasets` directory), so tests exercise those loaders on shapes data.
"""

from __future__ import annotations

import io
import json
import random
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

from ..config import IMAGE_MARKER
from .shapes import QUESTION_TYPES, ShapesScene

CAPTION_PROMPTS = ("Describe the image.", "Write a short caption for the image.", "What is in the picture?")


def _turn_types(rng: random.Random, n_scenes: int, types: tuple[str, ...], k: int) -> Iterator[list[str]]:
    """k distinct types per scene in random order; k == 1 deals types in shuffled rounds (balanced, or
    weighted when a type is listed several times)."""
    deck: list[str] = []
    for _ in range(n_scenes):
        if k != 1:
            yield rng.sample(types, k)
            continue
        if not deck:
            deck = rng.sample(types, len(types))
        yield [deck.pop()]


class ShapesSamples(Sequence[dict[str, Any]]):
    """Sample records of a list of scenes, built on access, so an image is rendered only when its sample
    is read (100k high-resolution scenes would not fit in memory as images).

    ``{"id", "images": [PIL.Image], "messages": [{"role", "content"}, ...], "meta": {"types", ...}}``; only
    the first user message carries the ``<image>`` placeholder, before the question or (``image_first=False``)
    after it. ``questions_per_image=None`` asks every type; ``caption=True`` adds a caption turn at a random
    position (``questions_per_image=0, caption=True`` gives caption-only samples). Which questions a scene
    gets is drawn once, in order, from ``rng_seed``.
    """

    def __init__(
        self,
        scenes: Sequence[ShapesScene],
        questions_per_image: int | None = 1,
        types: Iterable[str] | None = None,
        caption: bool = False,
        rng_seed: int = 0,
        image_first: bool = True,
    ) -> None:
        types = tuple(types) if types is not None else QUESTION_TYPES
        if unknown := set(types) - set(QUESTION_TYPES):
            raise ValueError(f"unknown question types {sorted(unknown)}")
        k = len(types) if questions_per_image is None else questions_per_image
        if len(set(types)) < len(types) and k != 1:
            raise ValueError("repeated question types (a weighted mix) need questions_per_image=1")
        if not 0 <= k <= len(types) or k + caption == 0:
            raise ValueError(f"questions_per_image must be in [0, {len(types)}] (and >0 unless caption=True)")
        self.scenes, self.image_first = scenes, image_first
        rng = random.Random(rng_seed)
        self.turns: list[list[tuple[str, str, str]]] = []  # per scene: (question, answer, type)
        for scene, chosen in zip(scenes, _turn_types(rng, len(scenes), types, k), strict=True):
            turns = [(scene.qa[t].question, scene.qa[t].answer, t) for t in chosen]
            if caption:
                prompt = rng.choice(CAPTION_PROMPTS)
                turns.insert(rng.randint(0, len(turns)), (prompt, scene.caption, "caption"))
            self.turns.append(turns)

    def __len__(self) -> int:
        return len(self.scenes)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        scene, turns = self.scenes[index], self.turns[index]
        meta = {
            "types": [t for *_, t in turns],
            "answers": [a for _, a, _ in turns],
            "seed": scene.seed,
            "variant": scene.variant,
            "source": "shapes",
        }
        return {"id": scene.id, "images": [scene.image()], "messages": self.messages(index), "meta": meta}

    def messages(self, index: int) -> list[dict[str, str]]:
        """The conversation of sample `index` without rendering its image (e.g. for tokenizer training)."""
        messages: list[dict[str, str]] = []
        for i, (q, a, _) in enumerate(self.turns[index]):
            if i == 0:
                q = f"{IMAGE_MARKER}\n{q}" if self.image_first else f"{q}\n{IMAGE_MARKER}"
            messages += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
        return messages


def to_samples(scenes: Sequence[ShapesScene], *args: Any, **kwargs: Any) -> list[dict[str, Any]]:
    """Every sample of :class:`ShapesSamples`, rendered now (small sets, tests, exports)."""
    return list(ShapesSamples(scenes, *args, **kwargs))


# ----------------------------------------------------------------------------------------- export

_LLAVA_ROLES = {"user": "human", "assistant": "gpt"}


def export_llava(scenes: Sequence[ShapesScene], out_dir: str | Path, **to_samples_kwargs: Any) -> Path:
    """Write ``out_dir/images/<id>.png`` and LLaVA-format ``out_dir/data.json``; returns the JSON path."""
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    records = []
    for s in ShapesSamples(scenes, **to_samples_kwargs):
        rel = f"images/{s['id']}.png"
        s["images"][0].save(out / rel)
        conv = [{"from": _LLAVA_ROLES[m["role"]], "value": m["content"]} for m in s["messages"]]
        records.append({"id": s["id"], "image": rel, "conversations": conv})
    path = out / "data.json"
    path.write_text(json.dumps(records, indent=1))
    return path


def export_datasets(scenes: Sequence[ShapesScene], out_dir: str | Path, **to_samples_kwargs: Any) -> Path:
    """``save_to_disk`` a ``datasets.Dataset`` with columns ``id``, ``image`` (``Image()``), ``messages``."""
    import datasets

    rows: dict[str, list] = {"id": [], "image": [], "messages": []}
    for s in ShapesSamples(scenes, **to_samples_kwargs):
        buf = io.BytesIO()
        s["images"][0].save(buf, format="PNG")
        rows["id"].append(s["id"])
        rows["image"].append({"bytes": buf.getvalue(), "path": None})
        rows["messages"].append(s["messages"])
    message = {"role": datasets.Value("string"), "content": datasets.Value("string")}
    features = datasets.Features(
        {"id": datasets.Value("string"), "image": datasets.Image(), "messages": datasets.List(message)}
    )
    datasets.Dataset.from_dict(rows, features=features).save_to_disk(str(out_dir))
    return Path(out_dir)
