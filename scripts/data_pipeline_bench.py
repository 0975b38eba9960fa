"""Training data that does not fit in memory: memory and speed of the lazy record index + worker pipeline.

Writes a synthetic LLaVA JSON of --rows records (default 1,000,000) over a few hundred small PNGs, then,
each in a fresh process so the figures do not mix: the main process's RSS before and after indexing the
file and after --steps micro-steps of the pipeline, with the pipeline's samples/s (data only: read,
decode, encode, pad; no model) for each worker count; the same RSS after indexing --small-rows records,
to show it does not grow with rows; for scale, the RSS of loading the file whole with `json.load`
(what `read_records` did before the index); and, for both row counts, the RSS of a real `vlbridge`
training run over the file (tiny random model, tokenizer trained on the file's text, batches built by
DataLoader workers): after indexing, after the tokenizer, after each of --train-steps steps, and its peak.

    python scripts/data_pipeline_bench.py                       # 1,000,000 and 100,000 rows
    python scripts/data_pipeline_bench.py --rows 200000 --workers 0 2 --train-steps 0
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

WARM_STEPS = 10  # training steps before RSS is expected to be flat: growth per step is fitted after them
WORDS = "red blue green yellow circle square triangle cross left right above below of the small large".split()


def rss_mb(pid: str = "self", field: str = "VmRSS") -> float:
    """Resident set size from /proc/<pid>/status (VmRSS, kB; `field="VmHWM"`: its peak), in MB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def children() -> list[str]:
    """Pids of this process's children (DataLoader workers), whichever of its threads started them."""
    pids = []
    for task in Path("/proc/self/task").iterdir():
        try:
            pids += (task / "children").read_text().split()
        except OSError:  # a thread that just ended
            pass
    return pids


class RssSampler(threading.Thread):
    """This process's RSS, and its largest child's, every `every` seconds until stopped."""

    def __init__(self, every: float = 0.5) -> None:
        super().__init__(daemon=True)
        self.every, self.done = every, threading.Event()
        self.samples: list[float] = []
        self.worker_max = 0.0

    def run(self) -> None:
        while not self.done.wait(self.every):
            self.samples.append(rss_mb())
            for pid in children():
                try:
                    self.worker_max = max(self.worker_max, rss_mb(pid))
                except OSError:  # a worker that just left
                    pass

    def stop(self) -> None:
        self.done.set()
        self.join()


def write_images(folder: Path, count: int, seed: int = 0) -> None:
    from PIL import Image

    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        size = (rng.randint(24, 96), rng.randint(24, 96))
        color = tuple(rng.randrange(256) for _ in range(3))
        Image.new("RGB", size, color).save(folder / f"{i}.png")


def write_llava(path: Path, rows: int, images: int, seed: int = 0) -> None:
    """`rows` LLaVA records, streamed to disk: 9 in 10 with one of `images` PNGs, 1 to 4 turns each."""
    rng = random.Random(seed)
    with open(path, "w") as out:
        out.write("[\n")
        for i in range(rows):
            turns = []
            for _turn in range(rng.randint(1, 4)):
                question = " ".join(rng.choices(WORDS, k=rng.randint(3, 20))) + "?"
                turns.append({"from": "human", "value": question})
                turns.append({"from": "gpt", "value": " ".join(rng.choices(WORDS, k=rng.randint(1, 40)))})
            record = {"id": f"{i:08d}", "conversations": turns}
            if i % 10:
                record["image"] = f"images/{i % images}.png"
                turns[0]["value"] = "<image>\n" + turns[0]["value"]
            out.write(("," if i else "") + json.dumps(record) + "\n")
        out.write("]\n")


def measure(path: str, steps: int, batch_size: int, workers: list[int]) -> dict:
    """In this (fresh) process: RSS before/after indexing, then each worker count's pipeline run."""
    import torch

    from vlbridge.data.formats import LlavaJsonConfig, load_source
    from vlbridge.processing import DropCounter
    from vlbridge.testing import tiny_processor
    from vlbridge.training.loader import BatchLoader
    from vlbridge.training.sampler import BatchOrder

    torch.set_num_threads(1)
    processor = tiny_processor()
    result = {"rss_before": rss_mb()}
    started = time.perf_counter()
    samples = load_source(LlavaJsonConfig(path=path))
    result |= {"rows": len(samples), "index_s": time.perf_counter() - started, "rss_index": rss_mb()}
    order = BatchOrder(len(samples), batch_size, seed=0)
    for count in workers if steps else []:
        drops = DropCounter()
        started = time.perf_counter()
        loader = iter(BatchLoader(samples, processor, order, 0, steps, num_workers=count, drops=drops))
        next(loader)
        first = time.perf_counter()
        for _ in loader:
            pass
        done = time.perf_counter()
        result[f"workers_{count}"] = {
            "samples_s": steps * batch_size / (done - started),
            "steady_samples_s": (steps - 1) * batch_size / (done - first),
            "rss_after": rss_mb(),
            "dropped": drops.total,
        }
    return result


def json_load_rss(path: str) -> dict:
    started = time.perf_counter()
    before = rss_mb()
    records = json.loads(Path(path).read_text())
    return {
        "rss_before": before,
        "rss_loaded": rss_mb(),
        "seconds": time.perf_counter() - started,
        "n": len(records),
    }


def train_tree(path: str, image_folder: str, run_dir: str, steps: int, batch_size: int, workers: int) -> dict:
    """A one-stage recipe over the LLaVA file: tiny random llama + convnext, BPE trained on the file's text,
    micro-batches built lazily by `workers` DataLoader workers, no evaluation."""
    from vlbridge.testing import tiny_recipe_model

    return {
        "name": "data-bench",
        "output_dir": run_dir,
        "seed": 0,
        # max_length 512: the longest synthetic record (4 turns of up to 60 words) fits, nothing is dropped
        "model": tiny_recipe_model(512),
        "tokenizer": {"train_vocab_size": 400},
        "data": {"train": {"type": "llava_json", "path": path, "image_folder": image_folder}},
        "train": {
            "preencode": False,
            "num_workers": workers,
            "log_every": max(steps, 1),
            "stages": [
                {
                    "name": "train",
                    "modules": {"connector": "full", "llm": "full"},
                    "steps": steps,
                    "batch_size": batch_size,
                    "lr": 1e-3,
                }
            ],
        },
    }


def train_rss(path: str, image_folder: str, run_dir: str, steps: int, batch_size: int, workers: int) -> dict:
    """In this (fresh) process: RSS after indexing the file, after the tokenizer, after every training step
    of a real `run_training`, and its peak. Timers and RSS probes are wrapped around `training_texts`,
    `load_tokenizer` and `Trainer._step` here, in this process only; the library runs unchanged."""
    import torch
    from rich.console import Console

    from vlbridge.data.formats import load_source
    from vlbridge.recipe import parse_recipe
    from vlbridge.training import run
    from vlbridge.training.trainer import Trainer

    torch.set_num_threads(1)
    result: dict = {"rss_before": rss_mb()}
    recipe = parse_recipe(train_tree(path, image_folder, run_dir, steps, batch_size, workers))
    started = time.perf_counter()
    samples = load_source(recipe.data.train)  # what run_training's own load_source costs
    result |= {"rows": len(samples), "index_s": time.perf_counter() - started, "rss_index": rss_mb()}
    del samples  # run_training indexes the file again itself

    def timed(name: str, fn):
        def wrapper(*args, **kwargs):
            started = time.perf_counter()
            out = fn(*args, **kwargs)
            result[f"{name}_s"], result[f"rss_{name}"] = time.perf_counter() - started, rss_mb()
            if name == "texts":
                result["texts"] = len(out)
            return out

        return wrapper

    run.training_texts = timed("texts", run.training_texts)
    run.load_tokenizer = timed("tokenizer", run.load_tokenizer)
    step_rss: list[float] = []
    step = Trainer._step

    def probed_step(self, *args, **kwargs):
        out = step(self, *args, **kwargs)
        step_rss.append(rss_mb())
        return out

    Trainer._step = probed_step
    sampler = RssSampler()
    sampler.start()
    started = time.perf_counter()
    summary = run.run_training(recipe, overwrite=True, evaluate=None, console=Console(file=sys.stderr))
    result["run_s"] = time.perf_counter() - started
    sampler.stop()
    return result | {
        "train_s": summary["train_seconds"],
        "dropped": sum(summary["dropped_samples"].values()),
        "step_rss": step_rss,
        "rss_end": rss_mb(),
        "rss_peak": rss_mb(field="VmHWM"),
        "sampled_max": max(sampler.samples, default=float("nan")),
        "worker_max": sampler.worker_max,
    }


def in_fresh_process(*args: str) -> dict:
    out = subprocess.run([sys.executable, __file__, *args], check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument(
        "--small-rows", type=int, default=100_000, help="second size, index RSS only (0: skip)"
    )
    parser.add_argument("--images", type=int, default=300)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--no-json-load", action="store_true", help="skip the whole-file json.load figure")
    parser.add_argument(
        "--train-steps", type=int, default=200, help="steps of a real training run per row count (0: skip)"
    )
    parser.add_argument("--train-workers", type=int, default=2, help="DataLoader workers of the training run")
    parser.add_argument(
        "--dir", type=Path, default=None, help="where to write the data (default: a temp dir)"
    )
    parser.add_argument("--measure", help=argparse.SUPPRESS)
    parser.add_argument("--json-load", help=argparse.SUPPRESS)
    parser.add_argument("--train", nargs=3, help=argparse.SUPPRESS)  # json, image folder, run dir
    args = parser.parse_args()
    if args.train:
        print(json.dumps(train_rss(*args.train, args.train_steps, args.batch_size, args.train_workers)))
        return
    if args.measure:
        print(json.dumps(measure(args.measure, args.steps, args.batch_size, args.workers)))
        return
    if args.json_load:
        print(json.dumps(json_load_rss(args.json_load)))
        return

    folder = args.dir or Path(tempfile.mkdtemp(prefix="vlbridge-data-bench-"))
    write_images(folder / "images", args.images)
    sizes = [args.rows] + ([args.small_rows] if args.small_rows else [])
    results = {}
    for rows in sizes:
        path = folder / f"llava_{rows}.json"
        started = time.perf_counter()
        write_llava(path, rows, args.images)
        written = time.perf_counter() - started
        steps = args.steps if rows == args.rows else 0
        common = ["--steps", str(steps), "--batch-size", str(args.batch_size), "--workers"]
        result = in_fresh_process("--measure", str(path), *common, *map(str, args.workers))
        result |= {"write_s": written, "file_mb": path.stat().st_size / 2**20}
        if not args.no_json_load:
            result["json_load"] = in_fresh_process("--json-load", str(path))
        if args.train_steps:
            run_dir = str(folder / f"run_{rows}")
            steps = ["--train-steps", str(args.train_steps), "--train-workers", str(args.train_workers)]
            steps += ["--batch-size", str(args.batch_size)]
            result["train"] = in_fresh_process("--train", str(path), str(folder), run_dir, *steps)
        results[rows] = result

    if args.dir is None:
        shutil.rmtree(folder)
    print(f"LLaVA JSON over {args.images} PNGs; tiny processor, batch size {args.batch_size}")
    header = ["rows", "file MB", "write s", "index s", "RSS before", "RSS indexed", "index +MB"]
    header += ["json.load +MB", "json.load s"]
    widths = [10, 8, 8, 8, 11, 12, 10, 14, 12]
    print(" ".join(f"{h:>{w}}" for h, w in zip(header, widths, strict=True)))
    nan = float("nan")
    for rows, r in results.items():
        loaded = r.get("json_load", {})
        cells = [
            f"{rows:,}",
            f"{r['file_mb']:.0f}",
            f"{r['write_s']:.1f}",
            f"{r['index_s']:.1f}",
            f"{r['rss_before']:.0f} MB",
            f"{r['rss_index']:.0f} MB",
            f"{r['rss_index'] - r['rss_before']:+.0f}",
            f"{loaded.get('rss_loaded', nan) - loaded.get('rss_before', nan):+.0f}",
            f"{loaded.get('seconds', nan):.1f}",
        ]
        print(" ".join(f"{c:>{w}}" for c, w in zip(cells, widths, strict=True)))
    big = results[args.rows]
    steps = f"{args.steps} micro-steps of {args.batch_size}"
    print(f"\npipeline over {args.rows:,} rows, {steps} (data only, no model):")
    print(f"{'workers':>8} {'samples/s':>10} {'steady samples/s':>17} {'RSS after steps':>16} {'dropped':>8}")
    for count in args.workers:
        w = big.get(f"workers_{count}")
        if w:
            print(
                f"{count:>8} {w['samples_s']:>10.0f} {w['steady_samples_s']:>17.0f} "
                f"{w['rss_after']:>13.0f} MB {w['dropped']:>8}"
            )
    print("\n(RSS: the main process's VmRSS; 'steady' leaves out the first batch, i.e. worker start-up.)")
    if args.train_steps:
        print_training(results, args)


def slope(values: list[float]) -> float:
    """Least-squares slope of `values` against their index (0 for fewer than two)."""
    n = len(values)
    if n < 2:
        return 0.0
    mean_x, mean_y = (n - 1) / 2, sum(values) / n
    covariance = sum((x - mean_x) * (y - mean_y) for x, y in enumerate(values))
    return covariance / sum((x - mean_x) ** 2 for x in range(n))


def print_training(results: dict, args: argparse.Namespace) -> None:
    trained = {rows: r["train"] for rows, r in results.items()}
    print(
        f"\ntraining: {args.train_steps} steps of {args.batch_size}, tiny llama + convnext, "
        f"{args.train_workers} DataLoader workers, BPE tokenizer trained on every row's messages:"
    )
    warm = min(WARM_STEPS, args.train_steps)
    header = ["rows", "texts s", "BPE s", "RSS indexed", "RSS tokenizer", "RSS step 1", f"RSS step {warm}"]
    header += [f"RSS step {args.train_steps}", "steps max", "kB/step", "peak RSS", "worker max", "train s"]
    header.append("dropped")
    widths = [10, 8, 7, 12, 14, 11, 12, 13, 10, 8, 9, 11, 8, 8]
    print(" ".join(f"{h:>{w}}" for h, w in zip(header, widths, strict=True)))

    def figures(t: dict) -> list[float]:
        rss = t["step_rss"]
        return [
            *(t["texts_s"], t["tokenizer_s"], t["rss_index"], t["rss_tokenizer"], rss[0], rss[warm - 1]),
            *(rss[-1], max(rss), slope(rss[warm - 1 :]) * 1024, t["rss_peak"], t["worker_max"], t["train_s"]),
        ]

    formats = ["{:.1f}", "{:.1f}"] + ["{:.0f} MB"] * 6 + ["{:+.1f}", "{:.0f} MB", "{:.0f} MB", "{:.1f}"]
    for rows, t in trained.items():
        cells = [f"{rows:,}"] + [f.format(v) for f, v in zip(formats, figures(t), strict=True)]
        cells.append(str(t["dropped"]))
        print(" ".join(f"{c:>{w}}" for c, w in zip(cells, widths, strict=True)))
    if len(trained) == 2:
        (big, a), (small, b) = trained.items()
        ratios = [x / y if y else float("nan") for x, y in zip(figures(a), figures(b), strict=True)]
        ratios[8] = float("nan")  # a ratio of two near-zero slopes says nothing
        cells = [f"{big / small:.3g}x rows"] + [f"{r:.2f}x" for r in ratios] + [""]
        print(" ".join(f"{c:>{w}}" for c, w in zip(cells, widths, strict=True)))
    print(
        "(texts s: `training_texts` reading every row's messages; BPE s: training the tokenizer on them;\n"
        " RSS tokenizer: after it, its texts still held; RSS step k: after the k-th optimizer step;\n"
        " steps max: the largest of those; kB/step: least-squares slope of RSS over steps "
        f"{warm}..N (the first steps\n warm up allocators and autograd); peak: VmHWM of the whole run;\n"
        " worker max: the largest DataLoader worker's VmRSS, sampled every 0.5 s, pages shared with the main "
        "process included)"
    )


if __name__ == "__main__":
    main()
