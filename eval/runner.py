"""The one eval loop: load a task's examples, ask the backend in batches, post-process, score, break down.

Every task runs through `run_task`; datasets differ only in their loader, prompt template, post-processing
and metric (all named in the task YAML). Answers are greedy, so scores do not depend on the batch size.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

from tqdm.auto import tqdm

from vlbridge.errors import ConfigError

from .backends import Backend, Request
from .example import Example
from .loaders import load_examples
from .metrics import build_metric
from .report import TaskResult, print_summary, write_report
from .tasks import TaskConfig, chat_messages, load_suite, postprocess, render_prompt


def generate_all(
    backend: Backend,
    requests: Sequence[Request] | Sequence,
    *,
    batch_size: int,
    max_new_tokens: int,
    desc: str = "eval",
    progress: bool = True,
    build=None,
) -> list[str]:
    """Answers for every item, `batch_size` at a time (`build` turns an item into a Request lazily)."""
    if batch_size < 1:
        raise ConfigError(f"batch size must be at least 1, got {batch_size}")
    answers: list[str] = []
    with tqdm(total=len(requests), desc=desc, disable=not progress, unit="q") as bar:
        for start in range(0, len(requests), batch_size):
            chunk = [requests[i] for i in range(start, min(start + batch_size, len(requests)))]
            batch = [build(item) for item in chunk] if build else chunk
            answers += backend.generate(batch, max_new_tokens)
            bar.update(len(chunk))
    return answers


def task_request(task: TaskConfig, example: Example, image_position: str) -> tuple[str, Request]:
    images = example.load_images()
    messages = chat_messages(render_prompt(task, example), len(images), image_position)
    return messages[-1]["content"], Request(messages, images)


def run_task(
    task: TaskConfig,
    backend: Backend,
    *,
    limit: int | None = None,
    batch_size: int = 16,
    progress: bool = True,
) -> TaskResult:
    """Examples are read one batch at a time; only their text is kept for scoring (a full VQAv2 run never
    holds its images in memory)."""
    started = time.perf_counter()
    source = load_examples(task.data)
    n = len(source) if limit is None else min(limit, len(source))
    examples: list[Example] = []
    prompts: list[str] = []

    def build(index: int) -> Request:
        example = source[index]
        text, request = task_request(task, example, backend.image_position)
        prompts.append(text)
        examples.append(replace(example, images=[]))
        return request

    raw = generate_all(
        backend,
        range(n),
        batch_size=batch_size,
        max_new_tokens=task.max_new_tokens,
        desc=task.name,
        progress=progress,
        build=build,
    )
    answers = [postprocess(task, r) for r in raw]
    metric = build_metric(task.metric)
    scored = metric.compute(answers, examples)
    groups = group_breakdown(metric, answers, examples)
    return TaskResult(task, examples, prompts, raw, answers, scored, groups, time.perf_counter() - started)


def group_breakdown(metric, answers: list[str], examples: list[Example]) -> dict[str, dict]:
    """The metric on each group's subset (corpus metrics recomputed, not averaged), if there are groups."""
    index: dict[str, list[int]] = defaultdict(list)
    for i, e in enumerate(examples):
        if e.group is not None:
            index[str(e.group)].append(i)
    if not index or (len(index) == 1 and len(next(iter(index.values()))) == len(examples)):
        return {}
    out = {}
    for group, ix in sorted(index.items()):
        scored = metric.compute([answers[i] for i in ix], [examples[i] for i in ix])
        out[group] = {"n": len(ix), **scored.summary}
    return out


def run_eval(
    backend: Backend,
    *,
    suite: str | None,
    tasks: list[str] | None = None,
    overrides: list[str] | None = None,
    limit: int | None = None,
    batch_size: int = 16,
    output: str | Path | None = None,
    progress: bool = True,
) -> Path:
    """Run a suite (and/or tasks) and write results.json, samples.jsonl and report.md; returns the folder."""
    if limit is not None and limit < 1:
        raise ConfigError(f"--limit must be at least 1, got {limit}")
    suite_name, configs = load_suite(suite, tasks, overrides)
    out = Path(output or Path("runs") / "eval" / f"{backend.describe()['name']}-{suite_name}")
    settings = {"suite": suite_name, "limit": limit, "batch_size": batch_size, "overrides": overrides or []}
    try:
        results = [
            run_task(t, backend, limit=limit, batch_size=batch_size, progress=progress) for t in configs
        ]
    finally:
        backend.close()
    write_report(out, backend.describe(), settings, results)
    print_summary(out, results)
    return out
