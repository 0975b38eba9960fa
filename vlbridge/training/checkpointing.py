"""Training checkpoints: the model in its HF-native layout plus optimizer, scheduler and trainer state.

Each checkpoint directory is written to a temp dir and renamed into place, so a run killed at any
moment leaves either the previous complete checkpoint or the new one, never half of one.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ..checkpoint import atomic_dir, write_model_files

STATE_FILE = "trainer_state.json"


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


def save_checkpoint(run_dir: Path, model, tokenizer, optimizer, scheduler, state: TrainerState) -> Path:
    path = checkpoint_dir(run_dir, state.global_step)
    with atomic_dir(path) as tmp:
        write_model_files(model, tmp, tokenizer)
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        (tmp / STATE_FILE).write_text(json.dumps(asdict(state), indent=2))
    return path


def latest_checkpoint(run_dir: Path) -> Path | None:
    found = sorted((run_dir / "checkpoints").glob("step-*/" + STATE_FILE))
    return found[-1].parent if found else None


def load_state(path: Path) -> TrainerState:
    return TrainerState(**json.loads((path / STATE_FILE).read_text()))


def prune_checkpoints(run_dir: Path, keep: int) -> None:
    found = sorted(p.parent for p in (run_dir / "checkpoints").glob("step-*/" + STATE_FILE))
    for old in found[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
