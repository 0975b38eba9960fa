"""Sample records and exports of shapes scenes: lazy rendering, question mixes, round trips through disk."""

from __future__ import annotations

import json
from collections import Counter

import datasets
import numpy as np
import pytest
from PIL import Image

from vlbridge.data import shapes as S
from vlbridge.data import shapes_samples as SS


def _pixels(img: Image.Image) -> np.ndarray:
    return np.asarray(img.convert("RGB"))


def test_to_samples_single_and_multi_turn() -> None:
    scenes = S.generate("base", "val", 25)
    singles = SS.to_samples(scenes)
    assert len(singles) == 25
    assert Counter(s["meta"]["types"][0] for s in singles) == {t: 5 for t in S.QUESTION_TYPES}
    multi = SS.to_samples(scenes, questions_per_image=3, caption=True, rng_seed=1)
    for sample, scene in zip(multi, scenes, strict=True):
        msgs, types = sample["messages"], sample["meta"]["types"]
        assert len(msgs) == 8 and len(set(types)) == 4 and "caption" in types
        assert [m["role"] for m in msgs] == ["user", "assistant"] * 4
        assert msgs[0]["content"].startswith("<image>\n")
        assert sum(m["content"].count("<image>") for m in msgs) == 1
        for t, answer in zip(types, msgs[1::2], strict=True):
            assert answer["content"] == (scene.caption if t == "caption" else scene.qa[t].answer)
        assert sample["images"][0].size == (64, 64)
    orders = {tuple(s["meta"]["types"]) for s in multi}
    assert len(orders) > 5
    assert SS.to_samples(scenes, 3, caption=True, rng_seed=1)[3]["messages"] == multi[3]["messages"]
    everything = SS.to_samples(scenes[:2], questions_per_image=None)
    assert sorted(everything[0]["meta"]["types"]) == sorted(S.QUESTION_TYPES)
    captions = SS.to_samples(scenes[:2], questions_per_image=0, caption=True)
    assert captions[0]["messages"][1]["content"] == scenes[0].caption
    with pytest.raises(ValueError):
        SS.to_samples(scenes, questions_per_image=0)


def test_repeated_types_weight_the_mix() -> None:
    scenes = S.generate("base", "val", 30)
    mix = ("position", "position", "shape")
    samples = SS.to_samples(scenes, types=mix)
    assert Counter(s["meta"]["types"][0] for s in samples) == {"position": 20, "shape": 10}
    with pytest.raises(ValueError, match="weighted mix"):
        SS.to_samples(scenes, questions_per_image=2, types=mix)


def test_export_llava_round_trip(tmp_path) -> None:
    scenes = S.generate("base", "test", 6)
    path = SS.export_llava(scenes, tmp_path / "llava", questions_per_image=2)
    records = json.loads(path.read_text())
    assert len(records) == 6
    for rec, scene in zip(records, scenes, strict=True):
        conv = rec["conversations"]
        assert [c["from"] for c in conv] == ["human", "gpt", "human", "gpt"]
        assert conv[0]["value"].startswith("<image>\n") and "<image>" not in conv[2]["value"]
        with Image.open(path.parent / rec["image"]) as img:
            assert np.array_equal(_pixels(img), _pixels(scene.image()))


def test_export_datasets_round_trip(tmp_path) -> None:
    scenes = S.generate("many", "train", 4)
    out = SS.export_datasets(scenes, tmp_path / "hf", caption=True, questions_per_image=1)
    ds = datasets.load_from_disk(str(out))
    assert len(ds) == 4 and set(ds.column_names) == {"id", "image", "messages"}
    assert isinstance(ds.features["image"], datasets.Image)
    for row, scene in zip(ds, scenes, strict=True):
        assert row["id"] == scene.id
        assert np.array_equal(_pixels(row["image"]), _pixels(scene.image()))
        assert row["messages"][0]["role"] == "user" and row["messages"][0]["content"].startswith("<image>\n")
        assert len(row["messages"]) == 4


def test_samples_render_images_only_when_read(monkeypatch) -> None:
    scenes = S.generate("hires", "val", 20)
    rendered = []
    real_render = S.render
    monkeypatch.setattr(S, "render", lambda *a: rendered.append(1) or real_render(*a))
    samples = SS.ShapesSamples(scenes, image_first=False)
    assert [samples.messages(i) for i in range(len(samples))] and not rendered
    sample = samples[3]
    assert len(rendered) == 1 and sample["images"][0].size == (384, 384)
    assert sample["messages"] == samples.messages(3)
    assert sample["messages"][0]["content"].endswith("\n<image>")
    assert SS.ShapesSamples(scenes).messages(3)[0]["content"].startswith("<image>\n")
