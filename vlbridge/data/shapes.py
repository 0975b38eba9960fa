"""Synthetic "shapes" VQA + captioning data.

vlbridge needs a tiny, fully controlled vision-language task to test the whole pipeline (visual
front-ends, connectors, token reducers, training, evaluation) on CPU in seconds, with answers that
provably depend on the image. Scenes are generated deterministically from an integer seed and rendered
lazily with PIL; ``shapes_samples.py`` turns them into sample records and on-disk exports.

Seeds: ``scene_seed(split, index, seed)`` packs ``(seed, split)`` into the high bits and ``index`` into
the low 32 bits, so train / val / test seed sets are disjoint by construction. The lowest two index bits
fix the target answer of the existence (bit 0: yes/no) and position (bit 1: left/right) questions, which
makes those answers exactly balanced over any split whose size is a multiple of 2 (resp. 4).
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace

from PIL import Image, ImageDraw

from ..errors import ConfigError

QUESTION_TYPES = ("color", "shape", "count", "exist", "position")
SPLITS = {"train": 0, "val": 1, "test": 2}

PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (230, 40, 40),
    "green": (40, 190, 60),
    "blue": (50, 100, 245),
    "yellow": (245, 220, 40),
    "purple": (160, 60, 215),
    "orange": (245, 140, 30),
    "cyan": (40, 210, 220),
    "white": (240, 240, 240),
}
BASE_SHAPES = ("circle", "square", "triangle", "diamond")
BASE_COLORS = ("red", "green", "blue", "yellow", "purple")
_PLURALS = {"cross": "crosses"}
_NUMBER_WORDS = (
    "zero",
    "one",
    "two",
    "three",
    "four",
    "five",
    "six",
    "seven",
    "eight",
    "nine",
    "ten",
    "eleven",
    "twelve",
)
_INDEX_BITS = 32
_PLACE_TRIES = 100
_SCENE_TRIES = 500
_HARD_NEGATIVE_P = 0.75

Box = tuple[int, int, int, int]


@dataclass(frozen=True)
class ShapesVariant:
    """Generation parameters; sizes are ``(name, (min_px, max_px))`` object extents (bounding-box side)."""

    name: str
    canvas: int
    min_objects: int
    max_objects: int
    shapes: tuple[str, ...] = BASE_SHAPES
    colors: tuple[str, ...] = BASE_COLORS
    sizes: tuple[tuple[str, tuple[int, int]], ...] = (("small", (10, 12)), ("large", (18, 22)))
    background: tuple[int, int, int] = (32, 32, 32)
    gap: int = 2  # minimum free pixels between two objects and between an object and the border
    supersample: int = 2  # draw at this factor, then box-downsample (anti-aliased edges)

    def __post_init__(self) -> None:
        unknown = [s for s in self.shapes if s not in _DRAWERS] + [c for c in self.colors if c not in PALETTE]
        if unknown:
            raise ValueError(f"unknown shapes/colors {unknown}; known: {sorted(_DRAWERS)}, {sorted(PALETTE)}")
        if not 1 <= self.min_objects <= self.max_objects <= len(self.shapes) * len(self.colors):
            raise ValueError("need 1 <= min_objects <= max_objects <= #shapes * #colors")
        if len(self.shapes) < 2 or len(self.colors) < 2 or not self.sizes:
            raise ValueError("need at least 2 shapes, 2 colors and 1 size")
        if max(hi for _, (_, hi) in self.sizes) + 2 * self.gap > self.canvas // 2:
            raise ValueError("objects too large for the canvas")

    @property
    def size_names(self) -> tuple[str, ...]:
        return tuple(name for name, _ in self.sizes)


@dataclass(frozen=True)
class ShapeObject:
    """One object; ``(x, y)`` is the centre pixel, ``extent`` the side of its square bounding box."""

    shape: str
    color: str
    size: str
    x: int
    y: int
    extent: int

    @property
    def bbox(self) -> Box:
        """``(x0, y0, x1, y1)`` with exclusive ``x1, y1``."""
        x0, y0 = self.x - self.extent // 2, self.y - self.extent // 2
        return x0, y0, x0 + self.extent, y0 + self.extent

    @property
    def name(self) -> str:
        return f"{self.color} {self.shape}"


@dataclass(frozen=True)
class QA:
    type: str
    question: str
    answer: str


@dataclass
class ShapesScene:
    """A generated scene; objects are sorted left to right, the image is rendered on demand."""

    seed: int
    variant: str
    objects: list[ShapeObject]
    caption: str
    qa: dict[str, QA]
    spec: ShapesVariant = field(repr=False)

    def image(self) -> Image.Image:
        return render(self.spec, self.objects)

    @property
    def id(self) -> str:
        return f"shapes-{self.variant}-{self.seed}"


# ----------------------------------------------------------------------------------------- rendering


def _center(b: Sequence[float]) -> tuple[float, float]:
    return (b[0] + b[2]) / 2, (b[1] + b[3]) / 2


def _draw_circle(d: ImageDraw.ImageDraw, b: Box, fill: tuple[int, int, int]) -> None:
    d.ellipse(b, fill=fill)


def _draw_square(d: ImageDraw.ImageDraw, b: Box, fill: tuple[int, int, int]) -> None:
    d.rectangle(b, fill=fill)


def _draw_triangle(d: ImageDraw.ImageDraw, b: Box, fill: tuple[int, int, int]) -> None:
    cx, _ = _center(b)
    d.polygon([(cx, b[1]), (b[2], b[3]), (b[0], b[3])], fill=fill)


def _draw_diamond(d: ImageDraw.ImageDraw, b: Box, fill: tuple[int, int, int]) -> None:
    cx, cy = _center(b)
    d.polygon([(cx, b[1]), (b[2], cy), (cx, b[3]), (b[0], cy)], fill=fill)


def _draw_cross(d: ImageDraw.ImageDraw, b: Box, fill: tuple[int, int, int]) -> None:
    cx, cy = _center(b)
    t = (b[2] - b[0]) / 6
    d.rectangle((b[0], cy - t, b[2], cy + t), fill=fill)
    d.rectangle((cx - t, b[1], cx + t, b[3]), fill=fill)


def _draw_hexagon(d: ImageDraw.ImageDraw, b: Box, fill: tuple[int, int, int]) -> None:
    _, cy = _center(b)
    q = (b[2] - b[0]) / 4
    d.polygon(
        [(b[0] + q, b[1]), (b[2] - q, b[1]), (b[2], cy), (b[2] - q, b[3]), (b[0] + q, b[3]), (b[0], cy)],
        fill=fill,
    )


_DRAWERS: dict[str, Callable[[ImageDraw.ImageDraw, Box, tuple[int, int, int]], None]] = {
    "circle": _draw_circle,
    "square": _draw_square,
    "triangle": _draw_triangle,
    "diamond": _draw_diamond,
    "cross": _draw_cross,
    "hexagon": _draw_hexagon,
}


def render(variant: ShapesVariant, objects: Iterable[ShapeObject]) -> Image.Image:
    """Render objects onto a ``canvas x canvas`` RGB image (deterministic)."""
    s = variant.supersample
    img = Image.new("RGB", (variant.canvas * s, variant.canvas * s), variant.background)
    draw = ImageDraw.Draw(img)
    for o in objects:
        x0, y0, x1, y1 = o.bbox
        _DRAWERS[o.shape](draw, (x0 * s, y0 * s, x1 * s - 1, y1 * s - 1), PALETTE[o.color])
    if s > 1:
        img = img.resize((variant.canvas, variant.canvas), Image.Resampling.BOX)
    return img


VARIANTS: dict[str, ShapesVariant] = {
    "base": ShapesVariant("base", canvas=64, min_objects=1, max_objects=3),
    "hires": ShapesVariant(
        "hires",
        canvas=384,
        min_objects=1,
        max_objects=3,
        sizes=(("small", (8, 10)), ("large", (13, 15))),
        gap=4,
    ),
    "many": ShapesVariant(
        "many", canvas=160, min_objects=6, max_objects=12, sizes=(("small", (9, 11)), ("large", (15, 18)))
    ),
}


# ----------------------------------------------------------------------------------------- seeds


def scene_seed(split: str, index: int, seed: int = 0) -> int:
    """Seed of scene ``index`` of ``split``: ``((seed * 3 + split_id) << 32) | index``.

    Distinct ``(seed, split)`` pairs own disjoint seed ranges, so splits never share a scene seed.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {tuple(SPLITS)}, got {split!r}")
    if not 0 <= index < 1 << _INDEX_BITS or seed < 0:
        raise ValueError("need 0 <= index < 2**32 and seed >= 0")
    return ((seed * len(SPLITS) + SPLITS[split]) << _INDEX_BITS) | index


def resolve_variant(variant: str | ShapesVariant, max_objects: int | None = None) -> ShapesVariant:
    """The variant by name; `max_objects` caps its scenes (below its minimum too: 1 gives lone objects)."""
    if not isinstance(variant, ShapesVariant):
        if variant not in VARIANTS:
            raise ValueError(f"unknown shapes variant {variant!r}; known: {tuple(VARIANTS)}")
        variant = VARIANTS[variant]
    if max_objects is None:
        return variant
    if not 1 <= max_objects <= variant.max_objects:
        raise ConfigError(
            f"shapes max_objects={max_objects} is outside the {variant.name!r} variant's range "
            f"[1, {variant.max_objects}]"
        )
    return replace(variant, min_objects=min(variant.min_objects, max_objects), max_objects=max_objects)


# ----------------------------------------------------------------------------------------- layout


def _separated(a: Box, b: Box, gap: int) -> bool:
    return a[2] + gap <= b[0] or b[2] + gap <= a[0] or a[3] + gap <= b[1] or b[3] + gap <= a[1]


def _x_range(v: ShapesVariant, extent: int, side: str | None) -> tuple[int, int]:
    """Allowed range of the box's left edge; ``side`` keeps the whole box in one canvas half."""
    lo, hi = v.gap, v.canvas - v.gap - extent
    if side == "left":
        hi = v.canvas // 2 - v.gap - extent
    elif side == "right":
        lo = (v.canvas + 1) // 2 + v.gap
    return lo, hi


def _place_objects(rng: random.Random, v: ShapesVariant, n: int, side: str) -> list[ShapeObject] | None:
    """``n`` non-overlapping objects with distinct (color, shape); a lone object lies fully on ``side``."""
    combos = rng.sample([(s, c) for s in v.shapes for c in v.colors], n)
    sizes = [rng.choice(v.sizes) for _ in range(n)]
    items = sorted(
        ((rng.randint(*r), s, c, name) for (s, c), (name, r) in zip(combos, sizes, strict=True)), reverse=True
    )
    placed: list[ShapeObject] = []
    for extent, shape, color, size in items:  # largest first packs best
        xlo, xhi = _x_range(v, extent, side if n == 1 else None)
        for _ in range(_PLACE_TRIES):
            x0, y0 = rng.randint(xlo, xhi), rng.randint(v.gap, v.canvas - v.gap - extent)
            box = (x0, y0, x0 + extent, y0 + extent)
            if all(_separated(box, p.bbox, v.gap) for p in placed):
                break
        else:
            return None
        placed.append(ShapeObject(shape, color, size, x0 + extent // 2, y0 + extent // 2, extent))
    return sorted(placed, key=lambda o: (o.x, o.y))


# ----------------------------------------------------------------------------------------- questions


def _unique(objs: Sequence[ShapeObject], o: ShapeObject, attrs: tuple[str, ...]) -> bool:
    return sum(all(getattr(p, a) == getattr(o, a) for a in attrs) for p in objs) == 1


def _reference(objs: Sequence[ShapeObject], o: ShapeObject, attr: str) -> str | None:
    """Shortest description of ``o`` by ``attr`` (optionally with size) that is unique in the scene."""
    if _unique(objs, o, (attr,)):
        return getattr(o, attr)
    if _unique(objs, o, ("size", attr)):
        return f"{o.size} {getattr(o, attr)}"
    return None


def _color_qa(rng: random.Random, objs: Sequence[ShapeObject]) -> QA | None:
    cands = [(ref, o) for o in objs if (ref := _reference(objs, o, "shape"))]
    if not cands:
        return None
    ref, o = rng.choice(cands)
    return QA("color", f"What color is the {ref}?", o.color)


def _shape_qa(rng: random.Random, objs: Sequence[ShapeObject]) -> QA | None:
    cands = [(ref, o) for o in objs if (ref := _reference(objs, o, "color"))]
    if not cands:
        return None
    ref, o = rng.choice(cands)
    return QA("shape", f"What shape is the {ref} object?", o.shape)


def plural(shape: str) -> str:
    return _PLURALS.get(shape, shape + "s")


def _count_qa(rng: random.Random, v: ShapesVariant, objs: Sequence[ShapeObject]) -> QA:
    """Total or per-shape count; the answer is drawn uniformly from the distinct answers available."""
    cands = [("How many objects are there?", len(objs))]
    cands += [(f"How many {plural(s)} are there?", sum(o.shape == s for o in objs)) for s in v.shapes]
    answer = rng.choice(sorted({a for _, a in cands}))
    question = rng.choice([q for q, a in cands if a == answer])
    return QA("count", question, str(answer))


def _exist_qa(rng: random.Random, v: ShapesVariant, objs: Sequence[ShapeObject], yes: bool) -> QA | None:
    """Yes: a present (color, shape); no: an absent one, preferably sharing color or shape with an object."""
    if yes:
        o = rng.choice(objs)
        return QA("exist", f"Is there a {o.color} {o.shape}?", "yes")
    present = {(o.color, o.shape) for o in objs}
    absent = [(c, s) for s in v.shapes for c in v.colors if (c, s) not in present]
    if not absent:
        return None
    hard = [(c, s) for c, s in absent if any(c == pc or s == ps for pc, ps in present)]
    color, shape = rng.choice(hard if hard and rng.random() < _HARD_NEGATIVE_P else absent)
    return QA("exist", f"Is there a {color} {shape}?", "no")


def _position_qa(rng: random.Random, v: ShapesVariant, objs: Sequence[ShapeObject], side: str) -> QA | None:
    """Lone object: which canvas half; otherwise A left/right of B for a pair with no horizontal overlap."""
    if len(objs) == 1:
        o = objs[0]
        actual = "left" if o.bbox[2] <= v.canvas // 2 else "right"
        return QA("position", f"Is the {o.name} on the left or right side of the image?", actual)
    pairs = [(a, b) for a in objs for b in objs if a.bbox[2] < b.bbox[0]]
    if not pairs:
        return None
    left, right = rng.choice(pairs)
    a, b = (left, right) if side == "left" else (right, left)
    return QA("position", f"Is the {a.name} to the left or right of the {b.name}?", side)


def _make_qa(
    rng: random.Random, v: ShapesVariant, objs: list[ShapeObject], yes: bool, side: str
) -> dict[str, QA] | None:
    qas = (
        _color_qa(rng, objs),
        _shape_qa(rng, objs),
        _count_qa(rng, v, objs),
        _exist_qa(rng, v, objs, yes),
        _position_qa(rng, v, objs, side),
    )
    return None if any(q is None for q in qas) else {q.type: q for q in qas if q}


def _caption(v: ShapesVariant, objs: Sequence[ShapeObject]) -> str:
    descs = [f"a {o.size} {o.color} {o.shape}" for o in objs]
    if len(objs) == 1:
        side = "left" if objs[0].bbox[2] <= v.canvas // 2 else "right"
        return f"A {objs[0].size} {objs[0].name} on the {side} side."
    if len(objs) == 2:
        a, b = objs
        rel = "to the left of" if a.bbox[2] < b.bbox[0] else ("above" if a.y < b.y else "below")
        return f"A{descs[0][1:]} {rel} {descs[1]}."
    n = _NUMBER_WORDS[len(objs)] if len(objs) < len(_NUMBER_WORDS) else str(len(objs))
    return f"{n.capitalize()} objects, from left to right: {', '.join(descs[:-1])} and {descs[-1]}."


# ----------------------------------------------------------------------------------------- scenes


def make_scene(variant: str | ShapesVariant, seed: int) -> ShapesScene:
    """Deterministic scene for ``seed``.

    The object count is drawn once (uniform in the variant's range); layouts for which some question type
    is impossible are redrawn with the same count, so the count distribution stays uniform.
    """
    v = resolve_variant(variant)
    rng = random.Random(seed)
    yes, side = seed % 2 == 0, ("left", "right")[(seed >> 1) % 2]
    n = rng.randint(v.min_objects, v.max_objects)
    for _ in range(_SCENE_TRIES):
        objs = _place_objects(rng, v, n, side)
        qa = _make_qa(rng, v, objs, yes, side) if objs else None
        if objs and qa:
            return ShapesScene(seed, v.name, objs, _caption(v, objs), qa, v)
    raise RuntimeError(f"variant {v.name!r}: no valid scene for seed {seed} in {_SCENE_TRIES} tries")


def generate(variant: str | ShapesVariant, split: str, n: int, seed: int = 0) -> list[ShapesScene]:
    """``n`` scenes of ``split`` (train / val / test use disjoint seeds, see :func:`scene_seed`)."""
    v = resolve_variant(variant)
    return [make_scene(v, scene_seed(split, i, seed)) for i in range(n)]


def majority_baseline(scenes: Sequence[ShapesScene], question_type: str) -> tuple[str, float]:
    """Most common answer of ``question_type`` and its frequency (the accuracy of always guessing it)."""
    if not scenes:
        raise ValueError("no scenes")
    answer, count = Counter(s.qa[question_type].answer for s in scenes).most_common(1)[0]
    return answer, count / len(scenes)
