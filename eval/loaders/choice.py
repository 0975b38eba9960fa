"""Multiple-choice and yes/no datasets: ScienceQA (image questions) and POPE.

Native layouts read here:
- ScienceQA: `problems.json` (`{pid: {question, choices, answer, hint, image, split, subject, ...}}`), the
  split lists `pid_splits.json` beside it (else each problem's `split`), images
  `<image_folder>/<split>/<pid>/<image>` (default image folder: `images/` beside problems.json).
- POPE: JSON-lines files `coco_pope_<category>.json` (`{question_id, image, text, label}`), one file or a
  folder of them, images `<image_folder>/<image>` (COCO val2014).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from vlbridge.data.io import LazySamples, is_native, open_dataset, read_json, read_jsonl
from vlbridge.errors import DataError

from ..example import Example
from ..metrics.choice import LETTERS, format_options
from .base import LOADERS, HubSourceConfig, need


class ScienceQASource(HubSourceConfig):
    type: str = "scienceqa"
    path: str = "lmms-lab/ScienceQA"
    name: str | None = "ScienceQA-IMG"
    split: str = "test"
    image_only: bool = True  # native files: keep only questions with an image (ScienceQA-IMG)


def _scienceqa_rows(cfg: ScienceQASource) -> list[dict]:
    path = Path(cfg.path)
    problems_file = path / "problems.json" if path.is_dir() else path
    problems = read_json(problems_file)
    splits_file = problems_file.parent / "pid_splits.json"
    if splits_file.is_file():
        pids = read_json(splits_file).get(cfg.split)
        if pids is None:
            raise DataError(f"{splits_file}: no split {cfg.split!r} (set data.split)")
    else:
        pids = [pid for pid, p in problems.items() if p.get("split") == cfg.split]
    folder = Path(cfg.image_folder) if cfg.image_folder else problems_file.parent / "images"
    rows = []
    for pid in pids:
        p = problems[str(pid)]
        if cfg.image_only and not p.get("image"):
            continue
        image = str(folder / cfg.split / str(pid) / p["image"]) if p.get("image") else None
        rows.append({**p, "id": str(pid), "image": image})
    return rows


@LOADERS.register("scienceqa", config=ScienceQASource)
def load_scienceqa(cfg: ScienceQASource) -> Sequence[Example]:
    rows = _scienceqa_rows(cfg) if is_native(cfg.path) else open_dataset(cfg.path, cfg.name, cfg.split)

    def convert(row: dict, index: int) -> Example:
        choices = list(row["choices"])
        if not 0 <= int(row["answer"]) < len(choices):
            raise DataError(
                f"{cfg.path}: problem {row.get('id', index)} answer {row['answer']} is not a choice"
            )
        fields = {
            "question": row["question"],
            "hint": (row.get("hint") or "").strip(),
            "choices": choices,
            "options": format_options(choices),
        }
        images = [row["image"]] if row.get("image") is not None else []
        return Example(
            str(row.get("id", index)), images, fields, [LETTERS[int(row["answer"])]], row.get("subject")
        )

    return LazySamples(rows, convert)


class POPESource(HubSourceConfig):
    type: str = "pope"
    path: str = "lmms-lab/POPE"
    categories: list[str] | None = None  # default: every category present


def _pope_rows(cfg: POPESource) -> list[dict]:
    folder = Path(
        need(cfg.image_folder, "data.image_folder (COCO val2014)", "pope.data.image_folder=val2014")
    )
    path = Path(cfg.path)
    files = sorted(path.glob("*pope_*.json")) if path.is_dir() else [path]
    if not files:
        raise DataError(f"{path}: no POPE files (coco_pope_<category>.json) in this folder")
    rows = []
    for file in files:
        category = file.stem.rsplit("_", 1)[-1]
        for r in read_jsonl(file):
            rows.append(
                {
                    "question_id": r["question_id"],
                    "question": r["text"],
                    "answer": r["label"],
                    "category": category,
                    "image": str(folder / r["image"]),
                }
            )
    return rows


@LOADERS.register("pope", config=POPESource)
def load_pope(cfg: POPESource) -> Sequence[Example]:
    if is_native(cfg.path):
        rows = _pope_rows(cfg)
        if cfg.categories is not None:
            rows = [r for r in rows if r["category"] in cfg.categories]
    else:
        rows = open_dataset(cfg.path, cfg.name, cfg.split)
        if cfg.categories is not None:
            rows = rows.filter(lambda c: c in cfg.categories, input_columns="category")
    if not len(rows):
        raise DataError(f"{cfg.path}: no POPE questions (categories {cfg.categories})")

    def convert(row: dict, _: int) -> Example:
        question_id = f"{row['category']}-{row['question_id']}"
        return Example(
            question_id, [row["image"]], {"question": row["question"]}, [row["answer"]], row["category"]
        )

    return LazySamples(rows, convert)
