"""Training checkpoints: the model (its files, or its shards under FSDP / DeepSpeed) plus optimizer,
scheduler and trainer state.

Every rank writes its part into one temp dir beside the checkpoint, which the main process renames into
place once all are done, so a run killed at any moment (any rank) leaves either the previous complete
checkpoint or the new one, never half of one.
"""

from __future__ import annotations

import json
import shutil
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ..checkpoint import replace_dir
from ..errors import ConfigError
from .distributed import SHARDS_DIR
from .zero import DEEPSPEED_DIR

STATE_FILE = "trainer_state.json"
SCHEDULER_FILE = "scheduler.pt"
STREAM_DIR = "stream"  # one JSON per rank: where its part of a streamed dataset stands


@dataclass
class TrainerState:
    """Where training stands: enough, with the seed, to continue exactly (the RNG is reseeded per step)."""

    stage: int = 0
    stage_step: int = 0
    global_step: int = 0
    samples_seen: int = 0
    train_seconds: float = 0.0


def checkpoint_dir(run_dir: Path, global_step: int) -> Path:
    return run_dir / "checkpoints" / f"step-{global_step:08d}"


def save_checkpoint(
    run_dir: Path,
    engine,
    model,
    tokenizer,
    optimizer,
    scheduler,
    state: TrainerState,
    stream: dict | None = None,
) -> Path:
    """Called on every rank: the engine writes weights and optimizer (the main process, or each its shard);
    `stream`, this rank's position in a streamed dataset, goes beside them."""
    path = checkpoint_dir(run_dir, state.global_step)
    accelerator = engine.accelerator
    with shared_atomic_dir(path, accelerator) as tmp:
        engine.save(tmp, model, optimizer, tokenizer)
        if stream is not None:
            (tmp / STREAM_DIR).mkdir(exist_ok=True)
            (tmp / STREAM_DIR / f"rank-{accelerator.process_index:05d}.json").write_text(json.dumps(stream))
        if accelerator.is_main_process:
            torch.save(scheduler.state_dict(), tmp / SCHEDULER_FILE)
            (tmp / STATE_FILE).write_text(json.dumps(asdict(state), indent=2))
    return path


@contextmanager
def shared_atomic_dir(path: Path, accelerator):
    """One temp dir for all ranks (a fixed name beside `path`, so a killed run's leftover is cleared first),
    renamed into place by the main process after every rank has finished writing."""
    tmp = path.with_name(f".{path.name}.partial")
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    yield tmp
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        replace_dir(tmp, path)


def is_sharded(path: Path) -> bool:
    """A checkpoint whose weights are in per-rank shards (FSDP, DeepSpeed), not in model files."""
    return (path / SHARDS_DIR).is_dir() or (path / DEEPSPEED_DIR).is_dir()


def latest_checkpoint(run_dir: Path) -> Path | None:
    found = sorted((run_dir / "checkpoints").glob("step-*/" + STATE_FILE))
    return found[-1].parent if found else None


def load_stream_state(path: Path, rank: int, world: int) -> dict:
    """This rank's stream position in checkpoint `path`, which must come from a run with as many ranks (each
    read its own part of the stream)."""
    found = sorted((path / STREAM_DIR).glob("rank-*.json"))
    if len(found) != world:
        raise ConfigError(
            f"{path} holds stream positions for {len(found)} ranks, but this run has {world}: a streamed "
            f"dataset is split between ranks, so resume it with {len(found) or 'the same number of'} ranks"
        )
    return json.loads(found[rank].read_text())


def load_state(path: Path) -> TrainerState:
    return TrainerState(**json.loads((path / STATE_FILE).read_text()))


def prune_checkpoints(run_dir: Path, keep: int) -> None:
    found = sorted(p.parent for p in (run_dir / "checkpoints").glob("step-*/" + STATE_FILE))
    for old in found[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
