"""`vlbridge train`: data -> tokenizer -> model -> stages -> final checkpoint -> evaluation -> report.

This is the whole main job; every piece it calls is usable on its own.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from accelerate import Accelerator, DistributedDataParallelKwargs
from rich.console import Console
from transformers import AutoTokenizer

from ..checkpoint import save_model
from ..data.formats import load_source
from ..data.streaming import StreamSource
from ..errors import ConfigError
from ..factory import build as build_model
from ..factory import load_pretrained
from ..modeling import VLModel
from ..processing import VLProcessor
from ..recipe import Recipe, dump_recipe
from ..tokenization import load_tokenizer
from .checkpointing import TrainerState, is_sharded, latest_checkpoint, load_state
from .distributed import engine_for
from .trainer import Trainer

MODEL_DIR = "model"


# (recipe, trained model, processor, training samples, console) -> figures for results.json
Evaluation = Callable[[Recipe, VLModel, VLProcessor, Sequence, Console], dict]


def make_accelerator(recipe: Recipe) -> Accelerator:
    precision = recipe.train.mixed_precision
    if precision == "auto":
        precision = "bf16" if torch.cuda.is_available() else "no"
    # Towers read features from an inner layer, so their last layers (and pooler) get no gradient.
    ddp = DistributedDataParallelKwargs(find_unused_parameters=True)
    return Accelerator(mixed_precision=precision, cpu=not torch.cuda.is_available(), kwargs_handlers=[ddp])


def prepare_run_dir(recipe: Recipe, resume: bool, overwrite: bool) -> None:
    """Refuse to clobber an earlier run's checkpoints unless asked (main process only)."""
    run_dir = recipe.run_dir
    found = latest_checkpoint(run_dir)
    if resume:
        if found is None:
            raise ConfigError(f"--resume: no checkpoint in {run_dir / 'checkpoints'} (set train.save_every)")
        return
    if (found is not None or (run_dir / MODEL_DIR).exists()) and not overwrite:
        raise ConfigError(
            f"{run_dir} already holds a run; pass --resume to continue it, --overwrite to start over, "
            f"or output_dir=... for a new directory"
        )
    if overwrite:
        for name in ("checkpoints", MODEL_DIR):
            shutil.rmtree(run_dir / name, ignore_errors=True)
    run_dir.mkdir(parents=True, exist_ok=True)
    dump_recipe(recipe, run_dir / "recipe.yaml")


def training_texts(datasets: list, image_token: str) -> list[str]:
    """Every message of every sample with its image markers blanked, for training a tokenizer (of a stream,
    its first `tokenizer_samples`); sources that can list their conversations without loading images
    (`messages(i)`, e.g. shapes) are not made to render them."""
    texts = []
    for samples in datasets:
        if isinstance(samples, StreamSource):
            samples = samples.head(samples.cfg.tokenizer_samples)
        read = getattr(samples, "messages", None) or (lambda i, samples=samples: samples[i]["messages"])
        texts += [m["content"].replace(image_token, " ") for i in range(len(samples)) for m in read(i)]
    return texts


def build(recipe: Recipe, stage_data: list, resume_from: Path | None, device: str, *, meta: bool = False):
    """(model, processor, state): fresh from the recipe, or exactly as the checkpoint left them.

    Weights are fp32 masters whatever the device; on GPU, accelerate runs the math under bf16 autocast. A
    sharded checkpoint's weights are loaded by the engine once the model is sharded; here it is built as at
    the start (with the checkpoint's tokenizer). `meta`: a fresh model is built on the meta device, no
    weights read or allocated (its engine fills it from the main process's).
    """
    if resume_from is not None and not is_sharded(resume_from):
        model, processor = load_pretrained(resume_from, device=device, dtype=torch.float32)
        return model, processor, load_state(resume_from)
    state = TrainerState() if resume_from is None else load_state(resume_from)
    if recipe.init_from is not None:
        start = recipe.init_from
        torch.manual_seed(recipe.seed)  # new reducers' parameters (p-MoD routers) start the same every run
        model, processor = load_pretrained(
            start.path, device=device, dtype=torch.float32, reducers=start.reducers or None
        )
        return model, processor, state
    if resume_from is not None:
        tokenizer = AutoTokenizer.from_pretrained(str(resume_from))
    else:
        tokenizer = load_tokenizer(recipe.tokenizer, training_texts(stage_data, recipe.model.image_token))
    torch.manual_seed(recipe.seed)
    model, processor = build_model(
        recipe.model, tokenizer, device="meta" if meta else device, dtype=torch.float32
    )
    return model, processor, state


def run_training(
    recipe: Recipe,
    *,
    resume: bool = False,
    overwrite: bool = False,
    evaluate: Evaluation | None = None,
    console: Console | None = None,
) -> dict:
    """Train, save the final model, and (when `evaluate` is given and the recipe has eval data) add what
    it measures on the saved model to results.json; `vlbridge train` passes the eval app's report."""
    console = console or Console()
    wall_start = time.perf_counter()
    accelerator = make_accelerator(recipe)
    run_dir = recipe.run_dir
    if accelerator.is_main_process:
        prepare_run_dir(recipe, resume, overwrite)
    accelerator.wait_for_everyone()
    resume_from = latest_checkpoint(run_dir) if resume else None
    train_data = load_source(recipe.data.train)
    stage_data = [load_source(s.data) if s.data is not None else train_data for s in recipe.train.stages]
    engine = engine_for(recipe.train.distributed, accelerator)
    meta = engine.weights_from_main and not accelerator.is_main_process
    device = accelerator.device
    device = str(device) if device.index else device.type  # safetensors refuses "cpu:0", as a rank's CPU is
    model, processor, state = build(recipe, stage_data, resume_from, device, meta=meta)
    trainer = Trainer(recipe, model, processor, stage_data, engine, console)
    state = trainer.train(state, resume_from)
    model = accelerator.unwrap_model(trainer.model)
    gathered = engine.full_state(model)  # sharded weights, whole in the main process
    accelerator.end_training()  # the last collective: the process group is closed before interpreter exit
    summary = {
        "train_seconds": state.train_seconds,
        "data_seconds": trainer.data_seconds,
        "global_steps": state.global_step,
        "samples_seen": state.samples_seen,
        "dropped_samples": trainer.drops.counts,
        "rank_state_bytes": trainer.state_bytes,
    }
    if not accelerator.is_main_process:
        return summary
    save_model(model, run_dir / MODEL_DIR, processor.tokenizer, state=gathered)
    if gathered is not None:  # evaluate the saved model: the sharded one answers only with every rank
        model, processor = load_pretrained(run_dir / MODEL_DIR, device=device)
    if trainer.drops.total:
        console.print(
            f"[yellow]dropped {trainer.drops.total} over-long training samples: {trainer.drops.counts}"
        )
    if evaluate is not None and recipe.data.eval is not None:
        seen = train_data if isinstance(train_data, Sequence) else []  # a stream is not reread for baselines
        summary.update(evaluate(recipe, model, processor, seen, console))
    summary["wall_seconds"] = time.perf_counter() - wall_start
    (run_dir / "results.json").write_text(json.dumps(summary, indent=2))
    console.print(
        f"training wall time {summary['train_seconds']:.1f} s ({state.global_step} steps, "
        f"{state.samples_seen:,} samples); data encoding {summary['data_seconds']:.1f} s; "
        f"whole command {summary['wall_seconds']:.1f} s"
    )
    console.print(f"model saved to {run_dir / MODEL_DIR}; results in {run_dir / 'results.json'}")
    return summary
