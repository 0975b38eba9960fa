"""ScienceQA-IMG and POPE from their native files and from `save_to_disk` copies in the hub schema."""

from __future__ import annotations

import datasets
import pytest

from vlbridge.errors import DataError

RED, BLUE, GREEN = (200, 30, 30), (30, 30, 200), (30, 200, 30)
SQA_PROMPT_END = "\nAnswer with the option's letter from the given choices directly."


def problem(question, choices, answer, hint, image, split="test", subject="natural science"):
    return {
        "question": question,
        "choices": choices,
        "answer": answer,
        "hint": hint,
        "image": image,
        "task": "closed choice",
        "grade": "grade4",
        "subject": subject,
        "topic": "geography",
        "category": "Geography",
        "skill": "Read a map",
        "lecture": "",
        "solution": "",
        "split": split,
    }


@pytest.fixture
def scienceqa_dir(tmp_path, kit):
    problems = {
        "5": problem("Which continent is highlighted?", ["Asia", "Africa", "Europe"], 1, "", "image.png"),
        "6": problem(
            "Which word is a noun?", ["run", "cat"], 1, "Nouns name things.", None, subject="language science"
        ),
        "7": problem("Which is warmer?", ["ice", "tea"], 1, "Look at the picture.", "image.png"),
        "8": problem("Train item", ["a", "b"], 0, "", "image.png", split="train"),
    }
    kit.write_json(tmp_path / "problems.json", problems)
    kit.write_json(tmp_path / "pid_splits.json", {"train": ["8"], "val": [], "test": ["5", "6", "7"]})
    kit.write_image(tmp_path / "images" / "test" / "5" / "image.png", RED)
    kit.write_image(tmp_path / "images" / "test" / "7" / "image.png", BLUE)
    kit.write_image(tmp_path / "images" / "train" / "8" / "image.png", GREEN)
    return tmp_path


def test_scienceqa_img_native(scienceqa_dir, kit):
    task, examples = kit.task_examples("scienceqa_img", {"path": str(scienceqa_dir / "problems.json")})
    assert [(e.id, e.references, e.group) for e in examples] == [
        ("5", ["B"], "natural science"),
        ("7", ["B"], "natural science"),
    ]  # the text-only question is not in the IMG subset; the train item is not in test
    assert kit.render_prompt(task, examples[0]) == (
        "Which continent is highlighted?\nA. Asia\nB. Africa\nC. Europe" + SQA_PROMPT_END
    )
    assert kit.render_prompt(task, examples[1]) == (
        "Context: Look at the picture.\nWhich is warmer?\nA. ice\nB. tea" + SQA_PROMPT_END
    )
    assert kit.first_pixel(examples[1]) == BLUE
    _, everything = kit.task_examples("scienceqa_img", {"path": str(scienceqa_dir), "image_only": False})
    assert [e.id for e in everything] == ["5", "6", "7"] and everything[1].images == []


def test_scienceqa_saved_hub_copy(tmp_path, kit):
    features = {
        "image": datasets.Image(),
        "question": datasets.Value("string"),
        "choices": datasets.List(datasets.Value("string")),
        "answer": datasets.Value("int8"),
        "hint": datasets.Value("string"),
        "subject": datasets.Value("string"),
    }
    rows = {
        "image": [kit.image_bytes(GREEN)],
        "question": ["Which is a plant?"],
        "choices": [["rock", "fern"]],
        "answer": [1],
        "hint": [""],
        "subject": ["natural science"],
    }
    path = kit.save_dataset(tmp_path / "sqa", rows, features, split="test")
    _, (ex,) = kit.task_examples("scienceqa_img", {"path": str(path)})
    assert (
        ex.references == ["B"] and ex.fields["options"] == "A. rock\nB. fern" and kit.first_pixel(ex) == GREEN
    )


def test_scienceqa_answer_out_of_range(tmp_path, kit):
    kit.write_json(tmp_path / "problems.json", {"1": problem("Q?", ["a", "b"], 5, "", "image.png")})
    kit.write_json(tmp_path / "pid_splits.json", {"test": ["1"]})
    with pytest.raises(DataError, match="answer 5 is not a choice"):
        kit.task_examples("scienceqa_img", {"path": str(tmp_path)})[1][0]


@pytest.fixture
def pope_dir(tmp_path, kit):
    for category, label in (("adversarial", "no"), ("popular", "yes"), ("random", "no")):
        lines = [
            {
                "question_id": 1,
                "image": "COCO_val2014_000000310196.jpg",
                "text": "Is there a snowboard in the image?",
                "label": label,
            },
            {
                "question_id": 2,
                "image": "COCO_val2014_000000210789.jpg",
                "text": "Is there a dog in the image?",
                "label": "yes",
            },
        ]
        kit.write_json(tmp_path / "output" / "coco" / f"coco_pope_{category}.json", lines, lines=True)
    kit.write_image(tmp_path / "val2014" / "COCO_val2014_000000310196.jpg", RED)
    kit.write_image(tmp_path / "val2014" / "COCO_val2014_000000210789.jpg", BLUE)
    return tmp_path


def test_pope_native(pope_dir, kit):
    data = {"path": str(pope_dir / "output" / "coco"), "image_folder": str(pope_dir / "val2014")}
    task, examples = kit.task_examples("pope", data)
    assert [(e.id, e.group, e.references) for e in examples] == [
        ("adversarial-1", "adversarial", ["no"]),
        ("adversarial-2", "adversarial", ["yes"]),
        ("popular-1", "popular", ["yes"]),
        ("popular-2", "popular", ["yes"]),
        ("random-1", "random", ["no"]),
        ("random-2", "random", ["yes"]),
    ]
    assert kit.render_prompt(task, examples[0]) == (
        "Is there a snowboard in the image?\nAnswer the question using a single word or phrase."
    )
    assert kit.first_pixel(examples[1])[2] > 150
    _, one = kit.task_examples("pope", {**data, "categories": ["random"]})
    assert [e.id for e in one] == ["random-1", "random-2"]
    single_file = str(pope_dir / "output" / "coco" / "coco_pope_popular.json")
    _, popular = kit.task_examples("pope", {**data, "path": single_file})
    assert {e.group for e in popular} == {"popular"}


def test_pope_saved_hub_copy(tmp_path, kit):
    features = {
        "id": datasets.Value("string"),
        "question_id": datasets.Value("string"),
        "question": datasets.Value("string"),
        "answer": datasets.Value("string"),
        "image_source": datasets.Value("string"),
        "image": datasets.Image(),
        "category": datasets.Value("string"),
    }
    rows = {
        "id": ["0", "1"],
        "question_id": ["1", "1"],
        "question": ["Is there a cat in the image?"] * 2,
        "answer": ["yes", "no"],
        "image_source": ["COCO_val2014_1", "COCO_val2014_2"],
        "image": [kit.image_bytes(RED), kit.image_bytes(BLUE)],
        "category": ["random", "popular"],
    }
    path = kit.save_dataset(tmp_path / "pope", rows, features, split="test")
    _, examples = kit.task_examples("pope", {"path": str(path), "categories": ["popular"]})
    assert [(e.id, e.references) for e in examples] == [("popular-1", ["no"])]
    assert kit.first_pixel(examples[0]) == BLUE
