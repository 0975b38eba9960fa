"""Recipes: YAML instances of the typed configs below, with `key.sub=value` command-line overrides.

Everything a run needs (model, tokenizer, data, training stages, evaluation) is validated here, at
the edge; errors name the key and the value seen. The resolved recipe is saved in every run dir.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, Field, SerializeAsAny, ValidationError, field_validator, model_validator

from .config import (
    ReducerConfig,
    Strict,
    TokenizerConfig,
    VLConfig,
    dispatch_on_type,
    format_validation_error,
)
from .data.formats import DataSourceConfig
from .errors import ConfigError
from .registry import DATA_FORMATS, DISTRIBUTED, REDUCERS
from .training.distributed import DistributedConfig

DataSource = Annotated[SerializeAsAny[DataSourceConfig], dispatch_on_type(DATA_FORMATS, DataSourceConfig)]
Distributed = Annotated[SerializeAsAny[DistributedConfig], dispatch_on_type(DISTRIBUTED, DistributedConfig)]
Mode = Literal["frozen", "lora", "full"]
M = TypeVar("M", bound=BaseModel)


class LoRASettings(Strict):
    r: int = Field(default=16, ge=1)
    alpha: float = 32.0
    dropout: float = Field(default=0.05, ge=0.0, lt=1.0)
    target_modules: list[str] | str = "all-linear"


class StageConfig(Strict):
    """One training stage: what each module group does (frozen | lora | full) and its optimisation."""

    name: str
    modules: dict[str, Mode]
    steps: int = Field(ge=1)
    lr: float = Field(default=1e-3, gt=0)
    module_lr: dict[str, float] = Field(default_factory=dict)
    batch_size: int = Field(default=16, ge=1)
    grad_accum: int = Field(default=1, ge=1)
    warmup_steps: int = Field(default=0, ge=0)
    min_lr_ratio: float = Field(default=0.0, ge=0.0, le=1.0)
    weight_decay: float = Field(default=0.0, ge=0.0)
    max_grad_norm: float | None = Field(default=1.0, gt=0)
    data: DataSource | None = None


class TrainConfig(Strict):
    stages: list[StageConfig] = Field(min_length=1)
    lora: LoRASettings = Field(default_factory=LoRASettings)
    save_every: int = Field(default=0, ge=0)
    keep_checkpoints: int = Field(default=2, ge=1)
    log_every: int = Field(default=10, ge=1)
    tensorboard: bool = False
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = "auto"
    preencode: bool = Field(default=True, description="encode all samples before the loop (small datasets)")
    # without preencode: DataLoader worker processes that read, decode and encode micro-batches ahead
    num_workers: int = Field(default=0, ge=0)
    # random: a fresh permutation per epoch; length_grouped: LLaVA's modality- and length-grouped batches
    sampler: Literal["random", "length_grouped"] = "random"
    # recompute the LLM's decoder layers and the vision tower's blocks in backward (non-reentrant): activation
    # memory for compute
    gradient_checkpointing: bool = False
    # how ranks share the model: ddp (replicas), fsdp (torch FSDP2 shards), deepspeed (ZeRO); a name or a
    # section with the engine's options, e.g. {type: fsdp, reshard_after_forward: false}
    distributed: Distributed = Field(default_factory=DistributedConfig)

    @field_validator("stages")
    @classmethod
    def _unique_names(cls, stages: list[StageConfig]) -> list[StageConfig]:
        names = [s.name for s in stages]
        if len(set(names)) != len(names):
            raise ValueError(f"stage names must be unique, got {names}")
        return stages


class DataConfig(Strict):
    train: DataSource
    eval: DataSource | None = None


class EvalConfig(Strict):
    batch_size: int = Field(default=64, ge=1)
    max_new_tokens: int = Field(default=16, ge=1)
    examples: int = Field(default=1, ge=0)


class InitFrom(Strict):
    """A checkpoint to fine-tune: vlbridge's own or one `vlbridge chat` opens (transformers' LLaVA /
    LLaVA-NeXT). Its model, tokenizer and processor are the run's; `reducers` join it (p-MoD's routers then
    train in the recipe's stages)."""

    path: str
    reducers: list[Annotated[SerializeAsAny[ReducerConfig], dispatch_on_type(REDUCERS, ReducerConfig)]] = (
        Field(default_factory=list)
    )


class Recipe(Strict):
    """A whole run: `vlbridge train recipe.yaml key.sub=value ...`."""

    name: str
    output_dir: str | None = None
    seed: int = 0
    model: VLConfig | None = None  # a model built from this config, or (init_from) a checkpoint's
    init_from: InitFrom | None = None
    tokenizer: TokenizerConfig = Field(default_factory=TokenizerConfig)
    data: DataConfig
    train: TrainConfig
    eval: EvalConfig = Field(default_factory=EvalConfig)

    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir or f"runs/{self.name}")

    @model_validator(mode="after")
    def _one_model(self) -> Recipe:
        if (self.model is None) == (self.init_from is None):
            raise ValueError(
                "give the model either as `model:` (built from this config) or as `init_from: {path: ...}` "
                "(a checkpoint to fine-tune), exactly one of them"
            )
        return self


def apply_override(tree: dict, dotted: str) -> None:
    """Set `a.b.0.c=value` in a nested dict/list tree; the value is parsed as YAML (numbers, lists, ...)."""
    if "=" not in dotted:
        raise ConfigError(f"override {dotted!r} is not of the form key.sub=value")
    key, raw = dotted.split("=", 1)
    value = yaml.safe_load(raw) if raw else ""
    parts = key.strip().split(".")
    node: Any = tree
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise ConfigError(f"override {key!r}: {'.'.join(parts[:i])} has no item {part!r}")
            part = int(part)
        elif not isinstance(node, dict):
            raise ConfigError(f"override {key!r}: {'.'.join(parts[:i])} is not a section")
        if last:
            node[part] = value
        else:
            if isinstance(node, dict) and part not in node:
                node[part] = {}
            node = node[part]


def load_yaml_config(
    path: str | Path, cls: type[M], overrides: list[str] | None = None, what: str = "recipe"
) -> M:
    """A YAML file with `key.sub=value` overrides applied, validated as `cls`; failures are ConfigErrors."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{what} file not found: {path}")
    try:
        tree = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path} is not valid YAML: {err}") from err
    for item in overrides or []:
        apply_override(tree, item)
    try:
        return cls.model_validate(tree)
    except ValidationError as err:
        raise ConfigError(format_validation_error(err, str(path), what)) from None


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> Recipe:
    return load_yaml_config(path, Recipe, overrides)


def parse_recipe(tree: dict, source: str = "<dict>") -> Recipe:
    try:
        return Recipe.model_validate(tree)
    except ValidationError as err:
        raise ConfigError(format_validation_error(err, source)) from None


def dump_recipe(recipe: Recipe, path: Path) -> None:
    path.write_text(yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False))
