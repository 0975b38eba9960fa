"""Load generation for the serving benchmarks: closed-loop streaming clients and the server processes
they load, with what the clients saw (tokens/s, time to first token, inter-token latency, errors).

Used by the load benchmark (loadtest.py), its comparison with another engine (peer.py), the stall check
(stallcheck.py) and the GPU check script.
"""

from __future__ import annotations

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
from pathlib import Path

import httpx
from PIL import Image, ImageDraw


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
