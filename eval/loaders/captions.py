"""Captioning datasets: COCO (Karpathy test), Flickr30k, NoCaps.

Native files, told apart by their keys:
- Karpathy split files (`dataset_coco.json`, `dataset_flickr30k.json`): `{"images": [{filepath?, filename,
  split, sentences: [{raw}], cocoid | imgid}]}`; images `<image_folder>/<filepath>/<filename>`;
- COCO-format caption annotations (NoCaps' `nocaps_val_4500_captions.json`): `{"images": [{id, file_name,
  domain?}], "annotations": [{image_id, caption}]}`; images `<image_folder>/<file_name>`, grouped by domain.
Hub copies name their columns in the task (`image_column`, `captions_column`, ...); a copy without images
(e.g. annotations only) takes them from `image_folder` by `filepath` / `filename`.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

from vlbridge.data.io import LazySamples, column, is_native, open_dataset, read_json
from vlbridge.errors import DataError

from ..example import Example
from .base import LOADERS, HubSourceConfig, need


class CaptionsSource(HubSourceConfig):
    type: str = "captions"
    image_column: str = "image"
    captions_column: str = "caption"
    id_column: str | None = None
    group_column: str | None = None


def _karpathy_rows(data: dict, cfg: CaptionsSource, folder: Path) -> list[dict]:
    rows = []
    for img in data["images"]:
        if img.get("split") != cfg.split:
            continue
        image = folder / img.get("filepath", "") / img["filename"]
        image_id = img.get("cocoid", img.get("imgid", img["filename"]))
        rows.append({"id": image_id, "image": str(image), "captions": [s["raw"] for s in img["sentences"]]})
    return rows


def _coco_format_rows(data: dict, folder: Path) -> list[dict]:
    captions: dict[int, list[str]] = defaultdict(list)
    for a in data["annotations"]:
        captions[a["image_id"]].append(a["caption"])
    return [
        {
            "id": img["id"],
            "image": str(folder / img["file_name"]),
            "captions": captions[img["id"]],
            "group": img.get("domain"),
        }
        for img in data["images"]
    ]


def _native_rows(cfg: CaptionsSource) -> list[dict]:
    folder = Path(need(cfg.image_folder, "data.image_folder", "coco_karpathy.data.image_folder=/data/coco"))
    data = read_json(cfg.path)
    images = column(data, "images", cfg.path)
    if "annotations" in data:
        return _coco_format_rows(data, folder)
    if images and "sentences" in images[0]:
        return _karpathy_rows(data, cfg, folder)
    raise DataError(f"{cfg.path}: neither a Karpathy split file (images with sentences) nor COCO captions")


def _captions(value, where: str) -> list[str]:
    items = value if isinstance(value, list) else [value]
    out = [i if isinstance(i, str) else i.get("raw") or i.get("caption") for i in items]
    if not out or not all(isinstance(c, str) for c in out):
        raise DataError(
            f"{where}: captions must be strings or dicts with 'raw' / 'caption', got {value!r:.80}"
        )
    return out


@LOADERS.register("captions", config=CaptionsSource)
def load_captions(cfg: CaptionsSource) -> Sequence[Example]:
    native = is_native(cfg.path)
    rows = _native_rows(cfg) if native else open_dataset(cfg.path, cfg.name, cfg.split)
    image_key, captions_key = ("image", "captions") if native else (cfg.image_column, cfg.captions_column)
    id_key = "id" if native else cfg.id_column
    group_key = "group" if native else cfg.group_column

    def image_of(row: dict):
        if image_key in row:
            return row[image_key]
        what = f"data.image_folder ({cfg.path} has no {image_key!r} column)"
        folder = need(cfg.image_folder, what, "TASK.data.image_folder=/data/coco")
        return str(Path(folder) / row.get("filepath", "") / column(row, "filename", cfg.path))

    def convert(row: dict, index: int) -> Example:
        refs = _captions(column(row, captions_key, cfg.path), f"{cfg.path} row {index}")
        sample_id = str(row[id_key]) if id_key else str(index)
        return Example(sample_id, [image_of(row)], {}, refs, row.get(group_key) if group_key else None)

    return LazySamples(rows, convert)
