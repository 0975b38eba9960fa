"""Exact-match VQA evaluation by batched greedy generation, with per-question-type accuracy.

A sample's last assistant message is the reference answer; everything before it is the prompt.
Question types come from `sample["meta"]["types"]` when the source provides them (shapes does).
"""

from __future__ import annotations

import re
import string
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from vlbridge.data.formats import load_image
from vlbridge.tokenization import generation_kwargs

_PUNCT = re.compile(f"[{re.escape(string.punctuation)}]")


def normalize_answer(text: str) -> str:
    """Lower-case, drop punctuation and surrounding whitespace (exact match after this)."""
    return " ".join(_PUNCT.sub(" ", text.lower()).split())


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


@torch.no_grad()
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
    model.eval()
    tokenizer = processor.tokenizer
    result = VQAResult()
    for start in tqdm(range(0, len(samples), batch_size), desc="eval", disable=not progress):
        chunk = [samples[i] for i in range(start, min(start + batch_size, len(samples)))]
        prompts = [s["messages"][:-1] for s in chunk]
        images = [[load_image(ref, str(s.get("id"))) for ref in s.get("images", [])] for s in chunk]
        batch = processor(prompts, images)
        batch = {k: v.to(model.device) if torch.is_tensor(v) else v for k, v in batch.items()}
        new_tokens = model.generate(
            **batch, max_new_tokens=max_new_tokens, do_sample=False, **generation_kwargs(tokenizer)
        )
        for sample, tokens in zip(chunk, new_tokens, strict=True):
            prediction = tokenizer.decode(tokens, skip_special_tokens=True).strip()
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
