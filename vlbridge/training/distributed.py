"""How the ranks of a run share the model: the engines behind `train.distributed` (ddp | fsdp | deepspeed).

An engine prepares the model once for the run (`setup`) and for each stage's optimizer (`prepare`),
runs a micro-batch's backward (`backward`, inside `no_sync` but for the last of a step) and the optimizer
step (`step`, clipping first), reports what a rank holds (`state_bytes`), writes and reads its part of a
training checkpoint (`save` / `load`, called on every rank inside one shared directory) and hands the main
process the whole model's weights at the end (`full_state`). `DDP` is the base the others build on;
`DeepSpeed` (ZeRO) is in `zero.py`.
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import torch
from accelerate import Accelerator
from torch import nn

from ..checkpoint import write_model_files
from ..config import Typed
from ..errors import ConfigError
from ..registry import DISTRIBUTED

if TYPE_CHECKING:
    from ..recipe import Recipe, StageConfig, TrainConfig

OPTIMIZER_FILE = "optimizer.pt"
SHARDS_DIR = "shards"  # torch distributed checkpoint: one file per rank plus metadata


class DistributedConfig(Typed):
    """Base of `train.distributed`; a bare name (`fsdp`) is the engine with its defaults."""

    type: str = "ddp"


@DISTRIBUTED.register("ddp", config=DistributedConfig)
class DDP:
    """Every rank holds the whole model, gradients and optimizer; gradients are averaged (accelerate)."""

    weights_from_main = False  # True: only the main process builds a model with weights (the rest: meta)

    def __init__(self, config: DistributedConfig, accelerator: Accelerator) -> None:
        self.accelerator = accelerator

    def setup(self, model, recipe: Recipe):
        return model

    def prepare(self, model, optimizer, stage: StageConfig):
        return self.accelerator.prepare(model, optimizer)

    def no_sync(self, wrapped):
        return self.accelerator.no_sync(wrapped)

    def backward(self, wrapped, loss) -> None:
        self.accelerator.backward(loss)

    def step(self, wrapped, optimizer, max_grad_norm: float | None) -> None:
        if max_grad_norm is not None:
            params = [p for group in optimizer.param_groups for p in group["params"]]
            self.accelerator.clip_grad_norm_(params, max_grad_norm)
        optimizer.step()

    def state_bytes(self, wrapped, optimizer) -> dict[str, int]:
        """Measured after the stage's first step, before its gradients are zeroed."""
        return state_bytes(wrapped, optimizer)

    def save(self, out: Path, model, optimizer, tokenizer) -> None:
        if self.accelerator.is_main_process:
            write_model_files(self.accelerator.unwrap_model(model), out, tokenizer)
            torch.save(optimizer.state_dict(), out / OPTIMIZER_FILE)

    def load(self, path: Path, model, optimizer) -> None:
        """The weights came with the model (`load_pretrained` of the checkpoint); the optimizer's here."""
        if optimizer is not None:
            optimizer.load_state_dict(torch.load(path / OPTIMIZER_FILE, weights_only=True))

    def full_state(self, model) -> dict | None:
        return None


class FSDPConfig(DistributedConfig):
    type: str = "fsdp"
    # free each block's gathered weights after its forward and gather again in backward (ZeRO-3); False keeps
    # them until backward, trading memory for one all-gather per block (ZeRO-2-like)
    reshard_after_forward: bool = True
    cpu_offload: bool = False  # shards, gradients and optimizer state live in CPU RAM (GPU runs)
    mixed_precision: Literal["auto", "no", "bf16"] = "auto"  # auto: the accelerator's (bf16 on GPU)


@DISTRIBUTED.register("fsdp", config=FSDPConfig)
class FSDP(DDP):
    """Parameters, gradients and optimizer state sharded across ranks with torch's FSDP2 (`fully_shard`):
    each LLM decoder layer and each vision block is one unit, gathered only while it runs; the rest of the
    model (embeddings, connector, front-end and reducer modules) is the root unit. On GPUs the same calls
    accelerate's FSDP2 plugin makes; on CPUs (gloo), where accelerate does not offer FSDP, too."""

    weights_from_main = True

    def __init__(self, config: FSDPConfig, accelerator: Accelerator) -> None:
        self.config, self.accelerator = config, accelerator

    def setup(self, model, recipe: Recipe):
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

        fix_structure(model, recipe.train, recipe.seed)
        acc = self.accelerator
        mesh = init_device_mesh(acc.device.type, (acc.num_processes,))
        precision = self.config.mixed_precision
        if precision == "auto":
            precision = "bf16" if acc.mixed_precision == "bf16" else "no"
        options = {
            "mesh": mesh,
            "reshard_after_forward": self.config.reshard_after_forward,
            "mp_policy": MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
            if precision == "bf16"
            else MixedPrecisionPolicy(),
            "offload_policy": CPUOffloadPolicy() if self.config.cpu_offload else OffloadPolicy(),
        }
        whole = model.state_dict() if acc.is_main_process else {}
        for unit in reversed(shard_units(model)):  # inner blocks before the modules that hold them
            fully_shard(unit, **options)
        fully_shard(model, **options)
        send_from_main(model, whole, acc)
        return model

    def prepare(self, model, optimizer, stage: StageConfig):
        return model, optimizer

    @contextmanager
    def no_sync(self, wrapped):
        wrapped.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            wrapped.set_requires_gradient_sync(True)

    def save(self, out: Path, model, optimizer, tokenizer) -> None:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict

        model_state, optimizer_state = get_state_dict(model, optimizer)
        dcp.save({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=str(out / SHARDS_DIR))
        if self.accelerator.is_main_process:
            write_model_files(model, out, tokenizer, weights=False)

    def load(self, path: Path, model, optimizer) -> None:
        """The weights (and, mid-stage, the optimizer) from the shards: every rank reads its own part."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_model_state_dict,
            get_state_dict,
            set_model_state_dict,
            set_state_dict,
        )

        if optimizer is None:
            state = {"model": get_model_state_dict(model)}
            dcp.load(state, checkpoint_id=str(path / SHARDS_DIR))
            set_model_state_dict(model, state["model"])
            return
        model_state, optimizer_state = get_state_dict(model, optimizer)
        # parameters that never had a gradient (a tower's unused last layers) have no optimizer state saved;
        # they get none back, as in the run that wrote the checkpoint
        saved = dcp.FileSystemReader(str(path / SHARDS_DIR)).read_metadata().state_dict_metadata
        optimizer_state["state"] = {
            name: values
            for name, values in optimizer_state["state"].items()
            if any(f"optimizer.state.{name}.{key}" in saved for key in values)
        }
        state = {"model": model_state, "optimizer": optimizer_state}
        dcp.load(state, checkpoint_id=str(path / SHARDS_DIR))
        set_state_dict(  # not strict, for those stateless parameters (dcp.load has checked every weight)
            model,
            optimizer,
            model_state_dict=state["model"],
            optim_state_dict=state["optimizer"],
            options=StateDictOptions(strict=False),
        )

    def full_state(self, model) -> dict | None:
        """Every weight gathered into the main process's CPU memory (a collective: all ranks call it)."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        return get_model_state_dict(model, options=options)


def send_from_main(model, whole: dict, accelerator: Accelerator) -> None:
    """Fill every rank's shards from the main process's weights (`whole`, empty elsewhere): the other ranks
    built the model on the meta device, so a pretrained LLM is read and held whole by one process only.
    Buffers are not sharded; the main process's are copied too (non-persistent ones such as rotary
    frequencies are in no state dict)."""
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    if not accelerator.is_main_process:
        model.to_empty(device=accelerator.device)
    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
    set_model_state_dict(model, whole, options=options)
    for buffer in model.buffers():
        dist.broadcast(buffer, src=0)


def broadcast_from_main(model, accelerator: Accelerator) -> None:
    """`send_from_main` for a model that is not sharded yet: every parameter and buffer, whole, in module
    order (the same on every rank: the structure is). Tied parameters (an LLM's input and output
    embeddings) stay one parameter, as `to_empty` alone would not keep them."""
    import torch.distributed as dist

    if not accelerator.is_main_process:
        names: dict[int, list[str]] = {}
        for name, param in model.named_parameters(remove_duplicate=False):
            names.setdefault(id(param), []).append(name)
        model.to_empty(device=accelerator.device)
        for first, *others in (group for group in names.values() if len(group) > 1):
            for name in others:
                owner, _, attr = name.rpartition(".")
                setattr(model.get_submodule(owner), attr, model.get_parameter(first))
    with torch.no_grad():
        for tensor in [*model.parameters(), *model.buffers()]:
            dist.broadcast(tensor, src=0)


def fix_structure(model, train: TrainConfig, seed: int) -> None:
    """Give the model, before it is sharded, the structure every stage needs: groups any stage trains with
    LoRA are wrapped now (zero-initialised adapters change nothing until trained). Sharded modules cannot be
    re-wrapped or merged later, so a group trained with LoRA in one stage and in full in another is refused.
    """
    from ..recipe import StageConfig
    from .stages import apply_stage

    for name in model.group_paths():
        modes = {stage.modules.get(name, "frozen") for stage in train.stages}
        if {"lora", "full"} <= modes:
            raise ConfigError(
                f"train.distributed {train.distributed.type}: group {name!r} is trained with LoRA in one "
                "stage and in full in another; sharded modules keep one structure for the whole run. Train "
                "it one way in every stage, or use train.distributed: ddp"
            )
    wrapped = {name for stage in train.stages for name, mode in stage.modules.items() if mode == "lora"}
    lora_everywhere = StageConfig(name="structure", steps=1, modules=dict.fromkeys(wrapped, "lora"))
    apply_stage(model, lora_everywhere, train.lora, seed)


def shard_units(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks of the LLM and the vision tower: items of a ModuleList whose class transformers
    names as a unit not to split (`_no_split_modules`), in module order."""
    from transformers import PreTrainedModel

    names: set[str] = set()
    for module in model.modules():
        if isinstance(module, PreTrainedModel):
            names |= set(module._no_split_modules or ())
    return [
        block
        for module in model.modules()
        if isinstance(module, nn.ModuleList)
        for block in module
        if type(block).__name__ in names
    ]


def state_bytes(model, optimizer) -> dict[str, int]:
    """Bytes this rank holds for parameters, gradients and optimizer state (its shards under FSDP)."""

    def local(tensor) -> int:
        tensor = tensor.to_local() if hasattr(tensor, "to_local") else tensor
        return tensor.numel() * tensor.element_size()

    params = list(model.parameters())
    return {
        "parameters": sum(local(p) for p in params),
        "gradients": sum(local(p.grad) for p in params if p.grad is not None),
        "optimizer": sum(
            local(v) for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v) and v.ndim
        ),
    }


def engine_for(config: DistributedConfig, accelerator: Accelerator):
    return DISTRIBUTED.get(config.type)(config, accelerator)
