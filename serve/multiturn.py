"""Multi-turn reuse, measured on the engine (no HTTP): the time to first token of a chat's third turn with
reuse against a cold prefill of the same conversation, and the greedy answers of both.

    python -m vlbridge.serve.multiturn [CHECKPOINT] [--repeats 5] [--max-tokens 48] [--threads N]

CHECKPOINT is a run/checkpoint directory or `random:tiny` / `random:mid` (the default; loadtest's random
models). Each repeat plays a fresh three-turn chat about one image on an engine with reuse (empty caches
at the start) and on one without (every turn a cold prefill of the whole conversation so far); every
answer must be the same on both. Reported: the third turn's prompt and reused tokens, the medians of its
time to first token on both engines and their ratio (target: at most 0.3x).
"""

from __future__ import annotations

import argparse
import statistics
import threading
import time
from dataclasses import dataclass

import torch
from PIL import Image, ImageDraw

from vlbridge.checkpoint import resolve_checkpoint
from vlbridge.factory import load_pretrained

from .engine import Engine, Event, Request
from .loadtest import random_checkpoint
from .prompts import Prompt
from .sampling import SamplingParams
from .server import context_length, pick_device

SYSTEM = (
    "You are a careful assistant that describes pictures for people who cannot see them. Answer in full "
    "sentences, say which colors and shapes you see and where they are, and say so when you are unsure."
)
TURNS = [
    "Here is a picture I took of a poster on the wall of my office this morning. Please describe everything "
    "you can see in it: the shapes, their colors, how large they are and where they sit relative to each "
    "other. Take your time and be thorough.",
    "Thank you. Now look again at the circle near the left edge of the picture. What color is it exactly, is "
    "it filled or only outlined, and is it larger or smaller than the square beside it? Explain how you can "
    "tell from the picture.",
    "One more question about the same picture. How many triangles are there in total, and do any of them "
    "overlap the square or the circle? If you had to give the poster a short title, what would it be?",
]
TARGET = 0.3


@dataclass
class Turn:
    answer: str
    ttft: float  # seconds
    prompt_tokens: int
    reused_tokens: int  # KV taken from the prefix cache


def chat_image(size: int = 256) -> Image.Image:
    """A poster of a few colored shapes (the processor scales it to the tower's input)."""
    image = Image.new("RGB", (size, size), "white")
    draw = ImageDraw.Draw(image)
    draw.ellipse((20, 90, 100, 170), fill=(220, 40, 40))
    draw.rectangle((120, 100, 200, 180), fill=(40, 90, 230))
    draw.polygon([(150, 20), (120, 80), (180, 80)], fill=(40, 180, 60))
    draw.polygon([(210, 200), (180, 250), (240, 250)], fill=(240, 200, 30))
    return image


def ask(engine: Engine, prompt: Prompt, max_tokens: int) -> tuple[str, float]:
    """The greedy answer to `prompt` and its time to first token in seconds."""
    pieces: list[str] = []
    first: list[float] = []
    failed: list[Exception] = []
    done = threading.Event()

    def sink(event: Event) -> None:
        if event.tokens and not first:
            first.append(time.perf_counter())
        pieces.append(event.text)
        if event.error is not None:
            failed.append(event.error)
        if event.error is not None or event.finish_reason is not None:
            done.set()

    start = time.perf_counter()
    engine.submit(Request(prompt, SamplingParams(max_tokens, temperature=0), 1, sink))
    done.wait()
    if failed:
        raise failed[0]
    return "".join(pieces), first[0] - start


def play(engine: Engine, processor, image: Image.Image, max_tokens: int) -> list[Turn]:
    """Every turn of the chat in order, each answer joining the conversation."""
    messages = [{"role": "system", "content": SYSTEM}]
    turns: list[Turn] = []
    for i, text in enumerate(TURNS):
        messages.append({"role": "user", "content": processor.place_images(text, int(i == 0))})
        prompt = Prompt(processor.encode(messages, [image], add_generation_prompt=True), 1, 0)
        if prompt.tokens + max_tokens > engine.context_length:
            raise SystemExit(
                f"turn {i + 1} needs {prompt.tokens} + {max_tokens} tokens, over this model's context of "
                f"{engine.context_length}; use a model with a longer context or fewer --max-tokens"
            )
        before = reused_tokens(engine)
        answer, ttft = ask(engine, prompt, max_tokens)
        turns.append(Turn(answer, ttft, prompt.tokens, reused_tokens(engine) - before))
        messages.append({"role": "assistant", "content": answer})
    return turns


def reused_tokens(engine: Engine) -> int:
    return engine.reuse()["prefix_cache"].get("reused_tokens", 0)


def measure(checkpoint: str, repeats: int, max_tokens: int) -> dict:
    model, processor = load_pretrained(resolve_checkpoint(checkpoint), device=pick_device("auto"))
    length = context_length(model, None)
    image = chat_image()

    def engine(**reuse: float) -> Engine:
        return Engine(model, processor.tokenizer, context_length=length, batch_window_s=0, **reuse).start()

    warm = engine(encoder_cache_mb=0, prefix_cache_mb=0)
    play(warm, processor, image, 4)  # the first calls pay for allocations and kernel selection
    warm.stop()
    reused, cold, same = [], [], True
    for _ in range(repeats):
        with_reuse, without = engine(), engine(encoder_cache_mb=0, prefix_cache_mb=0)
        chat = play(with_reuse, processor, image, max_tokens)
        reference = play(without, processor, image, max_tokens)
        with_reuse.stop()
        without.stop()
        reused.append(chat[-1].ttft)
        cold.append(reference[-1].ttft)
        same = same and [t.answer for t in chat] == [t.answer for t in reference]
    return {
        "prompt_tokens": [t.prompt_tokens for t in chat],
        "reused_tokens": [t.reused_tokens for t in chat],
        "ttft_reuse_ms": [1000 * t for t in reused],
        "ttft_cold_ms": [1000 * t for t in cold],
        "ratio": statistics.median(reused) / statistics.median(cold),
        "answers_identical": same,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m vlbridge.serve.multiturn", description=__doc__.split("\n")[0]
    )
    parser.add_argument("checkpoint", nargs="?", default="random:mid", help="checkpoint dir or random:mid")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--max-tokens", type=int, default=48, help="tokens per answer")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    checkpoint = args.checkpoint
    if checkpoint.startswith("random:"):
        checkpoint = random_checkpoint(checkpoint.removeprefix("random:"))
    result = measure(checkpoint, args.repeats, args.max_tokens)
    print(f"prompt tokens per turn: {result['prompt_tokens']}, of them reused: {result['reused_tokens']}")
    for name in ("reuse", "cold"):
        times = result[f"ttft_{name}_ms"]
        listed = ", ".join(f"{t:.1f}" for t in times)
        print(f"turn 3 time to first token, {name}: median {statistics.median(times):.1f} ms of [{listed}]")
    verdict = "met" if result["ratio"] <= TARGET else "missed"
    print(f"ratio {result['ratio']:.3f}x (target <= {TARGET}x: {verdict})")
    print(f"greedy answers identical with and without reuse: {result['answers_identical']}")
    return 0 if result["answers_identical"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
