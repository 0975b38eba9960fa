"""Option letters parsed from free-text answers; only unambiguous answers count."""

from __future__ import annotations

import pytest

from vlbridge.eval.example import Example
from vlbridge.eval.metrics import build_metric
from vlbridge.eval.metrics.choice import MultipleChoiceConfig, format_options, parse_choice

CHOICES = ["the moon", "a star", "Jupiter"]


@pytest.mark.parametrize(
    ("answer", "letter"),
    [
        ("B", "B"),
        ("(C)", "C"),
        ("A.", "A"),
        ("B. a star", "B"),
        ("C) Jupiter", "C"),
        ("The answer is C.", "C"),
        ("Answer: (A)", "A"),
        ("Jupiter", "C"),
        ("It is the moon.", "A"),
        ("A star, I think", "B"),  # "A" opening a sentence is an article, not a letter: the text names B
        ("D", None),  # not an option
        ("the moon or a star", None),  # two options named
        ("no idea", None),
    ],
)
def test_parse_choice(answer, letter):
    assert parse_choice(answer, CHOICES) == letter


def test_format_options():
    assert format_options(CHOICES) == "A. the moon\nB. a star\nC. Jupiter"


def test_accuracy():
    examples = [Example(str(i), [], {"choices": CHOICES}, [ref]) for i, ref in enumerate("ABC")]
    scored = build_metric(MultipleChoiceConfig()).compute(["A", "C", "Jupiter"], examples)
    assert scored.scores == [1.0, 0.0, 1.0]
    assert scored.summary == {"accuracy": pytest.approx(2 / 3)}
