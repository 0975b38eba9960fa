"""Helpers for the tests that launch real multi-process training runs (`torchrun` on CPU): how ranks are
started, what their runs are compared by, and how one rank is killed mid-run."""

from __future__ import annotations

import json
import os
import shutil
import signal
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

# ranks on CPU: one thread each, so that two of them on two cores add up as one process does
RANK_ENV = {"OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def torchrun() -> str:
    """The `torchrun` beside this interpreter."""
    return shutil.which("torchrun", path=os.path.dirname(sys.executable))


def run_weights(model_dir: str | Path) -> dict[str, torch.Tensor]:
    """Every tensor a run saved (LLM, front-end, LoRA adapters), keyed by file and name: what runs that
    should agree are compared by."""
    model_dir = Path(model_dir)
    files = ["llm/model.safetensors", "frontend.safetensors", "adapters/llm/adapter_model.safetensors"]
    return {
        f"{f}/{k}": v
        for f in files
        if (model_dir / f).is_file()
        for k, v in load_file(str(model_dir / f)).items()
    }


def run_metrics(run_dir: str | Path) -> list[dict]:
    """The run's metrics.jsonl records (step, loss, lr, tokens/s)."""
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def kill_a_rank_after(launch, checkpoint: str | Path, timeout: float = 300) -> None:
    """SIGKILL one rank of a running `torchrun` launch (a Popen) as soon as `checkpoint` is complete;
    torchrun then stops the others. Fails if the run ends first or no checkpoint comes within `timeout`."""
    marker, deadline = Path(checkpoint) / "trainer_state.json", time.monotonic() + timeout
    while not marker.exists():
        assert launch.poll() is None, f"the run ended before {checkpoint}"
        assert time.monotonic() < deadline, f"no {checkpoint} within {timeout} s"
        time.sleep(0.02)
    ranks = [int(c) for c in Path(f"/proc/{launch.pid}/task/{launch.pid}/children").read_text().split()]
    assert len(ranks) >= 2, ranks
    os.kill(ranks[-1], signal.SIGKILL)
    assert launch.wait(timeout=120) != 0
