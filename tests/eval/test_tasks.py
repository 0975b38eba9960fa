"""Shipped tasks and suites validate; prompts, post-processing and overrides behave as documented."""

from __future__ import annotations

import pytest

from vlbridge.errors import ConfigError, DataError
from vlbridge.eval.example import Example
from vlbridge.eval.loaders import load_examples
from vlbridge.eval.tasks import (
    chat_messages,
    load_suite,
    load_task,
    postprocess,
    render_prompt,
    suite_names,
    task_names,
)

STANDARD = {
    "vqav2",
    "gqa",
    "textvqa",
    "textvqa_ocr",
    "scienceqa_img",
    "pope",
    "coco_karpathy",
    "nocaps",
    "flickr30k",
}
SHAPES = {f"shapes_{kind}{variant}" for kind in ("vqa", "caption") for variant in ("", "_hires", "_many")}


def test_every_task_and_suite_loads():
    assert STANDARD | SHAPES <= set(task_names())
    for name in task_names():
        task = load_task(name)
        assert task.name == name and task.description
    for name in suite_names():
        suite_name, tasks = load_suite(name)
        assert suite_name == name and tasks
    assert [t.name for t in load_suite("shapes")[1]] == ["shapes_vqa", "shapes_caption"]


@pytest.mark.parametrize(("variant", "canvas"), [("", 64), ("_hires", 384), ("_many", 160)])
def test_shapes_variants(variant, canvas):
    for kind in ("vqa", "caption"):
        task = load_task(f"shapes_{kind}{variant}", {"data": {"n": 2}})
        examples = load_examples(task.data)
        assert len(examples) == 2 and examples[0].load_images()[0].size == (canvas, canvas)
        assert (examples[0].group is not None) == (kind == "vqa")
        assert examples[1].references[0].endswith(".") == (kind == "caption")


def test_shapes_max_objects_keeps_the_canvas_and_caps_the_scene():
    task = load_task("shapes_caption_many", {"data": {"n": 6, "max_objects": 1}})
    examples = load_examples(task.data)
    assert all(e.load_images()[0].size == (160, 160) for e in examples)
    assert all(" and " not in e.references[0] for e in examples)  # one object per caption
    crowded = load_examples(load_task("shapes_caption_many", {"data": {"n": 6}}).data)
    assert all(" and " in e.references[0] for e in crowded)
    with pytest.raises(ConfigError, match="max_objects=13"):
        load_examples(load_task("shapes_vqa_many", {"data": {"n": 2, "max_objects": 13}}).data)


def test_prompt_snapshots():
    vqa = Example("1", [], {"question": "What is on the table?"}, ["cup"])
    assert render_prompt(load_task("vqav2"), vqa) == (
        "What is on the table?\nAnswer the question using a single word or phrase."
    )
    assert render_prompt(load_task("shapes_vqa"), vqa) == "What is on the table?"
    assert render_prompt(load_task("shapes_caption"), Example("2", [], {}, ["x"])) == "Describe the image."
    assert render_prompt(load_task("nocaps"), Example("3", [], {}, ["x"])) == (
        "Provide a one-sentence caption for the provided image."
    )


def test_image_layout():
    assert chat_messages("Q?", 1, "before") == [{"role": "user", "content": "<image>\nQ?"}]
    assert chat_messages("Q?", 2, "after") == [{"role": "user", "content": "Q?\n<image>\n<image>"}]
    assert chat_messages("Q?", 0, "after") == [{"role": "user", "content": "Q?"}]


def test_postprocessing():
    assert postprocess(load_task("vqav2"), " Two dogs.\nThey are playing.") == "2 dogs"
    assert postprocess(load_task("shapes_vqa"), "  red \n") == "red"


def test_missing_template_field_names_the_fields():
    with pytest.raises(DataError, match="fields available: question"):
        render_prompt(load_task("scienceqa_img"), Example("1", [], {"question": "Q?"}, ["A"]))


def test_overrides_and_errors():
    _, (task,) = load_suite(None, ["shapes_vqa"], ["shapes_vqa.data.n=12", "shapes_vqa.max_new_tokens=3"])
    assert task.data.n == 12 and task.max_new_tokens == 3
    with pytest.raises(ConfigError, match="names no task of this run"):
        load_suite("shapes", overrides=["vqav2.data.path=/x"])
    with pytest.raises(ConfigError, match=r"unknown eval task 'nope'; available: .*vqav2"):
        load_task("nope")
    with pytest.raises(ConfigError, match="unknown eval suite 'nope'"):
        load_suite("nope")
    with pytest.raises(ConfigError, match="data.n"):
        load_task("shapes_vqa", {"data": {"n": 0}})
    with pytest.raises(ConfigError, match="unknown answer post-processor 'shout'"):
        load_task("shapes_vqa", {"postprocess": ["shout"]})
    with pytest.raises(ConfigError, match="placed by the backend"):
        load_task("shapes_vqa", {"prompt": "<image>\n{{ question }}"})
    with pytest.raises(ConfigError, match="colour"):
        load_task("shapes_vqa", {"data": {"colour": "red"}})
    with pytest.raises(ConfigError, match="name a suite"):
        load_suite(None, [])
