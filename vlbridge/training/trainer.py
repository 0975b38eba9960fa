"""The training loop: stages in order, each a seeded, resumable sequence of optimizer steps (accelerate)."""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from pathlib import Path

import torch
from rich.console import Console
from tqdm.auto import tqdm
from transformers import get_cosine_with_min_lr_schedule_with_warmup

from ..data.streaming import StreamSource
from ..processing import DropCounter, VLProcessor
from ..recipe import Recipe, StageConfig
from .batches import EncodedSamples
from .checkpointing import SCHEDULER_FILE, TrainerState, load_stream_state, prune_checkpoints, save_checkpoint
from .loader import BatchLoader, StreamLoader
from .sampler import make_order
from .stages import apply_stage, optimizer_groups, stage_table

METRICS_FILE = "metrics.jsonl"


def batch_seed(seed: int, stage: str, position: int) -> int:
    """RNG seed for one micro-batch, from its position in the stage's global batch order: a pure function,
    so a resumed run draws the same dropout masks, and so does a run on any number of ranks."""
    digest = hashlib.sha256(f"{seed}:{stage}:{position}".encode()).digest()
    return int.from_bytes(digest[:8], "little") % (2**63)


class Trainer:
    def __init__(
        self,
        recipe: Recipe,
        model,
        processor: VLProcessor,
        stage_data: list,
        engine,
        console: Console,
    ) -> None:
        """`engine`: how the ranks share the model (`vlbridge.training.distributed`), with its accelerator."""
        self.recipe, self.model, self.processor = recipe, model, processor
        self.stage_data, self.engine, self.console = stage_data, engine, console
        self.accelerator = accelerator = engine.accelerator
        self.drops = DropCounter()
        self.data_seconds = 0.0
        self.run_dir = recipe.run_dir
        self.writer = self._tensorboard() if recipe.train.tensorboard else None
        if recipe.train.gradient_checkpointing:
            parts = model.activation_checkpointing()
            if accelerator.is_main_process:
                console.print(f"activation checkpointing: {', '.join(parts)}")
        self.model = engine.setup(model, recipe)
        # per stage: bytes of parameters, gradients and optimizer state this rank held at its first step
        self.state_bytes: dict[str, dict[str, int]] = {}

    def _tensorboard(self):
        if not self.accelerator.is_main_process:
            return None
        from torch.utils.tensorboard import SummaryWriter

        return SummaryWriter(str(self.run_dir / "logs"))

    def train(self, state: TrainerState, resume_from: Path | None = None) -> TrainerState:
        if self.accelerator.is_main_process:
            self._trim_metrics(state.global_step)
        for index, stage in enumerate(self.recipe.train.stages):
            if index < state.stage:
                continue
            self._run_stage(index, stage, state, resume_from if index == state.stage else None)
            state.stage, state.stage_step = index + 1, 0
        if self.writer is not None:
            self.writer.close()
        return state

    # -- one stage -------------------------------------------------------------------------
    def _run_stage(
        self, index: int, stage: StageConfig, state: TrainerState, resume_from: Path | None
    ) -> None:
        reports = apply_stage(self.model, stage, self.recipe.train.lora, self.recipe.seed)
        if self.accelerator.is_main_process:
            self.console.print(stage_table(stage, reports))
        optimizer = torch.optim.AdamW(optimizer_groups(self.model, stage), betas=(0.9, 0.95))
        scheduler = get_cosine_with_min_lr_schedule_with_warmup(
            optimizer, stage.warmup_steps, stage.steps, min_lr_rate=stage.min_lr_ratio
        )
        if resume_from is not None:
            mid_stage = state.stage_step > 0
            self.engine.load(resume_from, self.model, optimizer if mid_stage else None)
            if mid_stage:
                scheduler.load_state_dict(torch.load(resume_from / SCHEDULER_FILE, weights_only=True))
        acc = self.accelerator
        batches, stream_state = self._batches(index, stage, state.stage_step, resume_from)
        wrapped, optimizer = self.engine.prepare(self.model, optimizer, stage)
        bar = tqdm(
            total=stage.steps, initial=state.stage_step, desc=stage.name, disable=not acc.is_main_process
        )
        while state.stage_step < stage.steps:
            started = time.perf_counter()
            loss, tokens = self._step(wrapped, optimizer, scheduler, batches, stage, state)
            elapsed = time.perf_counter() - started
            state.train_seconds += elapsed
            state.stage_step += 1
            state.global_step += 1
            bar.update(1)
            bar.set_postfix(
                loss=f"{loss:.3f}", tok_s=f"{tokens / elapsed:,.0f}", lr=f"{scheduler.get_last_lr()[0]:.2e}"
            )
            self._log(state, loss, tokens / elapsed, scheduler.get_last_lr()[0])
            self._maybe_checkpoint(optimizer, scheduler, state, stream_state)
        bar.close()
        acc.free_memory()

    def _batches(
        self, index: int, stage: StageConfig, stage_step: int, resume_from: Path | None
    ) -> tuple[Iterator[dict | None], Callable[[], dict] | None]:
        """This rank's micro-batches from optimizer step `stage_step` to the stage's end, and for a stream
        the function that tells its position, for checkpoints.

        A sequence's batches follow the stage's seeded order (`train.sampler`): encoded once up front
        (`train.preencode`, small sets) or built as the loop asks, in `train.num_workers` DataLoader
        workers (any size). A stream (`hf_streaming`) is read on, each rank its part, from where the
        checkpoint's position for this rank left it; its batches are always built as the loop asks."""
        source, train, acc = self.stage_data[index], self.recipe.train, self.accelerator
        seed, rank, world = self.recipe.seed + index, acc.process_index, acc.num_processes
        start, stop = stage_step * stage.grad_accum, stage.steps * stage.grad_accum
        workers = dict(num_workers=train.num_workers, drops=self.drops, pin_memory=torch.cuda.is_available())
        if isinstance(source, StreamSource):
            stream = source.open(seed=seed, rank=rank, world=world)
            if start:
                stream.load_state_dict(load_stream_state(resume_from, rank, world))
            loader = StreamLoader(stream, self.processor, stage.batch_size, stop - start, **workers)
            return iter(loader), loader.state_dict
        order = make_order(train.sampler, source, stage.batch_size, seed, rank, world, group=stage.grad_accum)
        if not train.preencode:
            return iter(BatchLoader(source, self.processor, order, start, stop, **workers)), None
        data = EncodedSamples(source, self.processor, self.drops, cache=True)
        started = time.perf_counter()
        data.encode_all()
        self.data_seconds += time.perf_counter() - started
        return (data.batch(order.batch(k)) for k in range(start, stop)), None

    def _step(self, wrapped, optimizer, scheduler, batches, stage, state) -> tuple[float, int]:
        """One optimizer step over `grad_accum` micro-batches; returns (mean loss, tokens processed)."""
        acc = self.accelerator
        wrapped.train()
        total_loss, tokens = 0.0, 0
        for micro in range(stage.grad_accum):
            k = state.stage_step * stage.grad_accum + micro
            batch = next(batches)  # first: a DataLoader draws from the global RNG when it starts
            position = k * acc.num_processes + acc.process_index
            torch.manual_seed(batch_seed(self.recipe.seed, stage.name, position))
            state.samples_seen += stage.batch_size * acc.num_processes
            if batch is None:
                continue
            batch = {key: v.to(acc.device) if torch.is_tensor(v) else v for key, v in batch.items()}
            tokens += int(batch["attention_mask"].sum())
            last = micro == stage.grad_accum - 1
            with nullcontext() if last else self.engine.no_sync(wrapped):
                out = wrapped(**batch)
                self.engine.backward(wrapped, out.loss / stage.grad_accum)
            total_loss += float(out.loss.detach()) / stage.grad_accum
        self.engine.step(wrapped, optimizer, stage.max_grad_norm)
        scheduler.step()
        if stage.name not in self.state_bytes:
            self.state_bytes[stage.name] = self.engine.state_bytes(wrapped, optimizer)
        optimizer.zero_grad(set_to_none=True)
        loss = acc.reduce(torch.tensor(total_loss, device=acc.device), "mean")  # the global batch's loss
        return float(loss), tokens * acc.num_processes

    def _log(self, state: TrainerState, loss: float, tokens_per_s: float, lr: float) -> None:
        if state.global_step % self.recipe.train.log_every or not self.accelerator.is_main_process:
            return
        record = {"step": state.global_step, "loss": loss, "lr": lr, "tokens_per_s": tokens_per_s}
        with open(self.run_dir / METRICS_FILE, "a") as out:
            out.write(json.dumps(record) + "\n")
        if self.writer is not None:
            self.writer.add_scalar("train/loss", loss, state.global_step)
            self.writer.add_scalar("train/tokens_per_s", tokens_per_s, state.global_step)
            self.writer.add_scalar("train/lr", lr, state.global_step)

    def _maybe_checkpoint(self, optimizer, scheduler, state: TrainerState, stream_state) -> None:
        every = self.recipe.train.save_every
        if not every or state.global_step % every:
            return
        stream = stream_state() if stream_state is not None else None
        tokenizer = self.processor.tokenizer
        save_checkpoint(self.run_dir, self.engine, self.model, tokenizer, optimizer, scheduler, state, stream)
        if self.accelerator.is_main_process:
            prune_checkpoints(self.run_dir, self.recipe.train.keep_checkpoints)

    def _trim_metrics(self, global_step: int) -> None:
        """A resumed run logs again from its checkpoint: drop what the interrupted one logged after it."""
        path = self.run_dir / METRICS_FILE
        if path.exists():
            kept = [line for line in path.read_text().splitlines() if json.loads(line)["step"] <= global_step]
            path.write_text("".join(line + "\n" for line in kept))
