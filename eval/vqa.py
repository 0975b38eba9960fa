"""Held-out VQA accuracy after training: greedy answers to recipe eval samples, normalised exact match per
question type, and majority-answer baselines. Runs through the eval runner's loop and model backend.

A sample's last assistant message is the reference answer; everything before it is the prompt (laid out
as the recipe's data laid it out). Question types come from `sample["meta"]["types"]` (shapes has them).
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field

from vlbridge.data.io import load_image

from .backends import ModelBackend, Request
from .metrics.match import normalize_basic as normalize_answer
from .runner import generate_all

__all__ = ["VQAResult", "evaluate_vqa", "majority_baselines", "normalize_answer"]


def question_type(sample: dict) -> str:
    types = sample.get("meta", {}).get("types") or ["all"]
    return types[0]


@dataclass
class VQAResult:
    records: list[dict] = field(default_factory=list)

    @property
    def accuracy(self) -> float:
        return sum(r["correct"] for r in self.records) / max(len(self.records), 1)

    def per_type(self) -> dict[str, dict]:
        groups: dict[str, list[dict]] = defaultdict(list)
        for r in self.records:
            groups[r["type"]].append(r)
        return {
            t: {"accuracy": sum(r["correct"] for r in rs) / len(rs), "n": len(rs)}
            for t, rs in sorted(groups.items())
        }


def _request(sample: dict) -> Request:
    images = [load_image(ref, str(sample.get("id"))) for ref in sample.get("images", [])]
    return Request(sample["messages"][:-1], images)


def evaluate_vqa(
    model,
    processor,
    samples: Sequence[dict],
    *,
    batch_size: int = 64,
    max_new_tokens: int = 16,
    progress: bool = True,
) -> VQAResult:
    """Greedy answers for every sample, scored by normalised exact match."""
    backend = ModelBackend(model, processor)
    predictions = generate_all(
        backend,
        samples,
        batch_size=batch_size,
        max_new_tokens=max_new_tokens,
        progress=progress,
        build=_request,
    )
    result = VQAResult()
    for i, prediction in enumerate(predictions):
        sample = samples[i]
        reference = sample["messages"][-1]["content"]
        result.records.append(
            {
                "id": sample.get("id"),
                "type": question_type(sample),
                "question": prompts_text(sample),
                "answer": reference,
                "prediction": prediction,
                "correct": normalize_answer(prediction) == normalize_answer(reference),
            }
        )
    return result


def prompts_text(sample: dict) -> str:
    return (
        sample["messages"][-2]["content"].replace("<image>", "").strip()
        if len(sample["messages"]) > 1
        else ""
    )


def majority_baselines(train: Sequence[dict], test: Sequence[dict]) -> dict[str, dict]:
    """Per type: the most common training answer, and its accuracy when always given on `test`."""
    train_answers: dict[str, Counter] = defaultdict(Counter)
    for s in train:
        meta = s.get("meta", {})
        for t, a in zip(meta.get("types", []), meta.get("answers", []), strict=False):
            train_answers[t][normalize_answer(a)] += 1
    out = {}
    test_by_type: dict[str, list[str]] = defaultdict(list)
    for s in test:
        test_by_type[question_type(s)].append(normalize_answer(s["messages"][-1]["content"]))
    for t, answers in sorted(test_by_type.items()):
        if not train_answers[t]:
            continue
        best = train_answers[t].most_common(1)[0][0]
        out[t] = {"answer": best, "accuracy": sum(a == best for a in answers) / len(answers)}
    return out
