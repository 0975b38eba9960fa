"""Tasks and suites: a task is a YAML (data source, prompt template, post-processing, metric) in this
folder; a suite is a list of tasks in `eval/suites/`. Both are found by name (`TASKS`, `SUITES`) or path.

Prompts are Jinja templates over the example's fields (`{{ question }}`, `{{ options }}`, ...); where the
images go (before or after the text) is the backend's choice, because it must match how the model was
trained (`VLConfig.image_position`).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import yaml
from jinja2 import StrictUndefined, TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment
from pydantic import Field, SerializeAsAny, ValidationError, field_validator

from vlbridge.config import IMAGE_MARKER, Strict, dispatch_on_type, format_validation_error
from vlbridge.errors import ConfigError, DataError
from vlbridge.processing import place_images
from vlbridge.recipe import apply_override
from vlbridge.registry import Registry

from ..example import Example
from ..loaders import LOADERS, SourceConfig
from ..metrics import METRICS, MetricConfig
from ..metrics.vqa import normalize_vqa_answer

TASK_DIR = Path(__file__).parent
SUITE_DIR = TASK_DIR.parent / "suites"

POSTPROCESSORS: Registry[Callable[[str], str]] = Registry("answer post-processor")
POSTPROCESSORS.register("strip")(str.strip)
POSTPROCESSORS.register("first_line")(lambda text: text.strip().split("\n", 1)[0].strip())
POSTPROCESSORS.register("lower")(str.lower)
POSTPROCESSORS.register("strip_period")(lambda text: text.strip().rstrip("."))
POSTPROCESSORS.register("vqa_normalize")(normalize_vqa_answer)


class TaskConfig(Strict):
    """One benchmark: where its data is, how to ask, how to read and score the answer."""

    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    description: str = ""
    data: Annotated[SerializeAsAny[SourceConfig], dispatch_on_type(LOADERS, SourceConfig)]
    prompt: str
    postprocess: list[str] = Field(default_factory=lambda: ["strip"])
    metric: Annotated[SerializeAsAny[MetricConfig], dispatch_on_type(METRICS, MetricConfig)]
    max_new_tokens: int = Field(default=16, ge=1)

    @field_validator("postprocess")
    @classmethod
    def _known(cls, names: list[str]) -> list[str]:
        for name in names:
            POSTPROCESSORS.entry(name)
        return names

    @field_validator("prompt")
    @classmethod
    def _no_image_marker(cls, prompt: str) -> str:
        if IMAGE_MARKER in prompt:
            raise ValueError(f"{IMAGE_MARKER} does not belong in a prompt: images are placed by the backend")
        return prompt


_JINJA = ImmutableSandboxedEnvironment(undefined=StrictUndefined, keep_trailing_newline=False)


def render_prompt(task: TaskConfig, example: Example) -> str:
    try:
        return _JINJA.from_string(task.prompt).render(**example.fields).strip()
    except TemplateError as err:
        raise DataError(
            f"task {task.name}: prompt template failed on example {example.id} ({err}); fields available: "
            f"{', '.join(sorted(example.fields)) or 'none'}"
        ) from err


def postprocess(task: TaskConfig, text: str) -> str:
    for name in task.postprocess:
        text = POSTPROCESSORS.get(name)(text)
    return text


def chat_messages(text: str, n_images: int, image_position: str) -> list[dict]:
    """One user turn with `n_images` markers before or after the text, one per line."""
    return [
        {
            "role": "user",
            "content": place_images(text, n_images, marker=IMAGE_MARKER, position=image_position),
        }
    ]


# ------------------------------------------------------------------------------------------ lookup


def _names(folder: Path) -> list[str]:
    return sorted(p.stem for p in folder.glob("*.yaml"))


def _yaml_tree(path: Path, what: str) -> dict:
    try:
        tree = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path} is not valid YAML: {err}") from err
    if not isinstance(tree, dict):
        raise ConfigError(f"{path}: a {what} YAML must be a mapping")
    return tree


def _find(name_or_path: str, folder: Path, what: str) -> Path:
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml"):
        if not path.is_file():
            raise ConfigError(f"{what} file not found: {path}")
        return path
    candidate = folder / f"{name_or_path}.yaml"
    if not candidate.is_file():
        raise ConfigError(f"unknown {what} {name_or_path!r}; available: {', '.join(_names(folder))}")
    return candidate


def task_names() -> list[str]:
    return _names(TASK_DIR)


def suite_names() -> list[str]:
    return _names(SUITE_DIR)


def load_task(name_or_path: str, overrides: dict[str, Any] | None = None) -> TaskConfig:
    """A task by name (`eval/tasks/<name>.yaml`) or YAML path, with a nested dict of overrides merged in."""
    from vlbridge.config import deep_merge

    path = _find(name_or_path, TASK_DIR, "eval task")
    tree = deep_merge(_yaml_tree(path, "task"), overrides or {})
    try:
        return TaskConfig.model_validate(tree)
    except ValidationError as err:
        raise ConfigError(format_validation_error(err, str(path), "eval task")) from None


class SuiteConfig(Strict):
    """A list of task names; `overrides` adjusts a task for this suite ({task: {data: {n: 200}}})."""

    name: str
    description: str = ""
    tasks: list[str] = Field(min_length=1)
    overrides: dict[str, dict[str, Any]] = Field(default_factory=dict)


def load_suite(name_or_path: str | None, tasks: list[str] | None = None, overrides: list[str] | None = None):
    """(suite name, [TaskConfig]) from a suite and/or task names; `overrides` are `task.key.sub=value`."""
    if name_or_path:
        path = _find(name_or_path, SUITE_DIR, "eval suite")
        try:
            suite = SuiteConfig.model_validate(_yaml_tree(path, "suite"))
        except ValidationError as err:
            raise ConfigError(format_validation_error(err, str(path), "eval suite")) from None
    else:
        if not tasks:
            raise ConfigError(
                "name a suite (--suite shapes) or tasks (--task vqav2); suites: " + ", ".join(suite_names())
            )
        suite = SuiteConfig(name="+".join(Path(t).stem for t in tasks), tasks=tasks)
    names = suite.tasks + [t for t in tasks or [] if t not in suite.tasks]
    if unknown := sorted(set(suite.overrides) - set(names)):
        raise ConfigError(f"suite {suite.name}: overrides for tasks it does not run: {', '.join(unknown)}")
    per_task = {name: dict(suite.overrides.get(name, {})) for name in names}
    for item in overrides or []:
        head = re.split(r"[.=]", item, maxsplit=1)[0]
        if head not in per_task:
            raise ConfigError(f"override {item!r} names no task of this run; tasks: {', '.join(names)}")
        apply_override(per_task, item)
    return suite.name, [load_task(name, per_task[name]) for name in names]
