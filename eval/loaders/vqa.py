"""Open-ended VQA datasets: VQAv2, GQA, TextVQA.

Native layouts read here:
- VQAv2: `v2_OpenEnded_mscoco_<subtype>_questions.json` (`path`) + `v2_mscoco_<subtype>_annotations.json`
  (`annotations`), images `<image_folder>/COCO_<subtype>_<image_id:012d>.jpg`.
- GQA: `<split>_questions.json` (`{question_id: {imageId, question, answer, types, ...}}`), images
  `<image_folder>/<imageId>.jpg`.
- TextVQA: `TextVQA_0.5.1_<split>.json` (`{"data": [...]}`), OCR tokens from each record or from the
  Rosetta OCR file (`ocr`), images `<image_folder>/<image_id>.jpg`.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from vlbridge.data.io import LazySamples, column, is_native, open_dataset, read_json
from vlbridge.errors import DataError

from ..example import Example
from .base import LOADERS, HubSourceConfig, need


class VQAv2Source(HubSourceConfig):
    type: str = "vqav2"
    path: str = "lmms-lab/VQAv2"
    split: str = "validation"
    annotations: str | None = None


def _vqav2_rows(cfg: VQAv2Source) -> list[dict]:
    hint = "vqav2.data.annotations=v2_mscoco_val2014_annotations.json vqav2.data.image_folder=val2014"
    questions = read_json(cfg.path)
    annotations = read_json(need(cfg.annotations, "data.annotations (the annotations JSON)", hint))
    folder = Path(need(cfg.image_folder, "data.image_folder (the COCO image folder)", hint))
    subtype = questions.get("data_subtype", "val2014")
    by_id = {a["question_id"]: a for a in column(annotations, "annotations", str(cfg.annotations))}
    rows = []
    for q in column(questions, "questions", cfg.path):
        if q["question_id"] not in by_id:
            raise DataError(f"{cfg.annotations}: no annotation for question {q['question_id']}")
        image = folder / f"COCO_{subtype}_{q['image_id']:012d}.jpg"
        rows.append({**by_id[q["question_id"]], **q, "image": str(image)})
    return rows


@LOADERS.register("vqav2", config=VQAv2Source)
def load_vqav2(cfg: VQAv2Source) -> Sequence[Example]:
    rows = _vqav2_rows(cfg) if is_native(cfg.path) else open_dataset(cfg.path, cfg.name, cfg.split)

    def convert(row: dict, _: int) -> Example:
        answers = [a["answer"] if isinstance(a, dict) else a for a in column(row, "answers", cfg.path)]
        return Example(
            str(row["question_id"]),
            [row["image"]],
            {"question": row["question"]},
            answers,
            row.get("answer_type"),
        )

    return LazySamples(rows, convert)


class GQASource(HubSourceConfig):
    type: str = "gqa"
    path: str = "lmms-lab/GQA"
    name: str | None = "testdev_balanced_instructions"
    split: str = "testdev"
    # Questions without an image column take images from a second dataset keyed by `id`: the hub
    # configuration `images_name` of `images_path` (default: `path`), or a local save_to_disk dir there.
    images_name: str = "testdev_balanced_images"
    images_path: str | None = None


def _gqa_native(cfg: GQASource) -> list[dict]:
    folder = Path(need(cfg.image_folder, "data.image_folder (GQA's images/)", "gqa.data.image_folder=images"))
    questions = read_json(cfg.path)
    return [{"id": qid, **q, "image": str(folder / f"{q['imageId']}.jpg")} for qid, q in questions.items()]


def _gqa_images(cfg: GQASource):
    """imageId -> a loader of that image from the images dataset (opened once, read on access)."""
    images = open_dataset(cfg.images_path or cfg.path, cfg.images_name, cfg.split)
    where = {image_id: i for i, image_id in enumerate(images["id"])}

    def image(image_id: str):
        if image_id not in where:
            raise DataError(f"{cfg.images_path or cfg.path} [{cfg.images_name}]: no image {image_id!r}")
        return lambda: images[where[image_id]]["image"]

    return image


@LOADERS.register("gqa", config=GQASource)
def load_gqa(cfg: GQASource) -> Sequence[Example]:
    if is_native(cfg.path):
        rows = _gqa_native(cfg)
    else:
        rows = open_dataset(cfg.path, cfg.name, cfg.split)
    if is_native(cfg.path) or "image" in rows.column_names:
        image_of = lambda row: row["image"]  # noqa: E731
    else:
        find = _gqa_images(cfg)
        image_of = lambda row: find(row["imageId"])  # noqa: E731

    def convert(row: dict, _: int) -> Example:
        group = (row.get("types") or {}).get("structural")
        return Example(str(row["id"]), [image_of(row)], {"question": row["question"]}, [row["answer"]], group)

    return LazySamples(rows, convert)


class TextVQASource(HubSourceConfig):
    type: str = "textvqa"
    path: str = "lmms-lab/textvqa"
    split: str = "validation"
    ocr: str | None = None  # native: Rosetta OCR JSON ({"data": [{"image_id", "ocr_tokens"}]})
    require_ocr: bool = False  # error when a question has no OCR tokens (prompts that show them)


def _textvqa_rows(cfg: TextVQASource) -> list[dict]:
    folder = Path(
        need(cfg.image_folder, "data.image_folder (train_images/)", "textvqa.data.image_folder=...")
    )
    records = column(read_json(cfg.path), "data", cfg.path)
    ocr = {}
    if cfg.ocr:
        ocr = {r["image_id"]: r["ocr_tokens"] for r in column(read_json(cfg.ocr), "data", cfg.ocr)}
    return [
        {
            **r,
            "ocr_tokens": r.get("ocr_tokens", ocr.get(r["image_id"])),
            "image": str(folder / f"{r['image_id']}.jpg"),
        }
        for r in records
    ]


@LOADERS.register("textvqa", config=TextVQASource)
def load_textvqa(cfg: TextVQASource) -> Sequence[Example]:
    rows = _textvqa_rows(cfg) if is_native(cfg.path) else open_dataset(cfg.path, cfg.name, cfg.split)

    def convert(row: dict, _: int) -> Example:
        tokens = row.get("ocr_tokens")
        if tokens is None and cfg.require_ocr:
            raise DataError(
                f"{cfg.path}: question {row['question_id']} has no OCR tokens; give the Rosetta OCR file "
                "as data.ocr, or use the task without OCR tokens"
            )
        fields = {"question": row["question"], "ocr_tokens": list(tokens or [])}
        return Example(str(row["question_id"]), [row["image"]], fields, list(row["answers"]))

    return LazySamples(rows, convert)
