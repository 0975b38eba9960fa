"""Caption metrics: the same numbers as pycocoevalcap's scorers called directly after its PTB tokenizer."""

from __future__ import annotations

import pytest

from vlbridge.eval.example import Example
from vlbridge.eval.metrics import build_metric
from vlbridge.eval.metrics.caption import CaptionConfig

REFERENCES = [
    [
        "A man riding a wave on top of a surfboard.",
        "A surfer rides a large wave.",
        "Someone surfing in the ocean.",
    ],
    [
        "Two dogs play with a frisbee in the park.",
        "Dogs playing in a grassy field.",
        "Two brown dogs run on grass.",
    ],
    ["A plate of food with broccoli and rice.", "Rice, broccoli and chicken on a plate."],
    ["A red bus parked beside the road.", "A double-decker bus on a city street.", "A bus on the street."],
]
PREDICTIONS = [
    "A surfer riding a big wave.",
    "Two dogs playing in the grass.",
    "A plate with rice and broccoli.",
    "",  # an empty answer still gets scored (zero), as the COCO evaluation does
]


def direct_scores() -> dict[str, float]:
    """The COCO caption evaluation by hand: integer image ids, tokenizer, each scorer."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.meteor.meteor import Meteor
    from pycocoevalcap.rouge.rouge import Rouge
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    ids = [391895, 522418, 184613, 318219]
    gts = {i: [{"caption": c} for c in refs] for i, refs in zip(ids, REFERENCES, strict=True)}
    res = {i: [{"caption": p}] for i, p in zip(ids, PREDICTIONS, strict=True)}
    tokenizer = PTBTokenizer()
    gts, res = tokenizer.tokenize(gts), tokenizer.tokenize(res)
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    out = {f"BLEU-{n + 1}": bleu[n] for n in range(4)}
    out["METEOR"], _ = Meteor().compute_score(gts, res)
    out["ROUGE-L"], _ = Rouge().compute_score(gts, res)
    out["CIDEr"], per_image = Cider().compute_score(gts, res)
    out["per_image_cider"] = list(per_image)
    return out


@pytest.fixture(scope="module")
def scored():
    examples = [Example(str(i), [], {}, refs) for i, refs in enumerate(REFERENCES)]
    return build_metric(CaptionConfig(spice=True)).compute(PREDICTIONS, examples)


def test_equals_pycocoevalcap_called_directly(scored):
    expected = direct_scores()
    for name in ("BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr"):
        assert scored.summary[name] == pytest.approx(expected[name], abs=1e-12), name
    assert scored.scores == pytest.approx(expected["per_image_cider"], abs=1e-12)
    assert scored.primary == "CIDEr" and scored.scores[3] == 0.0
    assert 0.0 < scored.summary["CIDEr"] and scored.summary["BLEU-1"] > scored.summary["BLEU-4"]


def test_spice_reports_unavailable_instead_of_downloading(scored):
    assert "SPICE" not in scored.summary
    assert any("SPICE unavailable" in note and "stanford-corenlp" in note for note in scored.notes)
