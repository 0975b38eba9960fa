"""Exact and relaxed match."""

from __future__ import annotations

import pytest

from vlbridge.eval.example import Example
from vlbridge.eval.metrics import build_metric
from vlbridge.eval.metrics.match import ExactMatchConfig, RelaxedMatchConfig, relaxed_match


def scores(config, predictions, references):
    examples = [Example(str(i), [], {}, refs) for i, refs in enumerate(references)]
    return build_metric(config).compute(predictions, examples).scores


def test_exact_match_normalisations():
    preds, refs = ["Red.", "two", " blue "], [["red"], ["2"], ["Blue", "navy"]]
    assert scores(ExactMatchConfig(), preds, refs) == [1.0, 0.0, 1.0]
    assert scores(ExactMatchConfig(normalize="vqa"), preds, refs) == [1.0, 1.0, 1.0]
    assert scores(ExactMatchConfig(normalize="none"), preds, refs) == [0.0, 0.0, 0.0]


@pytest.mark.parametrize(
    ("prediction", "reference", "ok"),
    [
        ("104", "100", True),
        ("106", "100", False),
        ("1,050", "1000", True),
        ("12%", "12", True),
        ("0", "0", True),
        ("0.1", "0", False),
        ("Yes", "yes", True),
        ("cat", "dog", False),
    ],
)
def test_relaxed_match(prediction, reference, ok):
    assert relaxed_match(prediction, reference) is ok


def test_relaxed_tolerance_is_configurable():
    assert scores(RelaxedMatchConfig(tolerance=0.1), ["108"], [["100"]]) == [1.0]
