"""Tests for the synthetic shapes dataset: determinism, geometry, answer correctness, balance, exports."""

from __future__ import annotations

import re
from collections import Counter

import numpy as np
import pytest
from PIL import Image

from vlbridge.data import shapes as S

SEEDS = range(300)


def _pixels(img: Image.Image) -> np.ndarray:
    return np.asarray(img.convert("RGB"))


def _find(objs: list[S.ShapeObject], desc: str, attr: str) -> list[S.ShapeObject]:
    """Objects matching 'circle' / 'small circle' (attr = shape) or 'red' / 'large red' (attr = color)."""
    words = desc.split()
    size = words[0] if len(words) == 2 else None
    return [o for o in objs if getattr(o, attr) == words[-1] and size in (None, o.size)]


def _by_name(objs: list[S.ShapeObject], name: str) -> S.ShapeObject:
    color, shape = name.split()
    (match,) = [o for o in objs if o.color == color and o.shape == shape]
    return match


def _expected(scene: S.ShapesScene, qa: S.QA, canvas: int) -> str:
    """Independently re-derive the answer of ``qa`` from the object list."""
    objs, q = scene.objects, qa.question
    if m := re.fullmatch(r"What color is the (\w+(?: \w+)?)\?", q):
        (o,) = _find(objs, m[1], "shape")
        return o.color
    if m := re.fullmatch(r"What shape is the (\w+(?: \w+)?) object\?", q):
        (o,) = _find(objs, m[1], "color")
        return o.shape
    if q == "How many objects are there?":
        return str(len(objs))
    if m := re.fullmatch(r"How many (\w+) are there\?", q):
        return str(sum(S.plural(o.shape) == m[1] for o in objs))
    if m := re.fullmatch(r"Is there a (\w+) (\w+)\?", q):
        return "yes" if any((o.color, o.shape) == (m[1], m[2]) for o in objs) else "no"
    if m := re.fullmatch(r"Is the (\w+ \w+) on the left or right side of the image\?", q):
        o = _by_name(objs, m[1])
        x0, _, x1, _ = o.bbox
        assert x1 <= canvas // 2 or x0 >= canvas // 2, "lone object straddles the centre"
        return "left" if x1 <= canvas // 2 else "right"
    if m := re.fullmatch(r"Is the (\w+ \w+) to the left or right of the (\w+ \w+)\?", q):
        a, b = _by_name(objs, m[1]), _by_name(objs, m[2])
        assert a.bbox[2] < b.bbox[0] or b.bbox[2] < a.bbox[0], "pair not clearly separated"
        return "left" if a.bbox[2] < b.bbox[0] else "right"
    raise AssertionError(f"unparsed question {q!r}")


@pytest.fixture(scope="module")
def base_test() -> list[S.ShapesScene]:
    return S.generate("base", "test", 2000)


def test_determinism() -> None:
    for name in S.VARIANTS:
        a, b = S.make_scene(name, 1234), S.make_scene(name, 1234)
        assert (a.objects, a.qa, a.caption) == (b.objects, b.qa, b.caption)
        assert np.array_equal(_pixels(a.image()), _pixels(b.image()))
    assert S.generate("base", "train", 5, seed=3)[4].qa == S.generate("base", "train", 5, seed=3)[4].qa


def test_different_seeds_differ() -> None:
    images = {_pixels(S.make_scene("base", s).image()).tobytes() for s in range(50)}
    assert len(images) == 50


def test_splits_have_disjoint_seeds() -> None:
    seen: dict[int, str] = {}
    for seed in range(3):
        for split in ("train", "val", "test"):
            for i in list(range(2000)) + [2**32 - 1]:
                key = S.scene_seed(split, i, seed)
                assert key not in seen, f"{split}/{i}/{seed} collides with {seen[key]}"
                seen[key] = split
    train = {s.seed for s in S.generate("base", "train", 100)}
    assert train.isdisjoint(s.seed for s in S.generate("base", "test", 100))
    with pytest.raises(ValueError):
        S.scene_seed("dev", 0)
    with pytest.raises(ValueError):
        S.scene_seed("train", 2**32)


@pytest.mark.parametrize("name", list(S.VARIANTS))
def test_geometry_and_counts(name: str) -> None:
    v = S.VARIANTS[name]
    counts = Counter()
    for seed in SEEDS if name != "hires" else range(100):
        objs = S.make_scene(name, seed).objects
        counts[len(objs)] += 1
        assert v.min_objects <= len(objs) <= v.max_objects
        assert len({(o.color, o.shape) for o in objs}) == len(objs)
        for i, o in enumerate(objs):
            x0, y0, x1, y1 = o.bbox
            assert 0 < x0 and 0 < y0 and x1 < v.canvas and y1 < v.canvas
            lo, hi = dict(v.sizes)[o.size]
            assert lo <= o.extent <= hi and o.shape in v.shapes and o.color in v.colors
            for p in objs[i + 1 :]:
                a, b = o.bbox, p.bbox
                apart_x = a[2] + v.gap <= b[0] or b[2] + v.gap <= a[0]
                assert apart_x or a[3] + v.gap <= b[1] or b[3] + v.gap <= a[1]
    assert set(counts) == set(range(v.min_objects, v.max_objects + 1))


@pytest.mark.parametrize("name", list(S.VARIANTS))
def test_answers_and_pixels_match_objects(name: str) -> None:
    v = S.VARIANTS[name]
    for seed in range(200 if name != "hires" else 40):
        scene = S.make_scene(name, seed)
        assert tuple(scene.qa) == S.QUESTION_TYPES
        for qtype, qa in scene.qa.items():
            assert qa.type == qtype
            assert qa.answer == _expected(scene, qa, v.canvas), qa
        px = _pixels(scene.image())
        assert px.shape == (v.canvas, v.canvas, 3)
        assert tuple(px[0, 0]) == v.background
        for o in scene.objects:
            assert tuple(px[o.y, o.x]) == S.PALETTE[o.color], (o, seed)


def test_caption_describes_objects_left_to_right() -> None:
    for seed in range(100):
        scene = S.make_scene("base", seed)
        descs = [f"{o.size} {o.color} {o.shape}" for o in scene.objects]
        positions = [scene.caption.find(d) for d in descs]
        assert all(p >= 0 for p in positions) and positions == sorted(positions), scene.caption
        assert scene.objects == sorted(scene.objects, key=lambda o: (o.x, o.y))


def test_balance_and_floor(base_test: list[S.ShapesScene]) -> None:
    base = S.VARIANTS["base"]
    assert len(base.shapes) >= 4 and len(base.colors) >= 5 and len(base.sizes) == 2
    assert (base.min_objects, base.max_objects) == (1, 3)
    assert len(S.QUESTION_TYPES) == 5
    for n in (2, 200, 2000):
        assert Counter(s.qa["exist"].answer for s in base_test[:n]) == {"yes": n // 2, "no": n // 2}
    left = sum(s.qa["position"].answer == "left" for s in base_test[:1000])
    assert 450 <= left <= 550
    ceilings = {"color": 0.35, "shape": 0.40, "count": 0.5, "exist": 0.5, "position": 0.6}
    for qtype, ceiling in ceilings.items():
        answer, freq = S.majority_baseline(base_test, qtype)
        assert freq <= ceiling, (qtype, answer, freq)
    assert S.majority_baseline(base_test, "exist")[1] == 0.5
    assert len({s.qa["color"].answer for s in base_test}) == len(base.colors)
    assert len({s.qa["shape"].answer for s in base_test}) == len(base.shapes)


def test_hires_objects_are_small_and_many_has_many() -> None:
    hires, many = S.VARIANTS["hires"], S.VARIANTS["many"]
    assert max(hi for _, (_, hi) in hires.sizes) / hires.canvas < 0.05
    assert many.min_objects >= 6 and many.canvas > S.VARIANTS["base"].canvas


def test_custom_variant() -> None:
    v = S.ShapesVariant(
        "mine",
        canvas=96,
        min_objects=2,
        max_objects=4,
        shapes=("cross", "hexagon", "circle"),
        colors=("orange", "cyan", "white"),
        background=(0, 0, 0),
        supersample=1,
    )
    scene = S.make_scene(v, 7)
    assert scene.variant == "mine" and scene.image().size == (96, 96)
    px = _pixels(scene.image())
    for o in scene.objects:
        assert tuple(px[o.y, o.x]) == S.PALETTE[o.color]
    with pytest.raises(ValueError):
        S.ShapesVariant("bad", canvas=64, min_objects=1, max_objects=3, shapes=("blob", "circle"))
    with pytest.raises(ValueError):
        S.make_scene("nope", 0)
