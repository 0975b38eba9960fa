"""Another engine beside `vlbridge serve`: the same model in `transformers serve`, for the load benchmark.

A vlbridge checkpoint goes to the peer in the layouts it loads: transformers' LLaVA (`vlbridge export
--format llava-hf`) for image chats, and the LLM alone (its `llm/` weights with the checkpoint's
tokenizer and chat template) for text chats, where `transformers serve` batches continuously (it serves
vision-language models one request at a time). Before any load, both servers answer the same greedy
requests and the answers are compared, so the figures are for the same work.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import httpx

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
