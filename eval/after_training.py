"""After `vlbridge train`: VQA accuracy per question type beside majority-answer baselines, example answers.

The CLI hands `evaluate_and_report` to `run_training`, so the training core never imports the eval app.
"""

from __future__ import annotations

import time

from rich.console import Console
from rich.table import Table

from vlbridge.data.formats import load_source
from vlbridge.data.io import load_image
from vlbridge.recipe import Recipe

from .vqa import evaluate_vqa, majority_baselines


def evaluate_and_report(recipe: Recipe, model, processor, train_data, console: Console) -> dict:
    samples = load_source(recipe.data.eval)
    started = time.perf_counter()
    result = evaluate_vqa(
        model,
        processor,
        samples,
        batch_size=recipe.eval.batch_size,
        max_new_tokens=recipe.eval.max_new_tokens,
    )
    eval_seconds = time.perf_counter() - started
    baselines = majority_baselines(train_data, samples)
    per_type = result.per_type()
    for t, row in per_type.items():
        row.update(
            {
                "majority_answer": baselines.get(t, {}).get("answer"),
                "majority_baseline": baselines.get(t, {}).get("accuracy"),
            }
        )
    examples = save_examples(recipe, samples, result.records[: recipe.eval.examples])
    console.print(results_table(result.accuracy, per_type))
    for ex in examples:
        console.print(
            f"example: [bold]{ex['question']}[/] -> {ex['prediction']!r} (reference {ex['answer']!r}); "
            f"image {ex['image']}"
        )
    return {
        "accuracy": result.accuracy,
        "per_type": per_type,
        "n_eval": len(result.records),
        "eval_seconds": eval_seconds,
        "examples": examples,
    }


def results_table(overall: float, per_type: dict[str, dict]) -> Table:
    table = Table(title=f"held-out accuracy: {overall:.1%}")
    for column in ("question type", "n", "accuracy", "majority baseline", "gain"):
        table.add_column(column, justify="left" if column == "question type" else "right")
    for t, row in per_type.items():
        base = row.get("majority_baseline")
        table.add_row(
            t,
            str(row["n"]),
            f"{row['accuracy']:.1%}",
            "-" if base is None else f"{base:.1%} ({row['majority_answer']})",
            "-" if base is None else f"{100 * (row['accuracy'] - base):+.1f}",
        )
    return table


def save_examples(recipe: Recipe, samples, records: list[dict]) -> list[dict]:
    """Write the example images next to the run so `vlbridge chat` can be tried on them."""
    out = []
    folder = recipe.run_dir / "examples"
    folder.mkdir(parents=True, exist_ok=True)
    by_id = {str(s.get("id")): s for s in samples[: max(len(records) * 4, 16)]}
    for i, record in enumerate(records):
        sample = by_id.get(str(record["id"]))
        path = folder / f"example-{i}.png"
        if sample and sample.get("images"):
            load_image(sample["images"][0]).save(path)
        out.append({k: record[k] for k in ("question", "answer", "prediction")} | {"image": str(path)})
    return out
