"""Captioning metrics exactly as the COCO caption evaluation computes them (pycocoevalcap).

References and predictions go through pycocoevalcap's PTB tokenizer (Stanford CoreNLP's, run with Java),
then BLEU-1..4, METEOR, ROUGE-L and CIDEr (corpus-level: CIDEr's document frequencies come from the
references of the evaluated set). SPICE needs Stanford CoreNLP jars that pycocoevalcap downloads on first
use; when they are not installed it is reported as unavailable instead of attempting a download.
"""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from pathlib import Path

from vlbridge.errors import ConfigError

from ..example import Example
from .base import METRICS, Metric, MetricConfig, Scored

CORENLP_JARS = ("stanford-corenlp-3.6.0.jar", "stanford-corenlp-3.6.0-models.jar")


def require_java() -> None:
    if shutil.which("java") is None:
        raise ConfigError(
            "caption metrics need Java (pycocoevalcap's PTB tokenizer and METEOR run on it); install a JRE, "
            "e.g. `apt-get install -y default-jre-headless`"
        )


def spice_missing_jars() -> list[str]:
    """The CoreNLP jars SPICE needs that are not installed beside pycocoevalcap (empty: SPICE can run)."""
    import pycocoevalcap.spice as spice

    lib = Path(spice.__file__).parent / "lib"
    return [jar for jar in CORENLP_JARS if not (lib / jar).is_file()]


def coco_caption_scores(
    references: Sequence[Sequence[str]], predictions: Sequence[str], spice: bool = False
) -> tuple[dict[str, float], dict[str, list[float]], list[str]]:
    """(corpus scores, per-caption scores, notes) of `predictions[i]` against `references[i]`."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.meteor.meteor import Meteor
    from pycocoevalcap.rouge.rouge import Rouge
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    require_java()
    keys = [f"{i:09d}" for i in range(len(predictions))]
    tokenizer = PTBTokenizer()
    gts = tokenizer.tokenize(
        {k: [{"caption": r} for r in refs] for k, refs in zip(keys, references, strict=True)}
    )
    res = tokenizer.tokenize({k: [{"caption": p}] for k, p in zip(keys, predictions, strict=True)})
    corpus: dict[str, float] = {}
    per_caption: dict[str, list[float]] = {}
    bleu, bleu_each = Bleu(4).compute_score(gts, res, verbose=0)
    for n in range(4):
        corpus[f"BLEU-{n + 1}"], per_caption[f"BLEU-{n + 1}"] = bleu[n], list(bleu_each[n])
    scorers = [("METEOR", Meteor), ("ROUGE-L", Rouge), ("CIDEr", Cider)]
    notes = []
    if spice:
        if missing := spice_missing_jars():
            notes.append(f"SPICE unavailable: Stanford CoreNLP jars not installed ({', '.join(missing)})")
        else:
            from pycocoevalcap.spice.spice import Spice

            scorers.append(("SPICE", Spice))
    for name, scorer_class in scorers:
        score, each = scorer_class().compute_score(gts, res)
        corpus[name] = float(score)
        per_caption[name] = [float(e["All"]["f"]) if isinstance(e, dict) else float(e) for e in each]
    return corpus, per_caption, notes


class CaptionConfig(MetricConfig):
    type: str = "caption"
    spice: bool = False


@METRICS.register("caption", config=CaptionConfig)
class Caption(Metric):
    """Per-sample score: that caption's CIDEr (against the corpus statistics)."""

    primary = "CIDEr"

    def compute(self, predictions: Sequence[str], examples: Sequence[Example]) -> Scored:
        if not predictions:
            return Scored({}, [], self.primary)
        refs = [e.references for e in examples]
        corpus, per_caption, notes = coco_caption_scores(refs, predictions, spice=self.config.spice)
        return Scored(corpus, per_caption[self.primary], self.primary, notes)
