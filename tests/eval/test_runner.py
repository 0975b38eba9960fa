"""The eval loop on tiny random models: prompts as training laid them out, batch-size invariance, reports."""

from __future__ import annotations

import json

import pytest

from vlbridge.cli import main
from vlbridge.data import shapes
from vlbridge.data.shapes_samples import ShapesSamples
from vlbridge.eval.backends import ModelBackend
from vlbridge.eval.loaders import load_examples
from vlbridge.eval.runner import run_eval, run_task, task_request
from vlbridge.eval.tasks import load_task
from vlbridge.testing import tiny_model


@pytest.fixture(scope="module")
def tiny_after():
    """A tiny LLaVA trained (in config) with the question before the image, as the quickstart is."""
    return tiny_model("llama", "resnet", image_position="after")


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory, tiny_after):
    model, tokenizer, _ = tiny_after
    path = tmp_path_factory.mktemp("ckpt") / "tiny"
    model.save_pretrained(path, tokenizer)
    return path


@pytest.mark.parametrize(("position", "image_first"), [("after", False), ("before", True)])
def test_shapes_prompts_are_the_recipe_eval_prompts(position, image_first):
    """The shapes task asks the questions of a recipe's eval split, laid out as training laid them out."""
    task = load_task("shapes_vqa", {"data": {"n": 12}})
    examples = load_examples(task.data)
    scenes = shapes.generate("base", "test", 12, seed=0)
    recipe_eval = ShapesSamples(scenes, questions_per_image=1, rng_seed=0, image_first=image_first)
    for example, sample in zip(examples, recipe_eval, strict=True):
        _, request = task_request(task, example, position)
        assert request.messages == sample["messages"][:-1]
        assert example.references == [sample["messages"][-1]["content"]]
        assert example.group == sample["meta"]["types"][0]
        assert request.images[0].tobytes() == sample["images"][0].tobytes()


def test_scores_do_not_depend_on_batch_size(tiny_after):
    model, _, processor = tiny_after
    backend = ModelBackend(model, processor, name="tiny")
    task = load_task("shapes_vqa", {"data": {"n": 9}, "max_new_tokens": 4})
    runs = [run_task(task, backend, batch_size=b, progress=False) for b in (1, 4, 9)]
    assert runs[0].raw == runs[1].raw == runs[2].raw
    assert len(set(runs[0].raw)) > 1  # a random model still says different things about different scenes
    assert runs[0].scored.summary == runs[1].scored.summary == runs[2].scored.summary
    assert runs[0].prompts[0].endswith("\n<image>")
    assert all(e.images == [] for e in runs[0].examples)  # scored examples keep no images in memory


def test_report_files(tiny_after, tmp_path):
    model, _, processor = tiny_after
    out = run_eval(
        ModelBackend(model, processor, name="tiny", path="/ckpt"),
        suite="shapes",
        overrides=["shapes_caption.max_new_tokens=6"],
        limit=5,
        batch_size=2,
        output=tmp_path / "out",
        progress=False,
    )
    results = json.loads((out / "results.json").read_text())
    assert results["model"]["name"] == "tiny" and results["model"]["image_position"] == "after"
    assert results["settings"] == {
        "suite": "shapes",
        "limit": 5,
        "batch_size": 2,
        "overrides": ["shapes_caption.max_new_tokens=6"],
    }
    vqa, caption = results["tasks"]["shapes_vqa"], results["tasks"]["shapes_caption"]
    assert vqa["n"] == caption["n"] == 5 and vqa["seconds"] > 0
    assert vqa["primary"] == "accuracy" and caption["primary"] == "CIDEr"
    assert set(caption["metrics"]) == {"BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr"}
    assert caption["config"]["max_new_tokens"] == 6 and vqa["config"]["data"]["type"] == "shapes"
    assert sum(row["n"] for row in vqa["groups"].values()) == 5
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 10
    first = samples[0]
    assert set(first) == {"task", "id", "group", "prompt", "prediction", "answer", "references", "score"}
    accuracy = sum(s["score"] for s in samples if s["task"] == "shapes_vqa") / 5
    assert accuracy == pytest.approx(vqa["metrics"]["accuracy"])
    report = (out / "report.md").read_text()
    assert "| `shapes_vqa` | 5 | accuracy |" in report and "## shapes_caption" in report


def test_cli_eval_and_compare(tiny_checkpoint, tmp_path, capsys):
    first, second = tmp_path / "a" / "run1", tmp_path / "b" / "run2"
    base = ["eval", str(tiny_checkpoint), "--task", "shapes_vqa", "--limit", "6", "--no-progress"]
    assert main([*base, "--output", str(first)]) == 0
    assert main([*base, "shapes_vqa.data.seed=1", "--batch-size", "3", "--output", str(second)]) == 0
    one = json.loads((first / "results.json").read_text())
    two = json.loads((second / "results.json").read_text())
    assert one["model"]["name"] == "tiny" and one["settings"]["suite"] == "shapes_vqa"
    assert two["tasks"]["shapes_vqa"]["config"]["data"]["seed"] == 1
    capsys.readouterr()
    png = tmp_path / "cmp.png"
    assert main(["eval", "compare", str(first), str(second), "--output", str(png)]) == 0
    printed = capsys.readouterr().out
    assert "run1" in printed and "run2" in printed and "shapes_vqa" in printed
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["eval", "--suite", "shapes"], "give one checkpoint"),
        (["eval", "CKPT", "--suite", "nope"], "unknown eval suite 'nope'"),
        (["eval", "CKPT", "--endpoint", "http://127.0.0.1:9/v1", "--suite", "shapes"], "--model NAME"),
        (["eval", "CKPT", "--suite", "shapes", "--image-position", "before"], "trained with images after"),
        (["eval", "compare", "/nonexistent"], "no results.json"),
        (["eval", "CKPT", "--suite", "shapes", "--limit", "0"], "--limit must be at least 1"),
    ],
)
def test_cli_errors(argv, message, tiny_checkpoint, capsys):
    argv = [str(tiny_checkpoint) if a == "CKPT" else a for a in argv]
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_cli_eval_switches_a_training_free_reducer_on(tmp_path, capsys):
    model, tokenizer, _ = tiny_model(frontend={"type": "llava", "connector": {"merge": 1}})
    model.save_pretrained(tmp_path / "vit", tokenizer)
    out = tmp_path / "turbo"
    argv = ["eval", str(tmp_path / "vit"), "--task", "shapes_vqa", "--limit", "4", "--no-progress"]
    assert main([*argv, "--reducer", "tome:r=4", "--output", str(out)]) == 0
    described = json.loads((out / "results.json").read_text())["model"]
    assert [r["type"] for r in described["reducers"]] == ["tome"]
    endpoint = ["--endpoint", "http://127.0.0.1:9/v1", "--model", "m", "--suite", "shapes"]
    assert main(["eval", *endpoint, "--reducer", "tome"]) == 2
    assert "start the server with it" in capsys.readouterr().err
