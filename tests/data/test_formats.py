"""Data formats on small fixtures in their real on-disk formats: each format yields the same samples."""

from __future__ import annotations

import base64
import io
import json

import numpy as np
import pytest
from PIL import Image

from vlbridge.data import shapes, shapes_samples
from vlbridge.data.formats import (
    HFDatasetConfig,
    LlavaJsonConfig,
    MessagesConfig,
    load_source,
    normalise_messages,
)
from vlbridge.data.io import load_image
from vlbridge.errors import ConfigError, DataError
from vlbridge.registry import DATA_FORMATS

# The reference content: (id, image colour or None, messages with `<image>` markers).
SAMPLES = [
    (
        "s0",
        (255, 0, 0),
        [
            {"role": "user", "content": "<image>\nWhat color is the circle?"},
            {"role": "assistant", "content": "red"},
            {"role": "user", "content": "And its shape?"},
            {"role": "assistant", "content": "circle"},
        ],
    ),
    (
        "s1",
        (0, 0, 255),
        [
            {"role": "system", "content": "Answer in one word."},
            {"role": "user", "content": "Look:\n<image>\nWhat color?"},
            {"role": "assistant", "content": "blue"},
        ],
    ),
    (
        "s2",
        None,
        [
            {"role": "user", "content": "Say hi."},
            {"role": "assistant", "content": "hi"},
        ],
    ),
]
LLAVA_ROLES = {"user": "human", "assistant": "gpt", "system": "system"}


def png_bytes(color, size=(20, 12)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return buf.getvalue()


def data_url(color) -> str:
    return "data:image/png;base64," + base64.b64encode(png_bytes(color)).decode()


def write_images(folder) -> None:
    (folder / "images").mkdir(parents=True, exist_ok=True)
    for sample_id, color, _ in SAMPLES:
        if color is not None:
            (folder / "images" / f"{sample_id}.png").write_bytes(png_bytes(color))


def write_llava(folder) -> str:
    write_images(folder)
    records = []
    for sample_id, color, messages in SAMPLES:
        conv = [{"from": LLAVA_ROLES[m["role"]], "value": m["content"]} for m in messages]
        records.append(
            {"id": sample_id, "conversations": conv} | ({"image": f"images/{sample_id}.png"} if color else {})
        )
    path = folder / "data.json"
    path.write_text(json.dumps(records, indent=2))
    return str(path)


def to_parts(content: str, image_ref) -> list[dict] | str:
    """`<image>`-marked text -> OpenAI content parts (text parts are joined with newlines on reading)."""
    if "<image>" not in content:
        return content
    parts = []
    for piece in content.split("\n"):  # markers sit on their own line in SAMPLES
        if piece == "<image>":
            parts.append({"type": "image_url", "image_url": {"url": image_ref}})
        else:
            parts.append({"type": "text", "text": piece})
    return parts


def write_messages(folder, style: str, jsonl: bool) -> str:
    """OpenAI-style records; style: 'parts_path' | 'parts_data_url' | 'string' (top-level `images`)."""
    write_images(folder)
    records = []
    for sample_id, color, messages in SAMPLES:
        record: dict = {"id": sample_id}
        if style == "string":
            record["messages"] = messages
            if color:
                record["images"] = [f"images/{sample_id}.png"]
        else:
            ref = f"images/{sample_id}.png" if style == "parts_path" else data_url(color) if color else None
            record["messages"] = [
                {"role": m["role"], "content": to_parts(m["content"], ref)} for m in messages
            ]
        records.append(record)
    path = folder / ("data.jsonl" if jsonl else "data.json")
    path.write_text("\n".join(json.dumps(r) for r in records) if jsonl else json.dumps(records))
    return str(path)


def write_hf(folder, parts: bool = False) -> str:
    import datasets

    rows: dict[str, list] = {"id": [], "image": [], "messages": []}
    for sample_id, color, messages in SAMPLES:
        rows["id"].append(sample_id)
        rows["image"].append(Image.new("RGB", (20, 12), color) if color else None)
        if parts:  # content-part lists, as in many hub datasets (structs get None for absent keys)
            ref = data_url(color) if color else None
            messages = [{"role": m["role"], "content": to_parts(m["content"], ref)} for m in messages]
            messages = [
                m
                if isinstance(m["content"], list)
                else m | {"content": [{"type": "text", "text": m["content"]}]}
                for m in messages
            ]
            rows["image"][-1] = None  # the images come from the parts
        rows["messages"].append(messages)
    ds = datasets.Dataset.from_dict(rows)
    ds = ds.cast_column("image", datasets.Image())
    ds.save_to_disk(str(folder))
    return str(folder)


def assert_matches_reference(samples) -> None:
    assert [s["id"] for s in samples] == [sample_id for sample_id, _, _ in SAMPLES]
    for sample, (sample_id, color, messages) in zip(samples, SAMPLES, strict=True):
        assert sample["messages"] == messages, sample_id
        assert len(sample["images"]) == (1 if color else 0)
        for ref in sample["images"]:
            img = load_image(ref, sample_id)
            assert img.mode == "RGB" and img.size == (20, 12)
            assert img.getpixel((3, 3)) == color


@pytest.fixture
def offline_datasets(monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return pytest.importorskip("datasets")


def test_llava_json(tmp_path) -> None:
    assert_matches_reference(load_source(LlavaJsonConfig(path=write_llava(tmp_path))))


def test_llava_json_image_folder(tmp_path) -> None:
    path = write_llava(tmp_path / "json")
    (tmp_path / "json" / "images").rename(tmp_path / "elsewhere")
    samples = load_source(LlavaJsonConfig(path=path, image_folder=str(tmp_path)))
    assert samples[0]["images"] == [str(tmp_path / "images" / "s0.png")]
    with pytest.raises(DataError, match="s0.png"):
        load_image(samples[0]["images"][0], "s0")
    (tmp_path / "elsewhere").rename(tmp_path / "images")
    assert_matches_reference(samples)


@pytest.mark.parametrize("style", ["parts_path", "parts_data_url", "string"])
@pytest.mark.parametrize("jsonl", [False, True], ids=["json", "jsonl"])
def test_messages(tmp_path, style, jsonl) -> None:
    samples = load_source(MessagesConfig(path=write_messages(tmp_path, style, jsonl)))
    assert_matches_reference(samples)
    if style == "parts_data_url":
        assert samples[0]["images"][0].startswith("data:image/png;base64,")


def test_hf_datasets(tmp_path, offline_datasets) -> None:
    assert_matches_reference(load_source(HFDatasetConfig(path=write_hf(tmp_path / "hf"))))


def test_hf_datasets_with_content_parts(tmp_path, offline_datasets) -> None:
    assert_matches_reference(load_source(HFDatasetConfig(path=write_hf(tmp_path / "hf", parts=True))))


def test_hf_datasets_image_list_column_and_dict(tmp_path, offline_datasets) -> None:
    datasets = offline_datasets
    rows = {
        "images": [[Image.new("RGB", (8, 8), (255, 0, 0)), Image.new("RGB", (8, 8), (0, 255, 0))]],
        "messages": [
            [
                {
                    "role": "user",
                    "content": [{"type": "image"}, {"type": "image"}, {"type": "text", "text": "Colors?"}],
                },
                {"role": "assistant", "content": [{"type": "text", "text": "red green"}]},
            ]
        ],
    }
    features = datasets.Features(
        {
            "images": datasets.List(datasets.Image()),
            "messages": datasets.List(
                {
                    "role": datasets.Value("string"),
                    "content": datasets.List(
                        {"type": datasets.Value("string"), "text": datasets.Value("string")}
                    ),
                }
            ),
        }
    )
    dd = datasets.DatasetDict({"train": datasets.Dataset.from_dict(rows, features=features)})
    dd.save_to_disk(str(tmp_path / "dd"))
    (sample,) = load_source(HFDatasetConfig(path=str(tmp_path / "dd"), image_column="images"))
    assert sample["id"] == "0"
    assert sample["messages"] == [
        {"role": "user", "content": "<image>\n<image>\nColors?"},
        {"role": "assistant", "content": "red green"},
    ]
    assert [load_image(im).getpixel((0, 0)) for im in sample["images"]] == [(255, 0, 0), (0, 255, 0)]
    with pytest.raises(DataError, match="no split 'validation'; it has train"):
        load_source(HFDatasetConfig(path=str(tmp_path / "dd"), split="validation"))
    with pytest.raises(DataError, match="no column 'conversations'"):
        load_source(HFDatasetConfig(path=str(tmp_path / "dd"), messages_column="conversations"))


def test_shapes_exports_load_back(tmp_path, offline_datasets) -> None:
    scenes = shapes.generate("base", "val", 4)
    reference = shapes_samples.to_samples(scenes, questions_per_image=2)
    from_llava = load_source(
        LlavaJsonConfig(
            path=str(shapes_samples.export_llava(scenes, tmp_path / "llava", questions_per_image=2))
        )
    )
    from_hf = load_source(
        HFDatasetConfig(
            path=str(shapes_samples.export_datasets(scenes, tmp_path / "hf", questions_per_image=2))
        )
    )
    in_memory = load_source(
        DATA_FORMATS.config_class("shapes").model_validate(
            {"type": "shapes", "split": "val", "n": 4, "questions_per_image": 2}
        )
    )
    for loaded in (from_llava, from_hf, in_memory):
        assert len(loaded) == 4
        for got, ref in zip(loaded, reference, strict=True):
            assert got["id"] == ref["id"] and got["messages"] == ref["messages"]
            (image,) = got["images"]
            assert np.array_equal(np.asarray(load_image(image, got["id"])), np.asarray(ref["images"][0]))


def test_limit(tmp_path, offline_datasets) -> None:
    configs = [
        LlavaJsonConfig(path=write_llava(tmp_path / "a"), limit=2),
        MessagesConfig(path=write_messages(tmp_path / "b", "string", jsonl=True), limit=2),
        HFDatasetConfig(path=write_hf(tmp_path / "c"), limit=2),
    ]
    for cfg in configs:
        samples = load_source(cfg)
        assert [s["id"] for s in samples] == ["s0", "s1"], cfg.type
    assert len(load_source(LlavaJsonConfig(path=str(tmp_path / "a" / "data.json"), limit=10))) == 3


def test_registry_validates_source_configs() -> None:
    cfg = DATA_FORMATS.config_class("llava_json").model_validate({"type": "llava_json", "path": "x.json"})
    assert isinstance(cfg, LlavaJsonConfig) and cfg.limit is None
    with pytest.raises(ValueError, match="imagefolder"):
        LlavaJsonConfig.model_validate({"path": "x.json", "imagefolder": "y"})


# -- errors -----------------------------------------------------------------------------------


def test_missing_image_names_file_and_sample(tmp_path) -> None:
    path = write_llava(tmp_path)
    (tmp_path / "images" / "s1.png").unlink()
    samples = load_source(LlavaJsonConfig(path=path))
    with pytest.raises(DataError, match=r"sample s1: image file not found: .*images/s1\.png"):
        load_image(samples[1]["images"][0], samples[1]["id"])


def test_corrupt_images_name_the_file(tmp_path) -> None:
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(png_bytes((255, 0, 0), size=(64, 64))[:60])
    text = tmp_path / "notes.png"
    text.write_text("this is not an image")
    for path in (truncated, text):
        with pytest.raises(DataError, match=rf"sample s9: image .*{path.name} is not a readable image"):
            load_image(str(path), "s9")
    with pytest.raises(DataError, match="sample s9: image inline bytes is not a readable image"):
        load_image(b"\x89PNG\r\n\x1a\nnope", "s9")
    with pytest.raises(DataError, match="sample s9: invalid base64 data URL"):
        load_image("data:image/png;base64,@@@not-base64", "s9")
    with pytest.raises(DataError, match="sample s9"):
        load_image(None, "s9")


def test_load_image_accepts_every_reference_kind(tmp_path) -> None:
    data = png_bytes((0, 255, 0))
    (tmp_path / "g.png").write_bytes(data)
    refs = [
        str(tmp_path / "g.png"),
        tmp_path / "g.png",
        data,
        data_url((0, 255, 0)),
        {"bytes": data, "path": None},
        {"bytes": None, "path": str(tmp_path / "g.png")},
        Image.new("L", (20, 12), 150),
    ]
    for ref in refs:
        img = load_image(ref)
        assert img.mode == "RGB" and img.size == (20, 12)


@pytest.mark.parametrize("jsonl", [False, True], ids=["json", "jsonl"])
def test_invalid_json_names_the_line(tmp_path, jsonl) -> None:
    path = tmp_path / ("bad.jsonl" if jsonl else "bad.json")
    good = json.dumps({"id": "a", "messages": SAMPLES[2][2]})
    path.write_text(f"{good}\n{good}\n{{not json\n" if jsonl else f"[\n{good},\n{{not json}}\n]")
    with pytest.raises(DataError, match=rf"{path.name}: invalid JSON at line 3"):
        load_source(MessagesConfig(path=str(path)))


def test_missing_file_and_non_list_json(tmp_path) -> None:
    with pytest.raises(DataError, match="file not found: .*nope.json"):
        load_source(LlavaJsonConfig(path=str(tmp_path / "nope.json")))
    path = tmp_path / "dict.json"
    path.write_text(json.dumps({"data": []}))
    with pytest.raises(DataError, match="list of records"):
        load_source(LlavaJsonConfig(path=str(path)))


def test_bad_messages(tmp_path) -> None:
    path = tmp_path / "data.json"
    path.write_text(json.dumps([{"id": "r1", "conversations": [{"from": "robot", "value": "beep"}]}]))
    with pytest.raises(DataError, match="sample r1: unknown role 'robot'"):
        load_source(LlavaJsonConfig(path=str(path)))[0]
    with pytest.raises(DataError, match="sample x: unknown content part type 'audio'"):
        normalise_messages([{"role": "user", "content": [{"type": "audio"}]}], "x")
    with pytest.raises(DataError, match="sample x: message content must be a string"):
        normalise_messages([{"role": "assistant", "content": None}], "x")
    path.write_text(json.dumps([{"id": "r2", "messages": []}]))
    with pytest.raises(
        DataError, match="sample r2: record has no 'conversations' field; it has id, messages"
    ):
        load_source(LlavaJsonConfig(path=str(path)))[0]


def test_shapes_source_can_put_the_question_before_the_image():
    from vlbridge.data.formats import ShapesSourceConfig, load_source

    first = load_source(ShapesSourceConfig(n=4))
    after = load_source(ShapesSourceConfig(n=4, image_first=False))
    for a, b in zip(first, after, strict=True):
        question = a["messages"][0]["content"].removeprefix("<image>\n")
        assert a["messages"][0]["content"] == f"<image>\n{question}"
        assert b["messages"][0]["content"] == f"{question}\n<image>"
        assert a["messages"][1:] == b["messages"][1:]


def test_shapes_max_objects_narrows_the_variant() -> None:
    cfg = DATA_FORMATS.config_class("shapes")
    source = {"type": "shapes", "n": 12, "types": ["position"]}
    lone = "side of the image?"  # the position question asked when a scene has a single object
    questions = [s["messages"][0]["content"] for s in load_source(cfg.model_validate(source))]
    assert not all(lone in q for q in questions)
    questions = [
        s["messages"][0]["content"] for s in load_source(cfg.model_validate(source | {"max_objects": 1}))
    ]
    assert all(lone in q for q in questions)
    with pytest.raises(ConfigError, match=r"max_objects=4 is outside the 'base' variant's range \[1, 3\]"):
        load_source(cfg.model_validate({"type": "shapes", "n": 4, "max_objects": 4}))
    # Below a variant's minimum narrows it too (a lone-object stage on the crowded `many` scenes).
    crowded = source | {"variant": "many", "max_objects": 1}
    assert all(lone in s["messages"][0]["content"] for s in load_source(cfg.model_validate(crowded)))
