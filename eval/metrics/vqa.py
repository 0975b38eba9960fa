"""VQAv2 accuracy, case for case as the official evaluation (GT-Vision-Lab/VQA, vqaEval.py, 2021 revision).

Per question: tabs/newlines become spaces and both sides are stripped. Only when the human answers are not
all identical are they and the prediction normalised (punctuation, then lower-case / number words / articles
/ contractions). The score is the mean, over the ten leave-one-out subsets of the ten human answers, of
min(#subset answers equal to the prediction / 3, 1): 1, 2, 3 matching humans give 0.3, 0.6, 0.9.

The official script leaves a prediction un-normalised when the humans agree, so "Two" scores 0 against ten
"2"s; tasks therefore normalise predictions first (the `vqa_normalize` post-processor), as submissions to
the evaluation server are normalised. `always_normalize` follows TextVQA's evaluator, which normalises
every answer unconditionally.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from ..example import Example
from .base import METRICS, MeanMetric, MetricConfig

# Characters the official processPunctuation handles (no period: see _PERIOD; no apostrophe or colon).
_PUNCTUATION = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`")
_PUNCTUATION += (",", "?", "!")
_DIGIT_COMMA_DIGIT = re.compile(r"\d,\d")
# A period not followed by a digit (the official pattern's leading `(?!<=\d)` is a lookahead that never
# fails before a period, so it adds nothing). The official call passes re.UNICODE (= 32) where `count`
# goes, so at most 32 periods are removed; kept for case-for-case agreement.
_PERIOD = re.compile(r"\.(?!\d)")
_PERIOD_LIMIT = 32

_NUMBER_WORDS = dict(
    zip(
        "none zero one two three four five six seven eight nine ten".split(),
        "0 0 1 2 3 4 5 6 7 8 9 10".split(),
        strict=True,
    )
)
_ARTICLES = frozenset({"a", "an", "the"})

# Official contraction table (word -> replacement), after lower-casing; its capitalised keys ("Im", "Ive",
# "Id've", "I'dve") can never match a lower-cased word and are left out.
_CONTRACTIONS = dict(
    pair.split(">")
    for pair in """
    aint>ain't arent>aren't cant>can't couldve>could've couldnt>couldn't couldn'tve>couldn't've
    couldnt've>couldn't've didnt>didn't doesnt>doesn't dont>don't hadnt>hadn't hadnt've>hadn't've
    hadn'tve>hadn't've hasnt>hasn't havent>haven't hed>he'd hed've>he'd've he'dve>he'd've hes>he's
    howd>how'd howll>how'll hows>how's isnt>isn't itd>it'd itd've>it'd've it'dve>it'd've itll>it'll
    let's>let's maam>ma'am mightnt>mightn't mightnt've>mightn't've mightn'tve>mightn't've
    mightve>might've mustnt>mustn't mustve>must've neednt>needn't notve>not've oclock>o'clock
    oughtnt>oughtn't ow's'at>'ow's'at 'ows'at>'ow's'at 'ow'sat>'ow's'at shant>shan't shed've>she'd've
    she'dve>she'd've she's>she's shouldve>should've shouldnt>shouldn't shouldnt've>shouldn't've
    shouldn'tve>shouldn't've somebody'd>somebodyd somebodyd've>somebody'd've somebody'dve>somebody'd've
    somebodyll>somebody'll somebodys>somebody's someoned>someone'd someoned've>someone'd've
    someone'dve>someone'd've someonell>someone'll someones>someone's somethingd>something'd
    somethingd've>something'd've something'dve>something'd've somethingll>something'll thats>that's
    thered>there'd thered've>there'd've there'dve>there'd've therere>there're theres>there's
    theyd>they'd theyd've>they'd've they'dve>they'd've theyll>they'll theyre>they're theyve>they've
    twas>'twas wasnt>wasn't wed've>we'd've we'dve>we'd've weve>we've werent>weren't whatll>what'll
    whatre>what're whats>what's whatve>what've whens>when's whered>where'd wheres>where's
    whereve>where've whod>who'd whod've>who'd've who'dve>who'd've wholl>who'll whos>who's whove>who've
    whyll>why'll whyre>why're whys>why's wont>won't wouldve>would've wouldnt>wouldn't
    wouldnt've>wouldn't've wouldn'tve>wouldn't've yall>y'all yall'll>y'all'll y'allll>y'all'll
    yall'd've>y'all'd've y'alld've>y'all'd've y'all'dve>y'all'd've youd>you'd youd've>you'd've
    you'dve>you'd've youll>you'll youre>you're youve>you've
    """.split()
)


def clean_whitespace(text: str) -> str:
    return text.replace("\n", " ").replace("\t", " ").strip()


def process_punctuation(text: str) -> str:
    """Official rule: a mark next to a space (or any mark at all, once the text holds a digit,digit
    sequence such as "1,000") is deleted, any other mark becomes a space; then periods not followed by a
    digit are deleted ("3.5" keeps its point)."""
    out = text
    delete_all = _DIGIT_COMMA_DIGIT.search(text) is not None
    for mark in _PUNCTUATION:
        touches_space = f"{mark} " in text or f" {mark}" in text
        out = out.replace(mark, "" if delete_all or touches_space else " ")
    return _PERIOD.sub("", out, count=_PERIOD_LIMIT)


def process_digit_article(text: str) -> str:
    """Lower-case; number words zero..ten (and "none") to digits; drop a/an/the; expand contractions."""
    words = [_NUMBER_WORDS.get(w, w) for w in text.lower().split()]
    words = [w for w in words if w not in _ARTICLES]
    return " ".join(_CONTRACTIONS.get(w, w) for w in words)


def normalize_vqa_answer(text: str) -> str:
    """The official answer normalisation (also what the `vqa_normalize` post-processor applies)."""
    return process_digit_article(process_punctuation(clean_whitespace(text)))


def vqa_accuracy(prediction: str, answers: Sequence[str], always_normalize: bool = False) -> float:
    """Official VQA accuracy of one prediction against the human answers (usually ten)."""
    if not answers:
        raise ValueError("VQA accuracy needs at least one human answer")
    humans = [clean_whitespace(a) for a in answers]
    prediction = clean_whitespace(prediction)
    if always_normalize or len(set(humans)) > 1:
        humans = [process_digit_article(process_punctuation(a)) for a in humans]
        prediction = process_digit_article(process_punctuation(prediction))
    matches = sum(h == prediction for h in humans)
    # Leaving out human i leaves `matches - [human i matched]` matching answers among the others.
    return sum(min(1.0, (matches - (h == prediction)) / 3) for h in humans) / len(humans)


class VQAAccuracyConfig(MetricConfig):
    type: str = "vqa_accuracy"
    always_normalize: bool = False


@METRICS.register("vqa_accuracy", config=VQAAccuracyConfig)
class VQAAccuracy(MeanMetric):
    primary = "accuracy"

    def score(self, prediction: str, example: Example) -> float:
        return vqa_accuracy(prediction, example.references, self.config.always_normalize)
