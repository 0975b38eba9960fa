"""Apply a stage to a model: freeze, LoRA-wrap or fully train each module group; build optimizer groups."""

from __future__ import annotations

from dataclasses import dataclass

from peft import PeftModel
from rich.table import Table

from ..errors import ConfigError
from ..lora import is_adapter_param, lora_config, merge, wrap
from ..recipe import LoRASettings, StageConfig


@dataclass(frozen=True)
class GroupReport:
    name: str
    mode: str
    trainable: int
    total: int


def apply_stage(model, stage: StageConfig, lora: LoRASettings, seed: int = 0) -> list[GroupReport]:
    """Set requires_grad (wrapping with LoRA or merging it away as the stage says) for every group; new
    adapters start from `seed`."""
    groups = model.group_paths()
    unknown = sorted(set(stage.modules) - set(groups))
    if unknown:
        raise ConfigError(
            f"stage {stage.name!r}: unknown module group(s) {unknown}; this model has {', '.join(groups)}"
        )
    model.requires_grad_(False)
    reports = []
    for name in groups:
        mode = stage.modules.get(name, "frozen")
        module = model.get_group(name)
        if mode == "lora":
            tokens = model.frontend.trained_token_ids() if name == "llm" else None
            config = lora_config(lora.r, lora.alpha, lora.dropout, lora.target_modules, tokens)
            module = wrap(module, config, name, seed)
            for pname, param in module.named_parameters():
                param.requires_grad_(is_adapter_param(pname))
        elif mode == "full":
            module = merge(module)
            module.requires_grad_(True)
        model.set_group(name, module)
        trainable = sum(p.numel() for p in module.parameters() if p.requires_grad)
        reports.append(GroupReport(name, mode, trainable, sum(p.numel() for p in module.parameters())))
    return reports


def optimizer_groups(model, stage: StageConfig) -> list[dict]:
    """One optimizer group per (module group, decay or not): biases and norms get no weight decay."""
    groups = []
    for name in model.group_paths():
        params = [(n, p) for n, p in model.get_group(name).named_parameters() if p.requires_grad]
        lr = stage.module_lr.get(name, stage.lr)
        decay = [p for n, p in params if p.ndim >= 2]
        no_decay = [p for n, p in params if p.ndim < 2]
        for chunk, wd in ((decay, stage.weight_decay), (no_decay, 0.0)):
            if chunk:
                groups.append({"params": chunk, "lr": lr, "weight_decay": wd, "name": name})
    if not groups:
        raise ConfigError(f"stage {stage.name!r} trains nothing: set at least one module to 'lora' or 'full'")
    return groups


def stage_table(stage: StageConfig, reports: list[GroupReport]) -> Table:
    table = Table(title=f"stage {stage.name!r}: {stage.steps} steps, lr {stage.lr:g}")
    for column in ("module", "mode", "trainable", "frozen", "total"):
        table.add_column(column, justify="right" if column not in ("module", "mode") else "left")
    for r in reports:
        table.add_row(
            r.name, r.mode.upper(), f"{r.trainable:,}", f"{r.total - r.trainable:,}", f"{r.total:,}"
        )
    trainable = sum(r.trainable for r in reports)
    total = sum(r.total for r in reports)
    table.add_row("all", "", f"{trainable:,}", f"{total - trainable:,}", f"{total:,}", style="bold")
    return table


def is_wrapped(module) -> bool:
    return isinstance(module, PeftModel)
