"""Two ranks with FSDP, DeepSpeed ZeRO-2 and ZeRO-3, and DDP, against one process, on the quickstart recipe at
the same global batch.

    python scripts/sharding_parity.py [--steps 50] [--out runs/sharding_parity]

The ranks are CPU processes (gloo) under `torchrun`; the single process accumulates twice as many
micro-batches per step, so all three see the same samples. Printed: the loss at every step (and the largest
difference to the single process), and the bytes of parameters, gradients and optimizer state each rank
held (measured from its tensors, `rank_state_bytes` in results.json), each engine over DDP.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent


def recipe_tree(steps: int, out: Path, name: str, engine: str | dict, accumulate: int) -> dict:
    tree = yaml.safe_load((ROOT / "recipes" / "quickstart.yaml").read_text())
    stage = tree["train"]["stages"][0] | {"steps": steps, "grad_accum": accumulate}
    tree["train"] |= {"stages": [stage], "distributed": engine, "log_every": 1, "preencode": False}
    tree["data"]["train"]["n"] = 2000  # the stage reads its own data; this only feeds the tokenizer
    tree |= {"name": name, "output_dir": str(out / name)}
    return tree


def run(out: Path, name: str, tree: dict, ranks: int) -> float:
    path = out / f"{name}.yaml"
    path.write_text(yaml.safe_dump(tree))
    command = [sys.executable, "-m", "vlbridge.cli", "train", str(path), "--no-eval", "--overwrite"]
    if ranks > 1:
        torchrun = shutil.which("torchrun", path=os.path.dirname(sys.executable))
        command = [torchrun, "--standalone", "--nproc-per-node", str(ranks), *command[1:]]
    threads = max(1, (os.cpu_count() or 1) // ranks)
    env = os.environ | {"OMP_NUM_THREADS": str(threads)}
    started = time.perf_counter()
    subprocess.run(command, check=True, env=env, stdout=subprocess.DEVNULL)
    return time.perf_counter() - started


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--out", default="runs/sharding_parity")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    runs = {
        "single": ("ddp", 1, 2),
        "ddp": ("ddp", 2, 1),
        "fsdp": ("fsdp", 2, 1),
        "zero2": ({"type": "deepspeed", "zero_stage": 2}, 2, 1),
        "zero3": ({"type": "deepspeed", "zero_stage": 3}, 2, 1),
    }
    seconds, losses, held = {}, {}, {}
    for name, (engine, ranks, accumulate) in runs.items():
        seconds[name] = run(out, name, recipe_tree(args.steps, out, name, engine, accumulate), ranks)
        lines = (out / name / "metrics.jsonl").read_text().splitlines()
        losses[name] = [json.loads(line)["loss"] for line in lines]
        held[name] = json.loads((out / name / "results.json").read_text())["rank_state_bytes"]["lone_objects"]

    print(f"quickstart stage 1, {args.steps} steps, global batch 128 (2 ranks x 64, or 1 process x 64 x 2)")
    print(f"{'step':>4} " + " ".join(f"{name:>10}" for name in runs))
    for step, row in enumerate(zip(*(losses[n] for n in runs), strict=True), 1):
        if step <= 5 or step % 10 == 0:
            print(f"{step:>4} " + " ".join(f"{loss:>10.6f}" for loss in row))
    for name in list(runs)[1:]:
        gap = max(abs(a - b) for a, b in zip(losses[name], losses["single"], strict=True))
        print(f"largest |loss - single| over {args.steps} steps, {name}: {gap:.2e}")
    engines = list(runs)[2:]
    print(f"{'per rank MB':>12} {'ddp':>8} " + " ".join(f"{n:>8} {'/ddp':>6}" for n in engines))
    for kind in ("parameters", "gradients", "optimizer", "all"):
        mb = {n: (sum(held[n].values()) if kind == "all" else held[n][kind]) / 2**20 for n in runs}
        cells = " ".join(f"{mb[n]:>8.3f} {mb[n] / mb['ddp']:>6.3f}" for n in engines)
        print(f"{kind:>12} {mb['ddp']:>8.3f} {cells}")
    print("wall seconds: " + ", ".join(f"{n} {s:.0f}" for n, s in seconds.items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
