"""A recipe whose training data is a streamed dataset (`hf_streaming`): two ranks read their parts of the
shuffled stream over several epochs, and a run with one rank killed resumes at the exact sample, ending
with the uninterrupted run's weights."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image
from run_kit import RANK_ENV, kill_a_rank_after, run_metrics, run_weights, torchrun

from vlbridge.errors import ConfigError
from vlbridge.training.checkpointing import STREAM_DIR, load_stream_state

pytestmark = pytest.mark.slow
COLORS = {"red": (220, 30, 30), "green": (30, 200, 60), "blue": (40, 60, 230), "yellow": (230, 220, 40)}
ROWS = 40  # 20 a rank: a stage of the tiny recipe reads each rank's part about five times


def write_stream(folder: Path, files: int = 4) -> list[str]:
    """`ROWS` messages records in `files` JSON-lines files (the stream's shards), images as PNG paths."""
    folder.mkdir(parents=True)
    names = list(COLORS)
    paths = []
    for f in range(files):
        path = folder / f"part-{f}.jsonl"
        with open(path, "w") as out:
            for i in range(f, ROWS, files):
                color = names[i % len(names)]
                image = folder / f"{i}.png"
                Image.new("RGB", (20 + i % 7, 24), COLORS[color]).save(image)
                question = "<image>\nWhat color is the picture?" + " Answer in one word." * (i % 3)
                messages = [{"role": "user", "content": question}, {"role": "assistant", "content": color}]
                out.write(json.dumps({"id": f"s{i}", "image": str(image), "messages": messages}) + "\n")
        paths.append(str(path))
    return paths


def test_two_ranks_resume_a_shuffled_stream_at_the_exact_sample(tmp_path, recipe_tree):
    files = write_stream(tmp_path / "data")

    def launch(name: str, *flags: str) -> subprocess.Popen:
        tree = recipe_tree(steps=(4, 12), save_every=4) | {"output_dir": str(tmp_path / name)}
        tree["data"] = {
            "train": {"type": "hf_streaming", "path": "json", "data_files": files, "shuffle_buffer": 8}
        }
        tree["train"] |= {"log_every": 1, "num_workers": 1}
        recipe = tmp_path / f"{name}.yaml"
        recipe.write_text(yaml.safe_dump(tree))
        command = [torchrun(), "--standalone", "--nproc-per-node", "2", "-m", "vlbridge.cli", "train"]
        return subprocess.Popen(
            [*command, str(recipe), *flags], env=os.environ | RANK_ENV, stderr=subprocess.PIPE, text=True
        )

    straight = launch("straight")
    assert straight.wait(timeout=600) == 0, straight.stderr.read()[-3000:]
    losses = [m["loss"] for m in run_metrics(tmp_path / "straight")]
    assert len(losses) == 16

    killed = launch("killed")
    checkpoint = tmp_path / "killed" / "checkpoints" / "step-00000008"  # mid-stage 2, in an epoch's middle
    kill_a_rank_after(killed, checkpoint)
    assert not (tmp_path / "killed" / "model").exists(), "the run finished before it could be killed"
    positions = [load_stream_state(checkpoint, rank, 2) for rank in range(2)]
    # stage 2 has read 4 steps x 2 micro-batches x 4 samples on each rank: 32 of its 20-sample part
    assert [(p["epoch"], p["consumed"]) for p in positions] == [(1, 12), (1, 12)]

    resumed = launch("killed", "--resume")
    assert resumed.wait(timeout=600) == 0, resumed.stderr.read()[-3000:]
    assert [m["loss"] for m in run_metrics(tmp_path / "killed")] == losses
    expected, got = run_weights(tmp_path / "straight" / "model"), run_weights(tmp_path / "killed" / "model")
    assert expected.keys() == got.keys()
    different = [k for k in expected if not torch.equal(expected[k], got[k])]
    assert not different, f"{len(different)} tensors differ after resume, e.g. {different[:3]}"


def test_a_stream_position_is_resumed_only_with_as_many_ranks(tmp_path):
    (tmp_path / STREAM_DIR).mkdir()
    for rank in range(2):
        (tmp_path / STREAM_DIR / f"rank-{rank:05d}.json").write_text(
            json.dumps({"epoch": 0, "consumed": rank})
        )
    assert load_stream_state(tmp_path, 1, 2)["consumed"] == 1
    with pytest.raises(ConfigError, match="stream positions for 2 ranks, but this run has 4.*with 2 ranks"):
        load_stream_state(tmp_path, 0, 4)
