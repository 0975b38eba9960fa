"""What an eval run leaves behind: results.json (machine-readable), samples.jsonl (every answer with its
score) and report.md (tables a person reads). Scores are stored as fractions and shown x100 in tables."""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from vlbridge import __version__

from .example import Example
from .metrics import Scored
from .tasks import TaskConfig


@dataclass
class TaskResult:
    """What one task's run produced: runner.py makes it, this module writes it down."""

    task: TaskConfig
    examples: list[Example]
    prompts: list[str]  # the user turn as sent (images as <image> markers)
    raw: list[str]  # the backend's answers
    answers: list[str]  # after the task's post-processing: what the metric scored
    scored: Scored
    groups: dict[str, dict]  # group -> {"n", metrics...}
    seconds: float


def task_record(result: TaskResult) -> dict[str, Any]:
    return {
        "metrics": result.scored.summary,
        "primary": result.scored.primary,
        "n": len(result.examples),
        "groups": result.groups,
        "notes": result.scored.notes,
        "seconds": round(result.seconds, 3),
        "config": result.task.model_dump(mode="json"),
    }


def sample_records(result: TaskResult):
    for i, e in enumerate(result.examples):
        yield {
            "task": result.task.name,
            "id": e.id,
            "group": e.group,
            "prompt": result.prompts[i],
            "prediction": result.raw[i],
            "answer": result.answers[i],
            "references": e.references,
            "score": result.scored.scores[i],
        }


def write_report(out: Path, model: dict, settings: dict, results: Sequence[TaskResult]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    document = {
        "model": model,
        "settings": settings,
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "vlbridge_version": __version__,
        "tasks": {r.task.name: task_record(r) for r in results},
    }
    (out / "results.json").write_text(json.dumps(document, indent=2) + "\n")
    with (out / "samples.jsonl").open("w") as f:
        for result in results:
            for record in sample_records(result):
                f.write(json.dumps(record) + "\n")
    (out / "report.md").write_text(markdown(document, results))


def _pct(value: float) -> str:
    return f"{100 * value:.2f}"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


def markdown(document: dict, results: Sequence[TaskResult]) -> str:
    model = document["model"]
    where = model.get("path") or model.get("url")
    lines = [
        f"# Eval: {model['name']} on `{document['settings']['suite']}`",
        "",
        f"{model['backend']} `{where}`, images {model['image_position']} the text; "
        f"{document['created']}; scores x100.",
        "",
    ]
    rows = [
        [
            f"`{r.task.name}`",
            str(len(r.examples)),
            r.scored.primary,
            _pct(r.scored.summary[r.scored.primary]),
            f"{r.seconds:.1f}",
        ]
        for r in results
        if r.scored.summary
    ]
    lines += _table(["task", "n", "primary metric", "score", "seconds"], rows) + [""]
    for r in results:
        lines += [f"## {r.task.name}", "", r.task.description, ""]
        names = list(r.scored.summary)
        lines += _table(
            ["", "n", *names], [["all", str(len(r.examples)), *(_pct(r.scored.summary[k]) for k in names)]]
        )
        for group, row in r.groups.items():
            lines.append(
                "| "
                + " | ".join([group, str(row["n"]), *(_pct(row[k]) if k in row else "-" for k in names)])
                + " |"
            )
        lines += [""] + [f"- {note}" for note in r.scored.notes] + ([""] if r.scored.notes else [])
        lines += _examples(r)
    return "\n".join(lines)


def _examples(result: TaskResult, k: int = 3) -> list[str]:
    shown = [s for s in sample_records(result)][:k]
    if not shown:
        return []
    lines = ["Examples:", ""]
    for s in shown:
        prompt = s["prompt"].replace("\n", " / ").replace("`", "'")
        refs = ", ".join(repr(x) for x in s["references"][:3])
        lines.append(f"- `{prompt}` -> {s['prediction']!r} (references {refs}; score {s['score']:.2f})")
    return lines + [""]


def print_summary(out: Path, results: Sequence[TaskResult], console: Console | None = None) -> None:
    console = console or Console()
    if not console.is_terminal:
        console = Console(width=120)
    table = Table(title="eval results (x100)")
    for column in ("task", "n", "metric", "score", "seconds"):
        table.add_column(column, justify="left" if column in ("task", "metric") else "right")
    for r in results:
        for name, value in r.scored.summary.items():
            table.add_row(r.task.name, str(len(r.examples)), name, _pct(value), f"{r.seconds:.1f}")
    console.print(table)
    for r in results:
        for note in r.scored.notes:
            console.print(escape(f"{r.task.name}: {note}"))
    console.print(f"wrote {out / 'results.json'}, {out / 'samples.jsonl'}, {out / 'report.md'}")
