"""VQAv2 accuracy against values worked out by hand from the official evaluation script (vqaEval.py)."""

from __future__ import annotations

import pytest

from vlbridge.eval.metrics.vqa import (
    normalize_vqa_answer,
    process_digit_article,
    process_punctuation,
    vqa_accuracy,
)


def humans(*pairs: tuple[str, int]) -> list[str]:
    """Ten human answers from (answer, count) pairs."""
    answers = [a for a, k in pairs for _ in range(k)]
    assert len(answers) == 10
    return answers


@pytest.mark.parametrize(
    ("matching", "expected"),
    # m matching humans: m leave-one-out subsets keep m-1 matches, 10-m keep m; each scores min(1, k/3).
    [(0, 0.0), (1, 0.3), (2, 0.6), (3, 0.9), (4, 1.0), (10, 1.0)],
)
def test_partial_agreement(matching, expected):
    answers = humans(("red", matching), ("blue", 10 - matching)) if matching < 10 else ["red"] * 10
    assert vqa_accuracy("red", answers) == pytest.approx(expected)


@pytest.mark.parametrize(
    ("prediction", "answers", "expected"),
    [
        # Unanimous humans: nothing is normalised, only tabs/newlines and outer spaces are cleaned.
        ("2", ["2"] * 10, 1.0),
        (" 2\n", ["2"] * 10, 1.0),
        ("two", ["2"] * 10, 0.0),
        ("Yes", ["yes"] * 10, 0.0),
        # Mixed humans: humans and prediction are normalised (number words, case, articles, punctuation).
        ("Two", humans(("2", 2), ("two", 1), ("3", 7)), 0.9),
        ("None", humans(("0", 1), ("none", 1), ("1", 8)), 0.6),
        ("dog", humans(("a dog", 2), ("the dog", 2), ("cat", 6)), 1.0),
        ("an apple", humans(("apple", 1), ("pear", 9)), 0.3),
        ("Yes.", humans(("yes", 3), ("no", 7)), 0.9),
        ("YES", humans(("yes", 3), ("no", 7)), 0.9),
        ("1,000", humans(("1000", 2), ("1,000", 1), ("100", 7)), 0.9),
        ("3.5", humans(("3.5", 2), ("35", 8)), 0.6),
        ("dont", humans(("don't", 3), ("do", 7)), 0.9),
        ("black/white", humans(("black and white", 5), ("black white", 1), ("gray", 4)), 0.3),
        ("t-shirt", humans(("t shirt", 1), ("tshirt", 1), ("shirt", 8)), 0.3),
        ("on the left!", humans(("left", 2), ("on left", 2), ("right", 6)), 0.6),
    ],
)
def test_official_cases(prediction, answers, expected):
    assert vqa_accuracy(prediction, answers) == pytest.approx(expected)


def test_always_normalize_is_textvqa_behaviour():
    assert vqa_accuracy("two", ["2"] * 10) == 0.0
    assert vqa_accuracy("two", ["2"] * 10, always_normalize=True) == 1.0


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("yes, it is", "yes it is"),  # a mark beside a space is deleted
        ("black/white", "black white"),  # elsewhere it becomes a space
        ("black / white", "black  white"),
        ("1,000,000 (approx)", "1000000 approx"),  # a digit,digit anywhere: every mark deleted
        ("3.5", "3.5"),  # a period before a digit stays
        ("end.", "end"),
        ("mr.smith", "mrsmith"),
        ("what?!", "what  "),
        ("it's: fine", "it's: fine"),  # apostrophe and colon are not on the official list
        ("." * 40, "." * 8),  # the official call removes at most 32 periods
    ],
)
def test_punctuation(text, expected):
    assert process_punctuation(text) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("The Two Dogs", "2 dogs"),
        ("none", "0"),
        ("ten eleven", "10 eleven"),
        ("isnt it", "isn't it"),
        ("youre an  angel", "you're angel"),
        ("Im", "im"),  # the official table's capitalised keys never match a lower-cased word
    ],
)
def test_digits_articles_contractions(text, expected):
    assert process_digit_article(text) == expected


def test_normalize_is_the_whole_pipeline():
    assert normalize_vqa_answer("\tThe two  dogs.\n") == "2 dogs"


def test_needs_human_answers():
    with pytest.raises(ValueError, match="at least one"):
        vqa_accuracy("yes", [])
