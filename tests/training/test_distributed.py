"""Two CPU processes under torchrun (gloo): the same recipe trains, shards data and saves once."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import yaml


@pytest.mark.slow
def test_torchrun_two_processes(tmp_path, recipe_tree):
    tree = recipe_tree(steps=(2, 3))
    tree["output_dir"] = str(tmp_path / "ddp")
    recipe_path = tmp_path / "ddp.yaml"
    recipe_path.write_text(yaml.safe_dump(tree))
    torchrun = shutil.which("torchrun", path=os.path.dirname(sys.executable))
    result = subprocess.run(
        [torchrun, "--standalone", "--nproc_per_node", "2", "-m", "vlbridge.cli", "train", str(recipe_path)],
        capture_output=True,
        text=True,
        timeout=600,
        env=os.environ | {"OMP_NUM_THREADS": "1"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((tmp_path / "ddp" / "results.json").read_text())
    # each optimizer step consumed a batch on both ranks: 2*4*2 (align) + 3*4*2*2 (finetune, accum 2)
    assert summary["samples_seen"] == 2 * 4 * 2 + 3 * 4 * 2 * 2
    assert (tmp_path / "ddp" / "model" / "config.json").is_file()
