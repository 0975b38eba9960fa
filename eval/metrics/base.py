"""The metric interface and its registry: predictions + examples in, summary figures and per-sample scores."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

from vlbridge.config import Typed
from vlbridge.registry import Registry

from ..example import Example

METRICS: Registry[Any] = Registry("metric")


class MetricConfig(Typed):
    """Base of every `metric:` section of a task YAML (`type` names a registered metric)."""


@dataclass
class Scored:
    """What a metric returns: `summary` (name -> value, fractions in [0, 1] unless the metric says otherwise),
    one `scores` entry per prediction (what samples.jsonl shows), the `primary` summary key, and notes such
    as a sub-metric that could not run."""

    summary: dict[str, float]
    scores: list[float]
    primary: str
    notes: list[str] = field(default_factory=list)


class Metric(ABC):
    """A configured metric. Corpus-level metrics (CIDEr, F1) see the whole set at once."""

    primary: ClassVar[str]

    def __init__(self, config: MetricConfig) -> None:
        self.config = config

    @abstractmethod
    def compute(self, predictions: Sequence[str], examples: Sequence[Example]) -> Scored: ...


class MeanMetric(Metric):
    """A metric that is the mean of a per-sample score (accuracy-like)."""

    @abstractmethod
    def score(self, prediction: str, example: Example) -> float: ...

    def compute(self, predictions: Sequence[str], examples: Sequence[Example]) -> Scored:
        scores = [self.score(p, e) for p, e in zip(predictions, examples, strict=True)]
        return Scored({self.primary: sum(scores) / max(len(scores), 1)}, scores, self.primary)


def build_metric(config: MetricConfig) -> Metric:
    return METRICS.get(config.type)(config)
