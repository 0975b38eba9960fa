"""Yes/no questions scored as POPE reports them: accuracy, precision, recall and F1 of "yes", yes-ratio.

An answer counts as "no" when its first sentence contains the word "no" or "not", and as "yes" otherwise
(the rule of POPE's and LLaVA's evaluation scripts, so figures compare with published ones).
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Sequence

from ..example import Example
from .base import METRICS, Metric, MetricConfig, Scored

_WORD = re.compile(r"[a-z']+")


def parse_yes_no(text: str) -> str:
    first_sentence = text.strip().split(".")[0].lower()
    words = set(_WORD.findall(first_sentence))
    return "no" if words & {"no", "not"} else "yes"


def yes_no_summary(said: Sequence[str], truth: Sequence[str]) -> dict[str, float]:
    tp = sum(s == t == "yes" for s, t in zip(said, truth, strict=True))
    fp = sum(s == "yes" != t for s, t in zip(said, truth, strict=True))
    fn = sum(s == "no" != t for s, t in zip(said, truth, strict=True))
    n = max(len(said), 1)
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    return {
        "accuracy": sum(s == t for s, t in zip(said, truth, strict=True)) / n,
        "precision": precision,
        "recall": recall,
        "f1": 2 * precision * recall / (precision + recall) if precision + recall else 0.0,
        "yes_ratio": said.count("yes") / n,
    }


class YesNoConfig(MetricConfig):
    type: str = "yes_no"


@METRICS.register("yes_no", config=YesNoConfig)
class YesNo(Metric):
    """Pooled figures; with several groups (POPE's random / popular / adversarial) also their mean F1,
    the figure papers usually report."""

    primary = "f1"

    def compute(self, predictions: Sequence[str], examples: Sequence[Example]) -> Scored:
        said = [parse_yes_no(p) for p in predictions]
        truth = [e.references[0].strip().lower() for e in examples]
        if bad := sorted({t for t in truth} - {"yes", "no"}):
            raise ValueError(f"yes/no references must be 'yes' or 'no', got {bad[:3]}")
        summary = yes_no_summary(said, truth)
        groups: dict[str, list[int]] = defaultdict(list)
        for i, e in enumerate(examples):
            groups[e.group or ""].append(i)
        if len(groups) > 1:
            f1s = [
                yes_no_summary([said[i] for i in ix], [truth[i] for i in ix])["f1"] for ix in groups.values()
            ]
            summary["f1_group_mean"] = sum(f1s) / len(f1s)
        scores = [float(s == t) for s, t in zip(said, truth, strict=True)]
        return Scored(summary, scores, self.primary)
