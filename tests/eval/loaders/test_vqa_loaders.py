"""VQAv2, GQA and TextVQA from their native files and from `save_to_disk` copies in the hub schema."""

from __future__ import annotations

import datasets
import pytest

from vlbridge.errors import ConfigError, DataError
from vlbridge.eval.tasks import render_prompt

RED, BLUE = (200, 30, 30), (30, 30, 200)
VQA_SUFFIX = "\nAnswer the question using a single word or phrase."


def human_answers(*answers: str) -> list[dict]:
    return [{"answer": a, "answer_confidence": "yes", "answer_id": i + 1} for i, a in enumerate(answers)]


@pytest.fixture
def vqav2_files(tmp_path, kit):
    questions = {
        "info": {},
        "task_type": "Open-Ended",
        "data_type": "mscoco",
        "data_subtype": "val2014",
        "license": {},
        "questions": [
            {"image_id": 42, "question": "What color is the bus?", "question_id": 420},
            {"image_id": 73, "question": "How many dogs?", "question_id": 731},
        ],
    }
    annotations = {
        "info": {},
        "license": {},
        "data_subtype": "val2014",
        "annotations": [
            {
                "question_type": "how many",
                "multiple_choice_answer": "2",
                "answers": human_answers(*["2"] * 9, "two"),
                "image_id": 73,
                "answer_type": "number",
                "question_id": 731,
            },
            {
                "question_type": "what color is the",
                "multiple_choice_answer": "red",
                "answers": human_answers(*["red"] * 8, "maroon", "dark red"),
                "image_id": 42,
                "answer_type": "other",
                "question_id": 420,
            },
        ],
    }
    kit.write_image(tmp_path / "val2014" / "COCO_val2014_000000000042.jpg", RED)
    kit.write_image(tmp_path / "val2014" / "COCO_val2014_000000000073.jpg", BLUE)
    return {
        "path": str(kit.write_json(tmp_path / "v2_OpenEnded_mscoco_val2014_questions.json", questions)),
        "annotations": str(kit.write_json(tmp_path / "v2_mscoco_val2014_annotations.json", annotations)),
        "image_folder": str(tmp_path / "val2014"),
    }


def test_vqav2_native(vqav2_files, kit):
    task, examples = kit.task_examples("vqav2", vqav2_files)
    assert [e.id for e in examples] == ["420", "731"]
    bus, dogs = examples
    assert bus.references == ["red"] * 8 + ["maroon", "dark red"] and bus.group == "other"
    assert dogs.group == "number" and len(dogs.references) == 10
    assert render_prompt(task, bus) == "What color is the bus?" + VQA_SUFFIX
    assert (
        kit.first_pixel(bus)[0] > 150 and kit.first_pixel(dogs)[2] > 150
    )  # JPEG: close to the colours written


def test_vqav2_native_needs_annotations_and_images(vqav2_files, kit):
    with pytest.raises(ConfigError, match="data.annotations"):
        kit.task_examples("vqav2", {**vqav2_files, "annotations": None})
    with pytest.raises(DataError, match="file not found"):
        kit.task_examples("vqav2", {**vqav2_files, "annotations": "/nonexistent.json"})


def test_vqav2_saved_hub_copy(tmp_path, kit):
    answer = {
        "answer": datasets.Value("string"),
        "answer_confidence": datasets.Value("string"),
        "answer_id": datasets.Value("int64"),
    }
    features = {
        "question_type": datasets.Value("string"),
        "multiple_choice_answer": datasets.Value("string"),
        "answers": datasets.List(answer),
        "image_id": datasets.Value("int64"),
        "answer_type": datasets.Value("string"),
        "question_id": datasets.Value("int64"),
        "question": datasets.Value("string"),
        "image": datasets.Image(),
    }
    rows = {
        "question_type": ["is the"],
        "multiple_choice_answer": ["yes"],
        "answers": [human_answers(*["yes"] * 10)],
        "image_id": [9],
        "answer_type": ["yes/no"],
        "question_id": [90],
        "question": ["Is the sky blue?"],
        "image": [kit.image_bytes(BLUE)],
    }
    path = kit.save_dataset(tmp_path / "vqav2", rows, features, split="validation")
    _, examples = kit.task_examples("vqav2", {"path": str(path)})
    (ex,) = examples
    assert (ex.id, ex.group, ex.references) == ("90", "yes/no", ["yes"] * 10)
    assert kit.first_pixel(ex) == BLUE
    with pytest.raises(DataError, match="no split 'test'"):
        kit.task_examples("vqav2", {"path": str(path), "split": "test"})


def test_hub_id_offline_says_what_to_do(kit):
    with pytest.raises(DataError, match="could not load hub dataset 'nobody/no-such-vqa'.*local copy"):
        kit.task_examples("vqav2", {"path": "nobody/no-such-vqa"})


def test_gqa_native(tmp_path, kit):
    questions = {
        "201307251": {
            "imageId": "n161313",
            "question": "Is it overcast?",
            "answer": "no",
            "fullAnswer": "No, it is clear.",
            "isBalanced": True,
            "types": {"structural": "verify", "semantic": "global", "detailed": "weather"},
        },
        "201640614": {
            "imageId": "n235859",
            "question": "Who is wearing the shirt?",
            "answer": "man",
            "types": {"structural": "query", "semantic": "rel", "detailed": "relS"},
        },
    }
    kit.write_image(tmp_path / "images" / "n161313.jpg", RED)
    kit.write_image(tmp_path / "images" / "n235859.jpg", BLUE)
    path = kit.write_json(tmp_path / "testdev_balanced_questions.json", questions)
    task, examples = kit.task_examples("gqa", {"path": str(path), "image_folder": str(tmp_path / "images")})
    assert [(e.id, e.references, e.group) for e in examples] == [
        ("201307251", ["no"], "verify"),
        ("201640614", ["man"], "query"),
    ]
    assert render_prompt(task, examples[1]) == "Who is wearing the shirt?" + VQA_SUFFIX
    assert kit.first_pixel(examples[1])[2] > 150


def test_gqa_saved_hub_copy_joins_images(tmp_path, kit):
    types = {
        "structural": datasets.Value("string"),
        "semantic": datasets.Value("string"),
        "detailed": datasets.Value("string"),
    }
    questions = kit.save_dataset(
        tmp_path / "instructions",
        {
            "id": ["q1", "q2"],
            "imageId": ["img2", "img1"],
            "question": ["Q one?", "Q two?"],
            "answer": ["yes", "cup"],
            "types": [
                {"structural": "verify", "semantic": "obj", "detailed": "exist"},
                {"structural": "query", "semantic": "obj", "detailed": "cat"},
            ],
        },
        {
            "id": datasets.Value("string"),
            "imageId": datasets.Value("string"),
            "question": datasets.Value("string"),
            "answer": datasets.Value("string"),
            "types": types,
        },
        split="testdev",
    )
    images = kit.save_dataset(
        tmp_path / "images",
        {"id": ["img1", "img2"], "image": [kit.image_bytes(RED), kit.image_bytes(BLUE)]},
        {"id": datasets.Value("string"), "image": datasets.Image()},
        split="testdev",
    )
    _, examples = kit.task_examples("gqa", {"path": str(questions), "images_path": str(images)})
    assert [e.id for e in examples] == ["q1", "q2"]
    assert kit.first_pixel(examples[0]) == BLUE and kit.first_pixel(examples[1]) == RED


@pytest.fixture
def textvqa_files(tmp_path, kit):
    records = [
        {
            "question": "what brand is this?",
            "image_id": "0054c91397f2fe05",
            "image_classes": ["Bottle"],
            "flickr_original_url": "",
            "flickr_300k_url": "",
            "image_width": 1024,
            "image_height": 768,
            "answers": ["nokia"] * 7 + ["nokia phone"] * 3,
            "question_tokens": ["what", "brand"],
            "question_id": 34602,
            "set_name": "val",
        },
        {
            "question": "what number is on the shirt?",
            "image_id": "a1b2",
            "answers": ["23"] * 10,
            "question_id": 34603,
            "set_name": "val",
        },
    ]
    ocr = {
        "data": [
            {"image_id": "0054c91397f2fe05", "ocr_tokens": ["NOKIA", "5:42"], "ocr_info": []},
            {"image_id": "a1b2", "ocr_tokens": [], "ocr_info": []},
        ]
    }
    kit.write_image(tmp_path / "train_images" / "0054c91397f2fe05.jpg", RED)
    kit.write_image(tmp_path / "train_images" / "a1b2.jpg", BLUE)
    return {
        "path": str(
            kit.write_json(tmp_path / "TextVQA_0.5.1_val.json", {"dataset_name": "textvqa", "data": records})
        ),
        "ocr": str(kit.write_json(tmp_path / "TextVQA_Rosetta_OCR_v0.2_val.json", ocr)),
        "image_folder": str(tmp_path / "train_images"),
    }


def test_textvqa_native_with_and_without_ocr(textvqa_files, kit):
    task, examples = kit.task_examples("textvqa_ocr", textvqa_files)
    brand, number = examples
    assert brand.fields["ocr_tokens"] == ["NOKIA", "5:42"] and len(brand.references) == 10
    assert render_prompt(task, brand) == (
        "what brand is this?\nReference OCR token: NOKIA, 5:42" + VQA_SUFFIX
    )
    assert render_prompt(task, number) == "what number is on the shirt?" + VQA_SUFFIX  # no tokens, no line
    plain, examples = kit.task_examples("textvqa", {**textvqa_files, "ocr": None})
    assert render_prompt(plain, examples[0]) == "what brand is this?" + VQA_SUFFIX
    with pytest.raises(DataError, match="no OCR tokens"):
        kit.task_examples("textvqa_ocr", {**textvqa_files, "ocr": None})[1][0]


def test_textvqa_saved_hub_copy(tmp_path, kit):
    features = {
        "question_id": datasets.Value("int64"),
        "question": datasets.Value("string"),
        "answers": datasets.List(datasets.Value("string")),
        "image": datasets.Image(),
        "ocr_tokens": datasets.List(datasets.Value("string")),
        "image_id": datasets.Value("string"),
    }
    rows = {
        "question_id": [1],
        "question": ["what time is it?"],
        "answers": [["5:42"] * 10],
        "image": [kit.image_bytes(RED)],
        "ocr_tokens": [["5:42", "PM"]],
        "image_id": ["x"],
    }
    path = kit.save_dataset(tmp_path / "textvqa", rows, features, split="validation")
    task, (ex,) = kit.task_examples("textvqa_ocr", {"path": str(path)})
    assert "Reference OCR token: 5:42, PM" in render_prompt(task, ex) and kit.first_pixel(ex) == RED
