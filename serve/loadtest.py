"""Load benchmark of `vlbridge serve`: closed-loop streaming clients against a real server process.

    python -m vlbridge.serve.loadtest CHECKPOINT [--clients 1 4 16 64] [--duration 30] [--max-tokens 32]

CHECKPOINT is a run/checkpoint directory, or `random:tiny` / `random:mid` for a random model written to
a temporary directory. For each client count, every client sends image + question requests (streamed,
fixed length via `ignore_eos`) back to back for `--duration` seconds; reported: requests/s, output
tokens/s, p50/p95 time to first token and inter-token latency, errors, and the server's peak resident
memory. The same engine with `--max-batch-size 1` (one request at a time) serves `--baseline-clients`
in the same run for the batching speed-up; `--roofline` adds batch-1 decode speed against memory
bandwidth (serve/roofline.py). Results go to OUTPUT/results.json and a markdown table on stdout.

`--peer transformers` instead puts `vlbridge serve` beside `transformers serve` on the same model
(serve/peer.py): image chats against its llava-hf export, text chats against the LLM alone (continuous
batching on, which the peer has for text only), at `--peer-clients` (1 16 64), with output tokens/s, p50/p99
time to first token, errors, the ratio, and whether both give the same greedy answers.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import httpx
from PIL import Image, ImageDraw

from .peer import greedy_answers, llava_hf_copy, llm_copy, transformers_serve

# A mid-size random model: a 12-layer, 768-wide Llama (≈75 M LLM parameters, 300 MB in fp32, far beyond
# any CPU cache, so decode is bandwidth-bound) over a small ViT; the tiny one is vlbridge.testing's.
MID_OVERRIDES = {
    "llm": {
        "config": {
            "hidden_size": 768,
            "intermediate_size": 2048,
            "num_hidden_layers": 12,
            "num_attention_heads": 12,
            "num_key_value_heads": 4,
            "max_position_embeddings": 2048,
        }
    },
    "frontend": {
        "type": "llava",
        "vision": {"config": {"hidden_size": 256, "intermediate_size": 512, "image_size": 64}},
        "connector": {"merge": 1},  # as LLaVA's: one token a patch, so transformers' LLaVA can load it
        "image": {"size": 64},
    },
    "max_length": 1024,
}

TINY_OVERRIDES = {"frontend": {"connector": {"merge": 1}}}  # vlbridge.testing's tiny model, as LLaVA's


@dataclass
class Level:
    """What the clients of one load level saw."""

    clients: int
    batch: str
    wall_s: float = 0.0
    ttft: list[float] = field(default_factory=list)
    gaps: list[float] = field(default_factory=list)
    tokens: int = 0
    requests: int = 0
    errors: int = 0
    error_samples: list[str] = field(default_factory=list)

    def summary(self) -> dict:
        def pct(values: list[float], q: float) -> float | None:
            if len(values) < 2:  # quantiles need two; one request's figure is its own every percentile
                return round(1000 * values[0], 2) if values else None
            return round(1000 * statistics.quantiles(values, n=100)[q - 1], 2)

        return {
            "clients": self.clients,
            "batching": self.batch,
            "requests": self.requests,
            "errors": self.errors,
            "requests_per_s": round(self.requests / self.wall_s, 3),
            "output_tokens_per_s": round(self.tokens / self.wall_s, 2),
            "ttft_ms_p50": pct(self.ttft, 50),
            "ttft_ms_p95": pct(self.ttft, 95),
            "ttft_ms_p99": pct(self.ttft, 99),
            "itl_ms_p50": pct(self.gaps, 50),
            "itl_ms_p95": pct(self.gaps, 95),
            "wall_s": round(self.wall_s, 2),
            "error_samples": self.error_samples[:3],
        }


def question_image() -> str:
    """A shapes-like scene as a PNG data URL (the same for every request)."""
    image = Image.new("RGB", (64, 64), (245, 245, 245))
    ImageDraw.Draw(image).ellipse((16, 16, 44, 44), fill=(220, 30, 30))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


_CONTENT, _EMPTY = '"delta": {"content": "', '"delta": {"content": ""'  # the server's chunk layout


async def one_request(client: httpx.AsyncClient, body: dict, level: Level) -> None:
    start = time.perf_counter()
    stamps: list[float] = []
    usage = None
    try:
        async with client.stream("POST", "/v1/chat/completions", json=body) as response:
            if response.status_code != 200:
                raise RuntimeError(f"HTTP {response.status_code}: {(await response.aread())[:200]!r}")
            async for line in response.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                if (
                    _CONTENT in line and _EMPTY not in line
                ):  # fast path: the client must not be the bottleneck
                    stamps.append(time.perf_counter())
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    raise RuntimeError(chunk["error"]["message"])
                if chunk.get("usage"):
                    usage = chunk["usage"]
                if chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                    stamps.append(time.perf_counter())
    except Exception as err:  # counted, never fatal: the benchmark reports errors
        level.errors += 1
        level.error_samples.append(f"{type(err).__name__}: {err}")
        return
    if not stamps or usage is None:
        level.errors += 1
        level.error_samples.append("no content or no usage in the stream")
        return
    level.requests += 1
    level.tokens += usage["completion_tokens"]
    level.ttft.append(stamps[0] - start)
    level.gaps += [b - a for a, b in zip(stamps, stamps[1:], strict=False)]


def image_chat(question: str = "What color is the circle?") -> list[dict]:
    image = {"type": "image_url", "image_url": {"url": question_image()}}
    return [{"role": "user", "content": [image, {"type": "text", "text": question}]}]


def text_chat(question: str = "Which shape has three sides, and which has four?") -> list[dict]:
    return [{"role": "user", "content": question}]


def request_body(
    messages: list[dict], max_tokens: int, *, model: str | None = None, fixed: bool = True
) -> dict:
    """A streamed greedy request; `fixed`: exactly `max_tokens` tokens (`ignore_eos`, a vlbridge extension
    other servers refuse)."""
    body = {
        "messages": messages,
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if model is not None:
        body["model"] = model
    return body | ({"ignore_eos": True} if fixed else {})


async def run_level(url: str, clients: int, duration: float, body: dict, batch: str) -> Level:
    """`clients` closed-loop clients sending `body` for `duration` seconds (requests in flight at the end
    complete)."""
    level = Level(clients, batch)
    limits = httpx.Limits(max_connections=clients + 1, max_keepalive_connections=clients + 1)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as client:
        start = time.perf_counter()
        deadline = start + duration

        async def loop() -> None:
            while time.perf_counter() < deadline:
                await one_request(client, body, level)

        await asyncio.gather(*(loop() for _ in range(clients)))
        level.wall_s = time.perf_counter() - start
    return level


class ServerProcess:
    """A server in a child process on a free port (`command(port)`); reports its peak resident memory."""

    def __init__(self, command: Callable[[int], list[str]], threads: int | None = None) -> None:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.port = sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        command = command(self.port)
        env = dict(os.environ)
        if threads:
            env["OMP_NUM_THREADS"] = str(threads)
        self.log = tempfile.NamedTemporaryFile("w+", prefix="vlbridge-serve-", suffix=".log", delete=False)
        self.process = subprocess.Popen(command, stdout=self.log, stderr=subprocess.STDOUT, env=env)

    def wait_ready(self, timeout: float = 300) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"the server exited; its log: {Path(self.log.name).read_text()[-2000:]}")
            try:
                if httpx.get(f"{self.url}/health", timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        raise TimeoutError(f"the server did not start in {timeout} s; log: {self.log.name}")

    def peak_rss_mb(self) -> float:
        """VmHWM: the resident-set high-water mark of the server process (Linux)."""
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
        return float("nan")

    def stats(self) -> dict:
        """vlbridge's engine counters (`/stats`)."""
        return httpx.get(f"{self.url}/stats", timeout=10).json()

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=60)


# Every benchmark client sends the same prompt: with multi-turn reuse on, each request after the first
# would prefill one token. Load figures are for distinct prompts, so reuse is off (serve/multiturn.py
# measures it).
NO_REUSE = ("--prefix-cache-mb", "0", "--encoder-cache-mb", "0")


def vlbridge_serve(checkpoint: str, *flags: str) -> Callable[[int], list[str]]:
    """The `vlbridge serve` command for `ServerProcess`."""
    command = [sys.executable, "-m", "vlbridge.cli", "serve", checkpoint]
    return lambda port: [*command, "--port", str(port), *flags]


def serve_levels(
    server: ServerProcess,
    levels: list[int],
    duration: float,
    body: dict,
    batch: str,
    more: Callable[[str], dict] = lambda url: {},
) -> dict:
    """Load levels one after the other against a starting server, plus what `more(url)` asks of it after
    them; the server is stopped at the end."""
    try:
        server.wait_ready()
        asyncio.run(run_level(server.url, 1, 0, body, batch))  # warm-up: one request
        results = []
        for clients in levels:
            level = asyncio.run(run_level(server.url, clients, duration, body, batch))
            results.append(level.summary())
            print(json.dumps(results[-1]), flush=True)
        return {"levels": results, "peak_rss_mb": round(server.peak_rss_mb(), 1), **more(server.url)}
    finally:
        server.stop()


def own_levels(args, checkpoint: str, max_batch: int, levels: list[int], batch: str) -> dict:
    """vlbridge's engine at `max_batch` under fixed-length image chats, with its counters."""
    flags = ("--max-batch-size", str(max_batch), "--model-name", "bench", *NO_REUSE)
    flags += ("--compile",) if args.compile else ()
    server = ServerProcess(vlbridge_serve(checkpoint, *flags), args.threads)
    body = request_body(image_chat(), args.max_tokens)
    return serve_levels(server, levels, args.duration, body, batch, lambda url: {"engine": server.stats()})


CHECK_QUESTIONS = ("What color is the circle?", "Is there a square?", "How many shapes are there?")


def peer_comparison(args, checkpoint: str) -> dict:
    """vlbridge and `transformers serve` one after the other on the same model, load and greedy requests:
    image chats against the llava-hf export, text chats against the LLM alone (where the peer batches
    continuously). Answers must agree for the figures to compare the same work."""
    work = Path(tempfile.mkdtemp(prefix="vlbridge-peer-"))
    workloads = {
        "image": (image_chat, partial(llava_hf_copy, checkpoint, work / "llava-hf"), False),
        "text": (text_chat, partial(llm_copy, checkpoint, work / "llm"), True),
    }
    report: dict = {"clients": args.peer_clients}
    for kind in args.peer_chats:
        chat, peer_copy, batching = workloads[kind]
        peer_dir = peer_copy()
        flags = ("--max-batch-size", str(args.max_batch_size), "--model-name", "bench", *NO_REUSE)
        ours = vlbridge_serve(checkpoint, *flags, *(("--compile",) if args.compile else ()))
        theirs = partial(transformers_serve, peer_dir, continuous_batching=batching, compile=args.compile)
        servers = {"vlbridge": (ours, "bench"), "transformers": (theirs, str(peer_dir))}
        checks = [chat(question) for question in CHECK_QUESTIONS]
        runs = {}
        for name, (command, model) in servers.items():
            body = request_body(chat(), args.max_tokens, model=model, fixed=False)
            answers = partial(greedy_answers, model=model, requests=checks, max_tokens=args.max_tokens)
            server = ServerProcess(command, args.threads)
            runs[name] = serve_levels(server, args.peer_clients, args.duration, body, name, answers)
        ours, theirs = runs["vlbridge"], runs["transformers"]
        runs["identical_answers"] = ours["answers"] == theirs["answers"]
        runs["ratio"] = [
            round(a["output_tokens_per_s"] / b["output_tokens_per_s"], 2)
            if b["output_tokens_per_s"]
            else None
            for a, b in zip(ours["levels"], theirs["levels"], strict=True)
        ]
        report[kind] = runs
    return report


def random_checkpoint(size: str) -> str:
    """Write a random model (`tiny` or `mid`) to a temporary directory; returns its path."""
    from vlbridge.testing import tiny_model

    out = Path(tempfile.mkdtemp(prefix=f"vlbridge-{size}-")) / size
    if size not in ("tiny", "mid"):
        raise SystemExit(f"unknown random model size {size!r}: use random:tiny or random:mid")
    overrides = MID_OVERRIDES if size == "mid" else TINY_OVERRIDES
    model, tokenizer, _ = tiny_model("llama", "clip_vision_model", **overrides)
    answer_in_visible_text(model.language_model, tokenizer)
    model.save_pretrained(out, tokenizer)
    return str(out)


def answer_in_visible_text(language_model, tokenizer) -> None:
    """Zero the output rows of tokens that show no text (special tokens, end of text included) or part of
    a character (a lone UTF-8 byte). Random weights otherwise pick them as readily as any, and an answer
    no server can show has no time to first token; a zero logit loses to the largest of the others, so
    answers are also as long as `max_tokens` on any server, without `ignore_eos`."""
    import torch

    texts = [tokenizer.decode([i], skip_special_tokens=True) for i in range(len(tokenizer))]
    hidden = [i for i, text in enumerate(texts) if not text or "\ufffd" in text]
    with torch.no_grad():
        language_model.get_output_embeddings().weight[hidden] = 0


def roofline(checkpoint: str, threads: int | None) -> dict:
    import torch

    from vlbridge.checkpoint import resolve_checkpoint
    from vlbridge.factory import load_pretrained

    from .roofline import decode_roofline

    if threads:
        torch.set_num_threads(threads)
    model, processor = load_pretrained(resolve_checkpoint(checkpoint))
    return decode_roofline(model, processor.tokenizer, processor)


def peer_markdown(peer: dict) -> list[str]:
    rows = [
        "| chats | clients | vlbridge out tok/s | transformers out tok/s | ratio "
        "| TTFT p50/p99 ms vlbridge | TTFT p50/p99 ms transformers | errors |",
        "|---|---|---|---|---|---|---|---|",
    ]
    kinds = [kind for kind in ("image", "text") if kind in peer]
    for kind in kinds:
        runs = peer[kind]
        levels = zip(runs["vlbridge"]["levels"], runs["transformers"]["levels"], runs["ratio"], strict=True)
        for ours, theirs, ratio in levels:
            cells = [kind, ours["clients"], ours["output_tokens_per_s"], theirs["output_tokens_per_s"]]
            cells += [f"**{ratio}x**", *(f"{r['ttft_ms_p50']} / {r['ttft_ms_p99']}" for r in (ours, theirs))]
            cells.append(f"{ours['errors']} / {theirs['errors']}")
            rows.append("| " + " | ".join(map(str, cells)) + " |")
    rows.append("")
    for kind in kinds:
        same = "identical" if peer[kind]["identical_answers"] else "DIFFERENT"
        rows.append(f"{kind} chats: greedy answers {same} on both servers ({len(CHECK_QUESTIONS)} requests)")
    return rows


def own_markdown(report: dict) -> list[str]:
    rows = [
        "| batching | clients | req/s | out tok/s | TTFT p50/p95 ms | ITL p50/p95 ms | errors |",
        "|---|---|---|---|---|---|---|",
    ]
    for mode in ("batched", "one_at_a_time"):
        for lv in report[mode]["levels"]:
            rows.append(
                f"| {lv['batching']} | {lv['clients']} | {lv['requests_per_s']} "
                f"| {lv['output_tokens_per_s']} "
                f"| {lv['ttft_ms_p50']} / {lv['ttft_ms_p95']} | {lv['itl_ms_p50']} / {lv['itl_ms_p95']} "
                f"| {lv['errors']} |"
            )
    rows.append("")
    rows.append(
        f"peak server RSS: batched {report['batched']['peak_rss_mb']} MB, "
        f"one at a time {report['one_at_a_time']['peak_rss_mb']} MB"
    )
    return rows


def markdown(report: dict) -> str:
    rows = peer_markdown(report["peer"]) if "peer" in report else own_markdown(report)
    if report.get("speedup"):
        rows.append(
            f"output tokens/s at {report['speedup']['clients']} clients, batched / one at a time: "
            f"**{report['speedup']['ratio']:.2f}x**"
        )
    if report.get("roofline"):
        r = report["roofline"]
        per_token = r["weight_bytes_per_token"] + r["kv_bytes_per_token"]
        rows.append(
            f"batch-1 decode limit {r['bandwidth_limit_tokens_per_s']:.0f} tok/s ({per_token:,} B/token at "
            f"{r['memory_bandwidth_gb_s']:.1f} GB/s read):"
        )
        for mode in ("eager", "compiled"):
            m = r[mode]
            rows.append(
                f"- {mode}: {m['decode_tokens_per_s']:.1f} tok/s, {m['decode_step_ms_p50']:.1f} ms/step "
                f"-> **{100 * m['fraction_of_limit']:.1f} %** of the limit"
            )
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m vlbridge.serve.loadtest", description=__doc__.split("\n")[0]
    )
    parser.add_argument("checkpoint", help="run/checkpoint dir, or random:tiny / random:mid")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16, 64])
    parser.add_argument("--baseline-clients", type=int, default=16, help="clients for the max-batch-1 run")
    parser.add_argument("--duration", type=float, default=30.0, help="seconds per load level")
    parser.add_argument("--max-tokens", type=int, default=32, help="tokens per answer (fixed: ignore_eos)")
    parser.add_argument("--max-batch-size", type=int, default=64)
    parser.add_argument("--threads", type=int, help="server torch threads (OMP_NUM_THREADS)")
    parser.add_argument("--roofline", action="store_true", help="also batch-1 decode vs memory bandwidth")
    parser.add_argument("--output", default="runs/serve_load")
    parser.add_argument(
        "--peer",
        choices=["transformers"],
        help="instead of batched vs one at a time, vlbridge beside `transformers serve` on the same model",
    )
    parser.add_argument("--peer-clients", type=int, nargs="+", default=[1, 16, 64])
    parser.add_argument("--peer-chats", nargs="+", choices=["image", "text"], default=["image", "text"])
    parser.add_argument("--compile", action="store_true", help="servers compile decoding (both, with --peer)")
    args = parser.parse_args(argv)

    checkpoint = args.checkpoint
    if checkpoint.startswith("random:"):
        checkpoint = random_checkpoint(checkpoint.split(":", 1)[1])
    report: dict = {"checkpoint": args.checkpoint, "duration_s": args.duration, "max_tokens": args.max_tokens}
    if args.peer:
        report["peer"] = peer_comparison(args, checkpoint)
    else:
        report["batched"] = own_levels(args, checkpoint, args.max_batch_size, args.clients, "continuous")
        report["one_at_a_time"] = own_levels(args, checkpoint, 1, [args.baseline_clients], "max batch 1")
    batched = {lv["clients"]: lv for lv in report.get("batched", {}).get("levels", [])}
    if args.baseline_clients in batched:
        base = report["one_at_a_time"]["levels"][0]["output_tokens_per_s"]
        ratio = batched[args.baseline_clients]["output_tokens_per_s"] / base if base else float("inf")
        report["speedup"] = {"clients": args.baseline_clients, "ratio": ratio}
    if args.roofline:
        report["roofline"] = roofline(checkpoint, args.threads)
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(report, indent=2))
    table = markdown(report)
    (out / "report.md").write_text(table + "\n")
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
