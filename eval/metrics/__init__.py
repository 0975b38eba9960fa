"""Metrics, official where an official one exists (`METRICS`, looked up by a task's `metric.type`).

- `vqa_accuracy` (`vqa.py`): VQAv2's min(#humans / 3, 1) over ten leave-one-out subsets, with the official
  answer normalisation;
- `exact_match`, `relaxed_match` (`match.py`): normalised equality; numbers within a relative tolerance;
- `multiple_choice` (`choice.py`): the option letter parsed from the answer (ScienceQA-style);
- `yes_no` (`yesno.py`): POPE's accuracy, precision, recall, F1 and yes-ratio;
- `caption` (`caption.py`): BLEU-1..4, METEOR, ROUGE-L, CIDEr (SPICE optional) through pycocoevalcap.
"""

from . import caption, choice, match, vqa, yesno  # noqa: F401  (registration)
from .base import METRICS, Metric, MetricConfig, Scored, build_metric

__all__ = ["METRICS", "Metric", "MetricConfig", "Scored", "build_metric"]
