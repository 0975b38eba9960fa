"""POPE's figures from a hand-counted confusion matrix, and its answer-reading rule."""

from __future__ import annotations

import pytest

from vlbridge.eval.example import Example
from vlbridge.eval.metrics import build_metric
from vlbridge.eval.metrics.yesno import YesNoConfig, parse_yes_no


@pytest.mark.parametrize(
    ("answer", "reading"),
    [
        ("Yes", "yes"),
        ("No.", "no"),
        ("There is not a dog.", "no"),
        ("yes. No doubt", "yes"),
        ("maybe", "yes"),
    ],
)
def test_parse(answer, reading):
    assert parse_yes_no(answer) == reading


def test_confusion_matrix_figures():
    truth = ["yes", "yes", "yes", "no", "no", "no"]
    said = ["Yes", "Yes", "No", "Yes", "No", "No"]  # TP 2, FN 1, FP 1, TN 2
    groups = ["random", "random", "random", "adversarial", "adversarial", "adversarial"]
    examples = [Example(str(i), [], {}, [t], g) for i, (t, g) in enumerate(zip(truth, groups, strict=True))]
    scored = build_metric(YesNoConfig()).compute(said, examples)
    assert scored.scores == [1.0, 1.0, 0.0, 0.0, 1.0, 1.0]
    assert scored.summary["accuracy"] == pytest.approx(4 / 6)
    assert scored.summary["precision"] == pytest.approx(2 / 3)
    assert scored.summary["recall"] == pytest.approx(2 / 3)
    assert scored.summary["f1"] == pytest.approx(2 / 3)
    assert scored.summary["yes_ratio"] == pytest.approx(3 / 6)
    # random: TP 2, FN 1 -> F1 0.8; adversarial: FP 1, no TP -> F1 0
    assert scored.summary["f1_group_mean"] == pytest.approx(0.4)


def test_rejects_non_yes_no_references():
    with pytest.raises(ValueError, match="'yes' or 'no'"):
        build_metric(YesNoConfig()).compute(["yes"], [Example("0", [], {}, ["maybe"])])
