"""Multiple-choice accuracy: the option letter is parsed from free text (ScienceQA-style answers).

Accepted, in order: a bare letter ("B", "(B)", "B."), a letter opening the answer before ". ", ") " or
": " ("B. the moon"), "answer is B" / "answer: (B)", the full text of one option, or the text of exactly
one option inside the answer. Anything else is wrong (never guessed).
"""

from __future__ import annotations

import re
import string
from collections.abc import Sequence

from ..example import Example
from .base import METRICS, MeanMetric, MetricConfig
from .match import normalize_basic

LETTERS = string.ascii_uppercase
_BARE = re.compile(r"^\(?([A-Z])\)?\.?$")
_LEADING = re.compile(r"^\(?([A-Z])(?:\)|\.|:)\s")
_STATED = re.compile(r"answer(?: is)?\s*:?\s*\(?([A-Z])\b\)?", re.IGNORECASE)


def option_letters(choices: Sequence[str]) -> str:
    if len(choices) > len(LETTERS):
        raise ValueError(f"at most {len(LETTERS)} choices are supported, got {len(choices)}")
    return LETTERS[: len(choices)]


def format_options(choices: Sequence[str]) -> str:
    """ "A. first\nB. second" (the layout the prompt templates show)."""
    return "\n".join(f"{letter}. {c}" for letter, c in zip(option_letters(choices), choices, strict=True))


def parse_choice(prediction: str, choices: Sequence[str]) -> str | None:
    """The option letter the prediction names, or None."""
    letters, text = option_letters(choices), prediction.strip()
    for pattern in (_BARE, _LEADING, _STATED):
        found = pattern.search(text) if pattern is _STATED else pattern.match(text)
        if found and found.group(1).upper() in letters:
            return found.group(1).upper()
    said = normalize_basic(text)
    options = [normalize_basic(c) for c in choices]
    if said in options:
        return letters[options.index(said)]
    inside = [i for i, o in enumerate(options) if o and re.search(rf"\b{re.escape(o)}\b", said)]
    return letters[inside[0]] if len(inside) == 1 else None


class MultipleChoiceConfig(MetricConfig):
    type: str = "multiple_choice"


@METRICS.register("multiple_choice", config=MultipleChoiceConfig)
class MultipleChoice(MeanMetric):
    """Reference: the correct letter; `example.fields["choices"]`: the option texts."""

    primary = "accuracy"

    def score(self, prediction: str, example: Example) -> float:
        return float(parse_choice(prediction, example.fields["choices"]) == example.references[0])
