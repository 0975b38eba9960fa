"""Kill a training run after a checkpoint, resume it, and end with exactly the uninterrupted weights."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from vlbridge.recipe import parse_recipe
from vlbridge.training.run import run_training


def weights(model_dir: Path) -> dict:
    tensors = {f"llm/{k}": v for k, v in load_file(str(model_dir / "llm" / "model.safetensors")).items()}
    tensors |= {f"frontend/{k}": v for k, v in load_file(str(model_dir / "frontend.safetensors")).items()}
    adapter = model_dir / "adapters" / "llm" / "adapter_model.safetensors"
    tensors |= {f"lora/{k}": v for k, v in load_file(str(adapter)).items()}
    return tensors


def kill_after_checkpoint(recipe_path: Path, run_dir: Path, step: int) -> None:
    """Run `vlbridge train` in a subprocess and SIGKILL it as soon as checkpoint `step` exists."""
    # same intra-op thread count as this process: float reductions must run in the same order
    env = os.environ | {"PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": str(torch.get_num_threads())}
    proc = subprocess.Popen(
        [sys.executable, "-m", "vlbridge.cli", "train", str(recipe_path), "--no-eval"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    marker = run_dir / "checkpoints" / f"step-{step:08d}" / "trainer_state.json"
    deadline = time.monotonic() + 240
    while not marker.exists():
        if proc.poll() is not None:
            pytest.fail(f"training exited before checkpoint {step}: {proc.stderr.read().decode()[-2000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail("no checkpoint within 240 s")
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (run_dir / "model").exists(), "the run finished before it could be killed"


@pytest.mark.slow
def test_killed_and_resumed_run_equals_uninterrupted(tmp_path, recipe_tree):
    steps = (6, 40)  # long enough after the kill point that the kill lands mid-run
    straight = parse_recipe(
        recipe_tree(steps=steps, save_every=4) | {"output_dir": str(tmp_path / "straight")}
    )
    run_training(straight)

    interrupted_tree = recipe_tree(steps=steps, save_every=4) | {"output_dir": str(tmp_path / "killed")}
    recipe_path = tmp_path / "killed.yaml"
    recipe_path.write_text(yaml.safe_dump(interrupted_tree))
    kill_after_checkpoint(recipe_path, tmp_path / "killed", step=8)  # inside stage 2 (LoRA, dropout)
    run_training(parse_recipe(interrupted_tree), resume=True)

    expected, got = weights(tmp_path / "straight" / "model"), weights(tmp_path / "killed" / "model")
    assert expected.keys() == got.keys()
    different = [k for k in expected if not (expected[k] == got[k]).all()]
    assert not different, f"{len(different)} tensors differ after resume, e.g. {different[:3]}"
