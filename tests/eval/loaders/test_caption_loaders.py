"""COCO Karpathy, Flickr30k and NoCaps from their native files and from saved hub-schema copies."""

from __future__ import annotations

import datasets
import pytest

from vlbridge.errors import ConfigError, DataError

RED, BLUE = (200, 30, 30), (30, 30, 200)
CAPTION_PROMPT = "Provide a one-sentence caption for the provided image."


def karpathy_image(filename, split, captions, filepath=None, **ids):
    image = {
        "filename": filename,
        "split": split,
        "sentids": list(range(len(captions))),
        "sentences": [
            {"tokens": c.lower().split(), "raw": c, "imgid": 0, "sentid": i} for i, c in enumerate(captions)
        ],
        **ids,
    }
    return image | ({"filepath": filepath} if filepath else {})


def test_coco_karpathy_native(tmp_path, kit):
    images = [
        karpathy_image(
            "COCO_val2014_000000391895.jpg",
            "test",
            ["A man rides a bike.", "A biker on a road."],
            filepath="val2014",
            cocoid=391895,
            imgid=0,
        ),
        karpathy_image(
            "COCO_val2014_000000522418.jpg",
            "restval",
            ["A woman cuts a cake."],
            filepath="val2014",
            cocoid=522418,
            imgid=1,
        ),
        karpathy_image(
            "COCO_val2014_000000184613.jpg",
            "test",
            ["A boy holds an umbrella."],
            filepath="val2014",
            cocoid=184613,
            imgid=2,
        ),
    ]
    kit.write_json(tmp_path / "dataset_coco.json", {"images": images, "dataset": "coco"})
    kit.write_image(tmp_path / "coco" / "val2014" / "COCO_val2014_000000391895.jpg", RED)
    kit.write_image(tmp_path / "coco" / "val2014" / "COCO_val2014_000000184613.jpg", BLUE)
    task, examples = kit.task_examples(
        "coco_karpathy", {"path": str(tmp_path / "dataset_coco.json"), "image_folder": str(tmp_path / "coco")}
    )
    assert [(e.id, e.references) for e in examples] == [
        ("391895", ["A man rides a bike.", "A biker on a road."]),
        ("184613", ["A boy holds an umbrella."]),
    ]
    assert kit.render_prompt(task, examples[0]) == CAPTION_PROMPT
    assert kit.first_pixel(examples[1])[2] > 150


def test_flickr30k_native_karpathy_test(tmp_path, kit):
    images = [
        karpathy_image("1000092795.jpg", "test", ["Two young guys with shaggy hair."], imgid=0),
        karpathy_image("10002456.jpg", "train", ["Several men in hard hats."], imgid=1),
    ]
    kit.write_json(tmp_path / "dataset_flickr30k.json", {"images": images, "dataset": "flickr30k"})
    kit.write_image(tmp_path / "flickr30k-images" / "1000092795.jpg", RED)
    _, examples = kit.task_examples(
        "flickr30k",
        {
            "path": str(tmp_path / "dataset_flickr30k.json"),
            "image_folder": str(tmp_path / "flickr30k-images"),
        },
    )
    assert [(e.id, e.references) for e in examples] == [("0", ["Two young guys with shaggy hair."])]
    assert kit.first_pixel(examples[0])[0] > 150


def test_nocaps_native_coco_format_with_domains(tmp_path, kit):
    data = {
        "licenses": [],
        "info": {},
        "images": [
            {
                "id": 0,
                "file_name": "0013ea2087020901.jpg",
                "open_images_id": "0013ea2087020901",
                "height": 16,
                "width": 24,
                "coco_url": "",
                "license": 0,
                "date_captured": "",
                "domain": "in-domain",
            },
            {
                "id": 1,
                "file_name": "0023fe5c02b68bd0.jpg",
                "open_images_id": "0023fe5c02b68bd0",
                "height": 16,
                "width": 24,
                "coco_url": "",
                "license": 0,
                "date_captured": "",
                "domain": "out-domain",
            },
        ],
        "annotations": [
            {"image_id": 1, "id": 10, "caption": "A jellyfish in the sea."},
            {"image_id": 0, "id": 11, "caption": "A dog on a couch."},
            {"image_id": 1, "id": 12, "caption": "An orange jellyfish."},
        ],
    }
    kit.write_json(tmp_path / "nocaps_val_4500_captions.json", data)
    kit.write_image(tmp_path / "images" / "0013ea2087020901.jpg", RED)
    kit.write_image(tmp_path / "images" / "0023fe5c02b68bd0.jpg", BLUE)
    _, examples = kit.task_examples(
        "nocaps",
        {"path": str(tmp_path / "nocaps_val_4500_captions.json"), "image_folder": str(tmp_path / "images")},
    )
    assert [(e.id, e.group, e.references) for e in examples] == [
        ("0", "in-domain", ["A dog on a couch."]),
        ("1", "out-domain", ["A jellyfish in the sea.", "An orange jellyfish."]),
    ]


def test_nocaps_saved_hub_copy(tmp_path, kit):
    features = {
        "image": datasets.Image(),
        "image_id": datasets.Value("int64"),
        "annotations_captions": datasets.List(datasets.Value("string")),
    }
    rows = {
        "image": [kit.image_bytes(RED)],
        "image_id": [7],
        "annotations_captions": [["A red square.", "Red."]],
    }
    path = kit.save_dataset(tmp_path / "nocaps", rows, features, split="validation")
    _, (ex,) = kit.task_examples("nocaps", {"path": str(path)})
    assert (ex.id, ex.references, kit.first_pixel(ex)) == ("7", ["A red square.", "Red."], RED)


def test_annotation_only_hub_copy_takes_images_from_folder(tmp_path, kit):
    """The coco-karpathy hub copy has no image column: images come from the local COCO root."""
    features = {
        "filepath": datasets.Value("string"),
        "sentences": datasets.List(datasets.Value("string")),
        "cocoid": datasets.Value("int64"),
        "filename": datasets.Value("string"),
        "split": datasets.Value("string"),
    }
    rows = {
        "filepath": ["val2014"],
        "sentences": [["A cat.", "A kitten."]],
        "cocoid": [42],
        "filename": ["COCO_val2014_000000000042.jpg"],
        "split": ["test"],
    }
    path = kit.save_dataset(tmp_path / "karpathy", rows, features, split="test")
    kit.write_image(tmp_path / "coco" / "val2014" / "COCO_val2014_000000000042.jpg", BLUE)
    _, (ex,) = kit.task_examples("coco_karpathy", {"path": str(path), "image_folder": str(tmp_path / "coco")})
    assert ex.id == "42" and ex.references == ["A cat.", "A kitten."] and kit.first_pixel(ex)[2] > 150
    with pytest.raises(ConfigError, match="data.image_folder .*has no 'image' column"):
        kit.task_examples("coco_karpathy", {"path": str(path)})[1][0]


def test_unknown_json_layout(tmp_path, kit):
    kit.write_json(tmp_path / "x.json", {"images": [{"file": "a.jpg"}]})
    with pytest.raises(DataError, match="neither a Karpathy split file"):
        kit.task_examples("nocaps", {"path": str(tmp_path / "x.json"), "image_folder": str(tmp_path)})
