"""Exact match (after a light normalisation) and relaxed match (numbers within a relative tolerance)."""

from __future__ import annotations

import re
import string
from typing import Literal

from ..example import Example
from .base import METRICS, MeanMetric, MetricConfig
from .vqa import normalize_vqa_answer

_PUNCT = re.compile(f"[{re.escape(string.punctuation)}]")


def normalize_basic(text: str) -> str:
    """Lower-case, punctuation to spaces, whitespace collapsed ("Red." == "red")."""
    return " ".join(_PUNCT.sub(" ", text.lower()).split())


_NORMALIZERS = {"basic": normalize_basic, "vqa": normalize_vqa_answer, "none": str.strip}


class ExactMatchConfig(MetricConfig):
    type: str = "exact_match"
    normalize: Literal["basic", "vqa", "none"] = "basic"


@METRICS.register("exact_match", config=ExactMatchConfig)
class ExactMatch(MeanMetric):
    """1 when the normalised prediction equals any normalised reference."""

    primary = "accuracy"

    def score(self, prediction: str, example: Example) -> float:
        norm = _NORMALIZERS[self.config.normalize]
        return float(norm(prediction) in {norm(r) for r in example.references})


def _number(text: str) -> float | None:
    text = text.strip().rstrip("%").replace(",", "")
    try:
        return float(text)
    except ValueError:
        return None


def relaxed_match(prediction: str, reference: str, tolerance: float = 0.05) -> bool:
    """ChartQA's relaxed accuracy: numbers may differ by `tolerance` relative to the reference (a trailing
    % and thousands separators ignored); anything else must match exactly after normalisation."""
    pred, ref = _number(prediction), _number(reference)
    if pred is not None and ref is not None:
        return pred == ref if ref == 0 else abs(pred - ref) / abs(ref) <= tolerance
    return normalize_basic(prediction) == normalize_basic(reference)


class RelaxedMatchConfig(MetricConfig):
    type: str = "relaxed_match"
    tolerance: float = 0.05


@METRICS.register("relaxed_match", config=RelaxedMatchConfig)
class RelaxedMatch(MeanMetric):
    primary = "accuracy"

    def score(self, prediction: str, example: Example) -> float:
        return float(any(relaxed_match(prediction, r, self.config.tolerance) for r in example.references))
