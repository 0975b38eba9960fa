"""DeepSpeed ZeRO as a `train.distributed` engine (`deepspeed`): the optimizer state (ZeRO-1), also the
gradients (ZeRO-2) and also the parameters (ZeRO-3) split across ranks.

DeepSpeed is an optional extra (`pip install 'vlbridge[deepspeed]'`), imported only when this engine is
built. It is driven directly (`deepspeed.initialize` with the stage's AdamW), not through accelerate, which
ignores DeepSpeed on CPU ranks; the trainer's own cosine schedule sets the learning rates, and its loop
keeps the micro-batch order, seeds and loss scaling of the other engines, so two ranks under ZeRO train as
one process with twice the gradient accumulation.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import socket
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
from accelerate import Accelerator
from pydantic import model_validator

from ..checkpoint import write_model_files
from ..config import deep_merge
from ..errors import ConfigError
from ..registry import DISTRIBUTED
from .distributed import DDP, DistributedConfig, broadcast_from_main, fix_structure

if TYPE_CHECKING:
    from ..recipe import Recipe, StageConfig

DEEPSPEED_DIR = "deepspeed"  # a training checkpoint's DeepSpeed checkpoint (one file per rank + the module)
TAG = "state"  # its one tag (DeepSpeed's sub-directory name)
INSTALL_HINT = "pip install 'vlbridge[deepspeed]'"

# Keys of a DeepSpeed config that vlbridge sets from the recipe: a config_file may not set them.
FROM_RECIPE = {
    "optimizer": "the stage's AdamW (lr, module_lr, weight_decay) is used",
    "scheduler": "the stage's warmup + cosine schedule (warmup_steps, min_lr_ratio) is used",
    "train_batch_size": "set the stage's batch_size and grad_accum",
    "train_micro_batch_size_per_gpu": "set the stage's batch_size",
    "gradient_accumulation_steps": "set the stage's grad_accum",
    "gradient_clipping": "set the stage's max_grad_norm",
    "fp16": "set train.mixed_precision",
    "bf16": "set train.mixed_precision",
    "amp": "set train.mixed_precision",
}


class DeepSpeedConfig(DistributedConfig):
    type: str = "deepspeed"
    # 1: optimizer state sharded; 2: also gradients; 3: also parameters (gathered per module as it runs)
    zero_stage: Literal[1, 2, 3] = 2
    # the optimizer state (and its fp32 master weights) in CPU RAM, stepped there by the stage's AdamW
    offload_optimizer: bool = False
    # a DeepSpeed JSON config merged under what vlbridge sets (bucket sizes, overlap_comm, offload details...)
    config_file: str | None = None

    @model_validator(mode="after")
    def _readable_config_file(self) -> DeepSpeedConfig:
        if self.config_file is not None:
            read_config_file(self.config_file, self.zero_stage)
        return self


def read_config_file(path: str, zero_stage: int) -> dict[str, Any]:
    """The DeepSpeed config in `path`, refused when it sets what the recipe decides."""
    where = f"train.distributed.config_file={path!r}"
    try:
        text = Path(path).read_text()
    except OSError as err:
        raise ConfigError(f"{where}: cannot read it ({err.strerror or err})") from err
    try:
        config = json.loads(text)
    except json.JSONDecodeError as err:
        raise ConfigError(f"{where}: not valid JSON ({err})") from err
    if not isinstance(config, dict):
        raise ConfigError(f"{where}: a DeepSpeed config is a JSON object, got {type(config).__name__}")
    refused = sorted(set(config) & set(FROM_RECIPE))
    if refused:
        reasons = "; ".join(f"{key}: {FROM_RECIPE[key]}" for key in refused)
        raise ConfigError(
            f"{where} sets {', '.join(refused)}, which vlbridge takes from the recipe ({reasons})"
        )
    zero = config.get("zero_optimization", {})
    if not isinstance(zero, dict):
        raise ConfigError(f"{where}: zero_optimization must be an object, got {zero!r}")
    if "stage" in zero and zero["stage"] != zero_stage:
        raise ConfigError(
            f"{where} sets zero_optimization.stage={zero['stage']!r} but the recipe's zero_stage is "
            f"{zero_stage}; set the stage with train.distributed.zero_stage only"
        )
    return config


def import_deepspeed():
    """deepspeed, ready for CPU or CUDA ranks; a clear error when the extra is not installed."""
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # say it, rather than let DeepSpeed guess and warn
    try:
        import deepspeed
        import deepspeed.ops
    except ImportError as err:
        raise ConfigError(
            f"train.distributed: deepspeed needs DeepSpeed, which is not installed ({err}); {INSTALL_HINT}"
        ) from err
    # On a CPU accelerator DeepSpeed compiles a shared-memory all-reduce (`deepspeed_shm_comm`, g++, ~45 s
    # on first use) when its communication backend starts. Only its inference all-reduce uses that op,
    # never ZeRO training, and it has no public switch (its builder only checks the platform), so it is
    # marked unavailable here: ranks talk over gloo (CPU) or NCCL (GPU), with no compiler needed.
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    deepspeed.utils.logger.setLevel(logging.WARNING)  # its config dump and per-step progress lines
    return deepspeed


@DISTRIBUTED.register("deepspeed", config=DeepSpeedConfig)
class DeepSpeed(DDP):
    """ZeRO stage 1, 2 or 3 by DeepSpeed. Each stage of a recipe initialises a DeepSpeed engine on the same
    module with that stage's AdamW (the previous one is destroyed first: its gradient hooks removed);
    DeepSpeed flattens the trained parameters and keeps fp32 master partitions, and (ZeRO-3) partitions
    every parameter, frozen ones included."""

    weights_from_main = True

    def __init__(self, config: DeepSpeedConfig, accelerator: Accelerator) -> None:
        self.config, self.accelerator = config, accelerator
        self.deepspeed = import_deepspeed()
        self.extra = read_config_file(config.config_file, config.zero_stage) if config.config_file else {}
        if accelerator.mixed_precision == "fp16":
            raise ConfigError(
                "train.distributed: deepspeed with train.mixed_precision=fp16 is not supported (DeepSpeed's "
                "loss scaler skips steps the trainer's schedule would count); use bf16 or no"
            )
        self.engine = None  # the stage's DeepSpeed engine
        self.torch_optimizer = None  # the stage's AdamW, which DeepSpeed steps on its fp32 partitions
        self.pending: Path | None = None  # a checkpoint to load with the optimizer once the engine exists
        self.loaded: Path | None = None  # the checkpoint whose weights the module holds
        self.grad_bytes, self.measuring = 0, False

    # -- the run ---------------------------------------------------------------------------
    def setup(self, model, recipe: Recipe):
        self.check_config(recipe.train.stages)
        fix_structure(model, recipe.train, recipe.seed)
        self._start_distributed()
        broadcast_from_main(model, self.accelerator)
        return model

    def check_config(self, stages: list[StageConfig]) -> None:
        """DeepSpeed's own validation of every stage's config (an unknown key inside one of its sections,
        a bad value) before any weight moves. Unknown top-level keys DeepSpeed ignores, and so does this."""
        from deepspeed.runtime.config import DeepSpeedConfig as Validated

        for stage in stages:
            try:
                Validated(self.ds_config(stage))
            except Exception as err:  # pydantic's ValidationError, DeepSpeed's assertions and ValueErrors
                raise ConfigError(
                    f"train.distributed: DeepSpeed refuses the config of stage {stage.name!r} (the recipe's "
                    f"settings over config_file={self.config.config_file!r}): {err}"
                ) from err

    def _start_distributed(self) -> None:
        """DeepSpeed on the process group accelerate started; a single process gets a group of one."""
        import torch.distributed as dist

        if not dist.is_initialized():
            for key, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1")):
                os.environ.setdefault(key, value)
            os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
            os.environ.setdefault("MASTER_PORT", str(free_port()))
        from deepspeed.accelerator import get_accelerator

        backend = get_accelerator().communication_backend_name()
        self.deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False)
        atexit.register(self._close)

    def _close(self) -> None:
        """At exit, while Python still runs: the last engine off the module and the process groups closed.
        Left to the interpreter's finalisation, a ZeRO-3 rank sometimes aborted there ("terminate called
        without an active exception") after a complete run."""
        import torch.distributed as dist

        self._release()
        if dist.is_initialized():
            dist.destroy_process_group()

    def prepare(self, model, optimizer, stage: StageConfig):
        self._release()
        config = self.ds_config(stage)
        engine, ds_optimizer, _, _ = self.deepspeed.initialize(
            model=model, optimizer=optimizer, config=config
        )
        # the trainer's scheduler sets lr in the AdamW's param groups: DeepSpeed must step those very groups
        if [id(g) for g in ds_optimizer.param_groups] != [id(g) for g in optimizer.param_groups]:
            raise RuntimeError(
                "DeepSpeed's optimizer does not share the AdamW's param groups; the learning-rate "
                "schedule would not reach it (an untested DeepSpeed version?)"
            )
        self.engine, self.torch_optimizer = engine, optimizer
        self.grad_bytes, self.measuring = 0, True  # gradients held in the stage's first step, at most
        if self.pending is not None:
            path, self.pending = self.pending, None
            loaded, _ = engine.load_checkpoint(
                str(path / DEEPSPEED_DIR), tag=TAG, load_optimizer_states=True, load_lr_scheduler_states=False
            )
            if loaded is None:
                raise RuntimeError(f"DeepSpeed found no checkpoint in {path / DEEPSPEED_DIR}")
            self.loaded = path
        return engine, ds_optimizer

    def ds_config(self, stage: StageConfig) -> dict[str, Any]:
        """The DeepSpeed config of one stage: the config_file's settings under the recipe's."""
        zero: dict[str, Any] = {"stage": self.config.zero_stage}
        if self.config.offload_optimizer:
            zero["offload_optimizer"] = {"device": "cpu"}
        ours = {
            "train_micro_batch_size_per_gpu": stage.batch_size,
            "gradient_accumulation_steps": stage.grad_accum,
            "gradient_clipping": stage.max_grad_norm or 0.0,
            "zero_optimization": zero,
            "bf16": {"enabled": self.accelerator.mixed_precision == "bf16"},
            # the stage's torch AdamW, also when offloaded (DeepSpeed's CPU Adam would need a compiler)
            "zero_allow_untested_optimizer": True,
            "zero_force_ds_cpu_optimizer": False,
        }
        return deep_merge(self.extra, ours)

    def _release(self) -> None:
        """Take the previous stage's DeepSpeed engine off the module: its gradient hooks (which would reduce
        the next stage's gradients a second time) and its forward hooks."""
        engine, self.engine = self.engine, None
        if engine is None:
            return
        engine.destroy()
        # Newer DeepSpeed engines destroy themselves again when garbage-collected (`__del__`), which would
        # unlink the parameters the next engine shares with this one from its fp32 masters (their
        # `_hp_mapping`): without its optimizer, a second destroy leaves them alone.
        engine.optimizer = None
        for name in ("module_forward_pre_hook", "module_forward_post_hook", "first_dataloader_check"):
            handle = getattr(engine, name, None)
            if handle is not None:
                handle.remove()
        # ZeRO's gradient hooks are post-accumulate hooks on the parameters; none may outlive their engine
        # (the losses would not show it: the next engine's partitions would still be right, the old
        # engine's reductions only wasted)
        if any(getattr(p, "_post_accumulate_grad_hooks", None) for p in engine.module.parameters()):
            raise RuntimeError("the previous stage's DeepSpeed gradient hooks survived engine.destroy()")

    # -- a step ----------------------------------------------------------------------------
    @contextmanager
    def no_sync(self, wrapped):
        """A micro-batch before the last of a step: DeepSpeed accumulates (ZeRO-2/3 still reduce-scatter
        each micro-batch's gradients into this rank's partition) and steps only at the boundary."""
        wrapped.set_gradient_accumulation_boundary(False)
        try:
            yield
        finally:
            wrapped.set_gradient_accumulation_boundary(True)

    def backward(self, wrapped, loss) -> None:
        wrapped.backward(loss, scale_wrt_gas=False)  # the trainer has divided the loss by grad_accum
        if self.measuring:
            self.grad_bytes = max(self.grad_bytes, held_bytes(self._gradients(wrapped)))

    def step(self, wrapped, optimizer, max_grad_norm: float | None) -> None:
        """DeepSpeed's step: gradients clipped at the stage's max_grad_norm (set in its config), the AdamW
        stepped on this rank's fp32 partition, the new weights gathered back into the module."""
        if self.measuring:  # the first step's peak, while they exist: DeepSpeed frees them in its step
            self.grad_bytes = max(self.grad_bytes, held_bytes(self._gradients(wrapped)))
            self.measuring = False
        wrapped.step()

    def _gradients(self, wrapped) -> list[torch.Tensor]:
        """The gradient tensors this rank holds before the step: those of the module's parameters (ZeRO-1
        keeps them whole until the boundary) and the reduced partitions of the ZeRO optimizer."""
        grads = [p.grad for p in wrapped.module.parameters() if p.grad is not None]
        zero = wrapped.optimizer
        for partition in getattr(zero, "averaged_gradients", {}).values():
            grads += [g for g in partition or () if torch.is_tensor(g)]
        grads += [
            p.grad for g in self.torch_optimizer.param_groups for p in g["params"] if p.grad is not None
        ]
        return grads

    def state_bytes(self, wrapped, optimizer) -> dict[str, int]:
        """What this rank holds: the module's parameters (whole under ZeRO-1/2, this rank's partition under
        ZeRO-3) plus the fp32 master partitions DeepSpeed keeps for the trained ones, the gradients as they
        were just before the first step, and the AdamW state of this rank's partitions."""
        params = [getattr(p, "ds_tensor", p) for p in wrapped.module.parameters()]
        # the masters: the AdamW's parameters (ZeRO-3 puts them in its groups only while it steps them)
        params += [p for g in self.torch_optimizer.param_groups for p in g["params"]]
        params += list(self.torch_optimizer.state)
        state = [
            v
            for s in self.torch_optimizer.state.values()
            for v in s.values()
            if torch.is_tensor(v) and v.ndim
        ]
        return {
            "parameters": held_bytes(params),
            "gradients": self.grad_bytes,
            "optimizer": held_bytes(state),
        }

    # -- checkpoints -----------------------------------------------------------------------
    def save(self, out: Path, model, optimizer, tokenizer) -> None:
        """Every rank writes its partitions (DeepSpeed's checkpoint layout, with its zero_to_fp32.py)."""
        self.engine.save_checkpoint(str(out / DEEPSPEED_DIR), tag=TAG)
        if self.accelerator.is_main_process:
            write_model_files(model, out, tokenizer, weights=False)

    def load(self, path: Path, model, optimizer) -> None:
        """Mid-stage (with the optimizer): DeepSpeed reads every rank's partitions once the stage's engine
        exists (`prepare`). Weights only (a stage that starts at the checkpoint): the module already holds
        them when the previous stage's engine read that checkpoint; else the fp32 weights consolidated from
        it (every rank reads all partitions) are copied into the module."""
        if optimizer is not None:
            self.pending = path
            return
        if self.loaded == path:
            return
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        state = get_fp32_state_dict_from_zero_checkpoint(str(path / DEEPSPEED_DIR), tag=TAG)
        params = list(model.parameters())
        partitioned = any(hasattr(p, "ds_id") for p in params)  # ZeRO-3, after a stage's engine
        with (
            self.deepspeed.zero.GatheredParameters(params, modifier_rank=0) if partitioned else nullcontext()
        ):
            model.load_state_dict(state)
        self.loaded = path

    def full_state(self, model) -> dict | None:
        """Every weight in fp32 under the model's own names, whole in the main process's CPU memory (a
        collective: every rank calls it). ZeRO-3 gathers one parameter at a time for the copy. Under bf16
        the module holds bf16 copies: the trained parameters come from DeepSpeed's fp32 masters, the frozen
        ones are the module's (DeepSpeed cast them to bf16 at the first stage)."""
        main = self.accelerator.is_main_process
        state = {}
        for key, value in model.state_dict(keep_vars=True).items():
            gather = self.config.zero_stage == 3 and hasattr(value, "ds_id")
            with self.deepspeed.zero.GatheredParameters([value]) if gather else nullcontext():
                if main:
                    state[key] = cpu_copy(value)
        if self.accelerator.mixed_precision == "bf16":
            from deepspeed.utils import safe_get_full_fp32_param

            for name, param in model.named_parameters():
                if param.requires_grad:  # in the last stage's optimizer
                    full = safe_get_full_fp32_param(param)  # a collective
                    if main and full is not None:
                        state[name] = full.detach().float().cpu()
        return state if main else None


def cpu_copy(tensor: torch.Tensor) -> torch.Tensor:
    tensor = tensor.detach()
    return (tensor.float() if tensor.is_floating_point() else tensor).cpu().clone()


def held_bytes(tensors) -> int:
    """Bytes of memory behind `tensors`: the union of the ranges they view in each storage, so views into
    one flat buffer (DeepSpeed's flattened parameters and gradient partitions) count once."""
    ranges: dict[int, list[tuple[int, int]]] = {}
    for tensor in tensors:
        if tensor is None or not tensor.numel():
            continue
        storage = tensor.untyped_storage()
        start = tensor.storage_offset() * tensor.element_size()
        ranges.setdefault(storage.data_ptr(), []).append(
            (start, start + tensor.numel() * tensor.element_size())
        )
    total = 0
    for spans in ranges.values():
        end = -1
        for lo, hi in sorted(spans):
            lo = max(lo, end)
            if hi > lo:
                total += hi - lo
                end = hi
    return total


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
