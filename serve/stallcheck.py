"""Does one client's abuse slow down everyone else? Small chats timed while oversized requests arrive.

    python -m vlbridge.serve.stallcheck CHECKPOINT [--seconds 3] [--output runs/stallcheck.json]

Starts `vlbridge serve CHECKPOINT` with no flags (CHECKPOINT may be `random:tiny`), times a 4-token chat
at idle, then, for each abuse below, sends it back to back from another process for `--seconds` while
timing small chats from this one. Reported per abuse: the abusive requests' statuses and answer times,
and the small chats' median latency against idle (the server's promise: within 2x).
"""

from __future__ import annotations

import argparse
import base64
import concurrent.futures
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx

from .loadgen import ServerProcess, vlbridge_serve
from .loadtest import random_checkpoint

SMALL = {"messages": [{"role": "user", "content": "What color is the circle?"}], "max_tokens": 4}
MIB = 2**20
CHUNK = 64 * 1024
# name -> (concurrent senders, what each sends: a 10 MiB text prompt, or a 21 MiB image, over the
# default 20 MiB per image)
ABUSES = {
    "prompt_10mib": (1, "text"),
    "image_over_limit": (1, "image"),
    "flood_64x_prompt_10mib": (64, "text"),
}


def abusive_body(kind: str) -> bytes:
    if kind == "text":
        return json.dumps(
            {"messages": [{"role": "user", "content": "x " * (5 * MIB)}], "max_tokens": 4}
        ).encode()
    url = "data:image/png;base64," + base64.b64encode(bytes(21 * MIB)).decode()
    parts = [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "What is this?"}]
    return json.dumps({"messages": [{"role": "user", "content": parts}], "max_tokens": 4}).encode()


def abuse(url: str, senders: int, kind: str, seconds: float) -> dict:
    """Rounds of `senders` concurrent abusive requests, one round after another, for `seconds` (run in a
    child process, so that its CPU time is not the timing client's)."""
    body = memoryview(abusive_body(kind))
    headers = {"content-type": "application/json", "content-length": str(len(body))}
    seen: list[tuple[int, float]] = []

    def send(client: httpx.Client) -> tuple[int, float]:
        # In 64 KiB pieces: httpx re-slices (copies) what a socket has not yet taken, so one 10 MiB piece
        # against a busy server costs the sender quadratic time, 64 senders more CPU than the server.
        pieces = (body[i : i + CHUNK] for i in range(0, len(body), CHUNK))
        start = time.perf_counter()
        status = client.post(f"{url}/v1/chat/completions", content=pieces, headers=headers).status_code
        return status, time.perf_counter() - start

    clients = [httpx.Client(timeout=60) for _ in range(senders)]
    with concurrent.futures.ThreadPoolExecutor(senders) as pool:
        first = list(pool.map(send, clients))  # not timed: threads and connections start (small chats see it)
        deadline = time.monotonic() + seconds
        while not seen or time.monotonic() < deadline:
            seen += pool.map(send, clients)
    times = sorted(t for _, t in seen)
    return {
        "requests": len(seen),
        "statuses": sorted({s for s, _ in first + seen}),
        "slowest_s": times[-1],
        "p90_s": times[int(0.9 * (len(times) - 1))],
        "median_s": statistics.median(times),
    }


def small_latencies(
    client: httpx.Client, url: str, *, count: int | None = None, until=None, pause: float = 0.05
) -> list[float]:
    """4-token chats one after another, `pause` seconds apart (a user's chat, not a second flood)."""
    latencies = []
    while (count is not None and len(latencies) < count) or (until is not None and until()):
        start = time.perf_counter()
        response = client.post(f"{url}/v1/chat/completions", json=SMALL)
        response.raise_for_status()
        latencies.append(time.perf_counter() - start)
        time.sleep(pause)
    return latencies


def check(url: str, seconds: float) -> dict:
    """Idle latency, then each abuse with small chats beside it."""
    report = {}
    with httpx.Client(timeout=60) as client:
        small_latencies(client, url, count=5)  # warm-up
        idle = statistics.median(small_latencies(client, url, count=20))
        report["idle_small_s"] = idle
        for name, (senders, kind) in ABUSES.items():
            command = [sys.executable, "-m", "vlbridge.serve.stallcheck", "--abuse", url, str(senders), kind]
            child = subprocess.Popen([*command, str(seconds)], stdout=subprocess.PIPE, text=True)
            time.sleep(0.3)  # the first abusive bodies are on their way
            during = small_latencies(client, url, until=lambda child=child: child.poll() is None)
            sent = json.loads(child.communicate()[0])
            report[name] = {
                **sent,
                "small_median_s": statistics.median(during),
                "small_ratio": statistics.median(during) / idle,
                "small_requests": len(during),
            }
    return report


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--abuse"]:
        url, senders, kind, seconds = argv[1:]
        print(json.dumps(abuse(url, int(senders), kind, float(seconds))))
        return 0
    parser = argparse.ArgumentParser(
        prog="python -m vlbridge.serve.stallcheck", description=__doc__.split("\n")[0]
    )
    parser.add_argument("checkpoint", help="run/checkpoint dir, or random:tiny")
    parser.add_argument("--seconds", type=float, default=3.0, help="how long each abuse lasts")
    parser.add_argument("--output", default="runs/stallcheck.json")
    args = parser.parse_args(argv)
    checkpoint = random_checkpoint("tiny") if args.checkpoint == "random:tiny" else args.checkpoint
    server = ServerProcess(vlbridge_serve(checkpoint))
    try:
        server.wait_ready()
        report = check(server.url, args.seconds)
    finally:
        server.stop()
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(report, indent=2))
    print(f"idle 4-token chat: {report['idle_small_s'] * 1000:.1f} ms")
    for name in ABUSES:
        r = report[name]
        print(
            f"{name}: {r['requests']} sent, statuses {r['statuses']}, answered in "
            f"{r['median_s'] * 1000:.0f} ms (median), {r['p90_s'] * 1000:.0f} ms (p90), "
            f"{r['slowest_s'] * 1000:.0f} ms (slowest); "
            "4-token chats beside them: median "
            f"{r['small_median_s'] * 1000:.1f} ms = {r['small_ratio']:.2f}x idle"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
