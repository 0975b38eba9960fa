"""Training on samples encoded as the loop asks, in DataLoader workers, is training on pre-encoded ones."""

from __future__ import annotations

import copy
import json

from safetensors.torch import load_file

from vlbridge.recipe import parse_recipe
from vlbridge.training.run import run_training


def test_worker_built_batches_train_exactly_like_preencoded_ones(tmp_path, recipe_tree):
    runs = {}
    for name, train in {"preencoded": {}, "workers": {"preencode": False, "num_workers": 2}}.items():
        tree = copy.deepcopy(recipe_tree(steps=(2, 3)))
        tree["train"] |= {"log_every": 1, **train}
        tree["output_dir"] = str(tmp_path / name)
        summary = run_training(parse_recipe(tree))
        lines = (tmp_path / name / "metrics.jsonl").read_text().splitlines()
        weights = load_file(str(tmp_path / name / "model" / "frontend.safetensors"))
        runs[name] = (summary["samples_seen"], [json.loads(line)["loss"] for line in lines], weights)
    (seen, losses, weights), (seen_w, losses_w, weights_w) = runs["preencoded"], runs["workers"]
    assert seen == seen_w == 2 * 4 + 3 * 4 * 2
    assert losses == losses_w and len(losses) == 5
    assert all((weights[k] == weights_w[k]).all() for k in weights)
