"""How `vlbridge bench` results read: ratio columns, the markdown report, the console table, the plot."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.table import Table

if TYPE_CHECKING:
    from .bench import BenchConfig

METRICS: dict[str, tuple[str, str]] = {  # key -> (column title, format)
    "visual_tokens": ("visual tok", "{:,.0f}"),
    "llm_visual_kept": ("LLM visual kept", "{:.3f}"),  # mean over decoder layers of processed / entering
    "sequence_length": ("seq len", "{:,.0f}"),
    "trainable_params": ("trainable", "{:,.0f}"),
    "train_step_s": ("train step s", "{:.4f}"),
    "train_peak_mb": ("train step peak MB", "{:,.1f}"),
    "embed_s": ("front-end s", "{:.4f}"),  # tower + connector + splice
    "llm_prefill_s": ("LLM prefill s", "{:.4f}"),
    "prefill_s": ("prefill s", "{:.4f}"),  # front-end + LLM prefill
    "generate_s": ("generate s", "{:.4f}"),  # end to end: prefill + new_tokens decode steps
    "decode_tokens_per_s": ("decode tok/s", "{:,.1f}"),
    "prefill_peak_mb": ("prefill peak MB", "{:,.1f}"),
    "prefill_gflops": ("prefill GFLOPs", "{:,.2f}"),
    "tower_gflops": ("front-end GFLOPs", "{:,.2f}"),
    "tower_gflops_analytic": ("front-end GFLOPs formula", "{:,.2f}"),  # ViT towers (llava) only
    "llm_gflops": ("LLM GFLOPs", "{:,.2f}"),
    "llm_gflops_analytic": ("LLM GFLOPs formula", "{:,.2f}"),
    "kv_cache_mb": ("KV cache MB", "{:,.2f}"),
    "visual_kv_entries": ("visual KV entries", "{:,.0f}"),  # over all decoder layers, from the cache
}
RATIO_KEYS = (
    "train_step_s",
    "train_peak_mb",
    "embed_s",
    "llm_prefill_s",
    "prefill_s",
    "generate_s",
    "decode_tokens_per_s",
    "prefill_gflops",
    "tower_gflops",
    "tower_gflops_analytic",
    "llm_gflops",
    "llm_gflops_analytic",
    "kv_cache_mb",
    "visual_kv_entries",
    "trainable_params",
)


def _cell(result: dict[str, Any], key: str) -> str:
    if result.get(key) is None:
        return "-"
    text = METRICS[key][1].format(result[key])
    ratio = result.get(f"{key}_ratio")
    return f"{text} ({ratio:.2f}x)" if ratio is not None else text


def _columns(results: list[dict[str, Any]]) -> list[str]:
    return [k for k in METRICS if any(r.get(k) is not None for r in results)]


def markdown(config: BenchConfig, results: list[dict[str, Any]], device: str) -> str:
    cols = _columns(results)
    lines = [
        f"# bench: {config.name}",
        "",
        f"device {device}, batch {config.batch_size}, prompt {config.prompt_words} words, "
        f"{config.new_tokens} new tokens, median of {config.repeats}; ratios against `{config.baseline}`.",
        "",
        "| case | image | " + " | ".join(METRICS[k][0] for k in cols) + " |",
        "|---|---|" + "---|" * len(cols),
    ]
    for r in results:
        size = r["image_size"] if isinstance(r["image_size"], int) else "x".join(map(str, r["image_size"]))
        lines.append(f"| {r['name']} | {size} | " + " | ".join(_cell(r, k) for k in cols) + " |")
    return "\n".join(lines) + "\n"


def console_table(config: BenchConfig, results: list[dict[str, Any]]) -> Table:
    cols = _columns(results)
    table = Table(title=f"bench {config.name} (ratios vs {config.baseline})")
    table.add_column("case")
    for k in cols:
        table.add_column(METRICS[k][0], justify="right")
    for r in results:
        table.add_row(r["name"], *(_cell(r, k) for k in cols))
    return table


def _side(result: dict[str, Any]) -> int:
    size = result["image_size"]
    return size if isinstance(size, int) else max(size)


def plot(results: list[dict[str, Any]], path: Path) -> bool:
    """Bars per case for time and memory, plus prefill time / peak memory against image side for each
    case group (resolution sweeps). False when matplotlib (the `eval` extra) is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    shown = ("train_step_s", "prefill_s", "generate_s", "prefill_peak_mb")
    keys = [k for k in shown if any(k in r for r in results)]
    groups = sorted({r["group"] for r in results if r["group"]})
    sweeps = [k for k in ("prefill_s", "prefill_peak_mb") if groups and k in keys]
    n = len(keys) + len(sweeps)
    fig, axes = plt.subplots(1, n, figsize=(4.5 * n, 4), squeeze=False)
    for ax, key in zip(axes[0], keys, strict=False):
        rows = [r for r in results if key in r]
        ax.bar(range(len(rows)), [r[key] for r in rows], color="tab:blue")
        ax.set_xticks(range(len(rows)), [r["name"] for r in rows], rotation=45, ha="right", fontsize=8)
        ax.set_title(METRICS[key][0])
    for ax, key in zip(axes[0][len(keys) :], sweeps, strict=True):
        for group in groups:
            rows = sorted((r for r in results if r["group"] == group), key=_side)
            ax.plot([_side(r) for r in rows], [r[key] for r in rows], marker="o", label=group)
        ax.set_xlabel("image side (px)")
        ax.set_title(f"{METRICS[key][0]} vs resolution")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True
