"""Training data that does not fit in memory: memory and speed of the lazy record index + worker pipeline.

Writes a synthetic LLaVA JSON of --rows records (default 1,000,000) over a few hundred small PNGs, then,
each in a fresh process so the figures do not mix: the main process's RSS before and after indexing the
file and after --steps micro-steps of the pipeline, with the pipeline's samples/s (data only: read,
decode, encode, pad; no model) for each worker count; the same RSS after indexing --small-rows records,
to show it does not grow with rows; and, for scale, the RSS of loading the file whole with `json.load`
(what `read_records` did before the index).

    python scripts/data_pipeline_bench.py                       # 1,000,000 and 100,000 rows
    python scripts/data_pipeline_bench.py --rows 200000 --workers 0 2
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

WORDS = "red blue green yellow circle square triangle cross left right above below of the small large".split()


def rss_mb(pid: str = "self") -> float:
    """Resident set size from /proc/<pid>/status (VmRSS, kB), in MB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


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
        "--dir", type=Path, default=None, help="where to write the data (default: a temp dir)"
    )
    parser.add_argument("--measure", help=argparse.SUPPRESS)
    parser.add_argument("--json-load", help=argparse.SUPPRESS)
    args = parser.parse_args()
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


if __name__ == "__main__":
    main()
