"""Another engine beside `vlbridge serve`: the same model in `transformers serve`, for the load benchmark.

A vlbridge checkpoint goes to the peer in the layouts it loads: transformers' LLaVA (`vlbridge export
--format llava-hf`) for image chats, and the LLM alone (its `llm/` weights with the checkpoint's
tokenizer and chat template) for text chats, where `transformers serve` batches continuously (it serves
vision-language models one request at a time). Before any load, both servers answer the same greedy
requests and the answers are compared, so the figures are for the same work.

`peer_comparison` runs both at the same loads (`python -m vlbridge.serve.loadtest --peer transformers`);
`peer_markdown` is its table.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from functools import partial
from pathlib import Path

import httpx

from .loadgen import (
    NO_REUSE,
    ServerProcess,
    image_chat,
    request_body,
    serve_levels,
    text_chat,
    vlbridge_serve,
)

CHECK_QUESTIONS = ("What color is the circle?", "Is there a square?", "How many shapes are there?")


def peer_comparison(
    checkpoint: str,
    chats: list[str],
    clients: list[int],
    *,
    duration: float,
    max_tokens: int,
    max_batch_size: int,
    threads: int | None = None,
    compile: bool = False,
) -> dict:
    """vlbridge and `transformers serve` one after the other on the same model, load and greedy requests:
    image chats against the llava-hf export, text chats against the LLM alone (where the peer batches
    continuously). Answers must agree for the figures to compare the same work."""
    work = Path(tempfile.mkdtemp(prefix="vlbridge-peer-"))
    workloads = {
        "image": (image_chat, partial(llava_hf_copy, checkpoint, work / "llava-hf"), False),
        "text": (text_chat, partial(llm_copy, checkpoint, work / "llm"), True),
    }
    report: dict = {"clients": clients}
    for kind in chats:
        chat, peer_copy, batching = workloads[kind]
        peer_dir = peer_copy()
        flags = ("--max-batch-size", str(max_batch_size), "--model-name", "bench", *NO_REUSE)
        ours = vlbridge_serve(checkpoint, *flags, *(("--compile",) if compile else ()))
        theirs = partial(transformers_serve, peer_dir, continuous_batching=batching, compile=compile)
        servers = {"vlbridge": (ours, "bench"), "transformers": (theirs, str(peer_dir))}
        checks = [chat(question) for question in CHECK_QUESTIONS]
        runs = {}
        for name, (command, model) in servers.items():
            body = request_body(chat(), max_tokens, model=model, fixed=False)
            answers = partial(greedy_answers, model=model, requests=checks, max_tokens=max_tokens)
            server = ServerProcess(command, threads)
            runs[name] = serve_levels(server, clients, duration, body, name, answers)
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


TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
)


def llava_hf_copy(checkpoint: str, out: Path) -> Path:
    """The checkpoint written as transformers' LLaVA (the command a user runs)."""
    command = [sys.executable, "-m", "vlbridge.cli", "export", checkpoint, str(out), "--format", "llava-hf"]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"the peer needs the llava-hf export, which failed: {done.stderr.strip()[-600:]}")
    return out


def llm_copy(checkpoint: str, out: Path) -> Path:
    """The checkpoint's LLM as a plain causal-LM directory, with the checkpoint's tokenizer beside it."""
    shutil.copytree(Path(checkpoint) / "llm", out)
    for name in TOKENIZER_FILES:
        if (Path(checkpoint) / name).is_file():
            shutil.copy(Path(checkpoint) / name, out / name)
    return out


def transformers_serve(
    model_dir: Path, port: int, *, continuous_batching: bool, compile: bool = False
) -> list[str]:
    """`transformers serve` (the CLI beside this interpreter) on one preloaded model, on the CPU or GPU."""
    cli = Path(sys.executable).with_name("transformers")
    device = "cuda" if _cuda() else "cpu"
    batching = "--continuous-batching" if continuous_batching else "--no-continuous-batching"
    compiling = "--compile" if compile else "--no-compile"
    return [str(cli), "serve", str(model_dir), "--port", str(port), "--device", device, batching, compiling]


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def greedy_answers(url: str, model: str, requests: list[list[dict]], max_tokens: int) -> dict:
    """{"answers": each request's greedy answer (not streamed) from the server at `url`}."""
    answers = []
    with httpx.Client(base_url=url, timeout=300) as client:
        for messages in requests:
            body = {"model": model, "messages": messages, "max_tokens": max_tokens, "temperature": 0}
            response = client.post("/v1/chat/completions", json=body)
            response.raise_for_status()
            answers.append(response.json()["choices"][0]["message"]["content"])
    return {"answers": answers}


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
