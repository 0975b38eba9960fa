"""`vlbridge eval compare DIR...`: several eval runs side by side, as a printed table and bar charts (PNG)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from vlbridge.errors import ConfigError, DataError


def load_run(folder: str | Path) -> dict:
    path = Path(folder) / "results.json"
    if not path.is_file():
        raise ConfigError(
            f"{folder} is not an eval output folder (no results.json); run `vlbridge eval` first"
        )
    try:
        document = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise DataError(f"{path}: invalid JSON ({err.msg})") from err
    document["label"] = Path(folder).name
    return document


def _primary(run: dict, task: str) -> str:
    return run["tasks"][task]["primary"]


def comparison_rows(runs: Sequence[dict]) -> list[tuple[str, str, list[float | None]]]:
    """(task or "task [group]", metric, value per run or None): every metric of every task (primary first),
    then each group's primary metric."""
    rows: dict[tuple[str, str], list[float | None]] = {}
    for k, run in enumerate(runs):
        for task, record in run["tasks"].items():
            primary = record["primary"]
            metrics = sorted(record["metrics"].items(), key=lambda item: item[0] != primary)
            cells = [((task, name), value) for name, value in metrics]
            cells += [
                ((f"{task} [{g}]", primary), row.get(primary)) for g, row in record.get("groups", {}).items()
            ]
            for key, value in cells:
                rows.setdefault(key, [None] * len(runs))[k] = value
    order = sorted(rows, key=lambda key: (key[0].split(" [")[0], " [" in key[0]))
    return [(task, metric, rows[(task, metric)]) for task, metric in order]


def print_table(runs: Sequence[dict], rows, console: Console | None = None) -> None:
    console = console or Console()
    if not console.is_terminal:
        console = Console(width=max(120, 32 + 18 * len(runs)))
    table = Table(title="eval comparison (x100)")
    table.add_column("task")
    table.add_column("metric")
    for run in runs:
        table.add_column(run["label"], justify="right")
    for task, metric, values in rows:
        table.add_row(escape(task), metric, *("-" if v is None else f"{100 * v:.2f}" for v in values))
    console.print(table)


def _bars(ax, runs: Sequence[dict], categories: list[str], value_of, title: str) -> None:
    width = 0.8 / len(runs)
    for k, run in enumerate(runs):
        values = [value_of(run, c) for c in categories]
        xs = [i + (k - (len(runs) - 1) / 2) * width for i in range(len(categories))]
        bars = ax.bar(xs, [0.0 if v is None else 100 * v for v in values], width, label=run["label"])
        ax.bar_label(
            bars, labels=["-" if v is None else f"{100 * v:.1f}" for v in values], fontsize=7, padding=2
        )
    ax.set_xticks(range(len(categories)), categories, fontsize=8)
    ax.set_title(title, fontsize=10)
    ax.margins(y=0.15)


def plot(runs: Sequence[dict], path: Path) -> Path:
    """Panel 1: each task's primary metric, one bar per run. Then one panel per task with groups (answer
    types, POPE categories, ...): that metric per group. Values x100 on the bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = sorted({t for run in runs for t in run["tasks"]})
    grouped = [t for t in tasks if any(run["tasks"].get(t, {}).get("groups") for run in runs)]
    panels = 1 + len(grouped)
    cols = min(panels, 3)
    rows = -(-panels // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5.5 * cols, 4.2 * rows), squeeze=False)
    flat = list(axes.flat)

    def task_value(run, label):
        task = label.split("\n")[0]
        return run["tasks"][task]["metrics"][_primary(run, task)] if task in run["tasks"] else None

    labels = [f"{t}\n{next(_primary(r, t) for r in runs if t in r['tasks'])}" for t in tasks]
    _bars(flat[0], runs, labels, task_value, "primary metric per task (x100)")
    flat[0].legend(fontsize=7)
    for ax, task in zip(flat[1:], grouped, strict=False):
        groups = sorted({g for run in runs for g in run["tasks"].get(task, {}).get("groups", {})})
        metric = next(_primary(r, task) for r in runs if task in r["tasks"])

        def group_value(run, group, task=task, metric=metric):
            return run["tasks"].get(task, {}).get("groups", {}).get(group, {}).get(metric)

        _bars(ax, runs, groups, group_value, f"{task}: {metric} per group (x100)")
    for ax in flat[panels:]:
        ax.set_visible(False)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def compare(folders: Sequence[str], output: str | Path | None = None) -> Path:
    if not folders:
        raise ConfigError("name the eval output folders to compare: vlbridge eval compare DIR DIR ...")
    runs = [load_run(f) for f in folders]
    if len({r["label"] for r in runs}) < len(runs):  # same folder names: label by the last two path parts
        for run, folder in zip(runs, folders, strict=True):
            run["label"] = "/".join(Path(folder).resolve().parts[-2:])
    print_table(runs, comparison_rows(runs))
    path = Path(output) if output else Path(folders[0]).resolve().parent / "compare.png"
    plot(runs, path)
    print(f"wrote {path}")
    return path
