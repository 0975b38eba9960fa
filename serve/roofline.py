"""Decode speed at batch 1 against the machine's physical limit.

Decoding one token reads every LLM weight once (the input embedding only one row of it) plus the KV
cache so far, so tokens/s can never beat read bandwidth / bytes read per token. This measures the
bandwidth (reading a large tensor), counts the bytes, times the engine's own decode loop on one request,
eager and then compiled (`--compile`), and reports the fraction of the limit each achieves.
"""

from __future__ import annotations

import asyncio
import statistics
import threading
import time

import torch

from vlbridge.modeling import text_config_of

from .engine import Engine
from .generation import Generation
from .prompts import Prompt
from .sampling import SamplingParams


def memory_bandwidth(mebibytes: int = 512, repeats: int = 8, device: torch.device | str = "cpu") -> float:
    """Bytes/s read from memory on `device`: summing a large tensor (each byte read once, nothing written,
    as in a decode step), best of `repeats`."""
    source = torch.ones(mebibytes * 2**20 // 4, device=device)
    sync = torch.cuda.synchronize if source.is_cuda else (lambda: None)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        source.sum()
        sync()
        best = min(best, time.perf_counter() - start)
    return source.numel() * source.element_size() / best


def weight_bytes_per_token(language_model: torch.nn.Module) -> int:
    """Bytes of weights one decode step reads: every parameter once, the input embedding table not
    at all (one row is gathered) unless the output head shares it."""
    embedding = language_model.get_input_embeddings().weight
    output = language_model.get_output_embeddings()
    tied = output is not None and output.weight.data_ptr() == embedding.data_ptr()
    seen, total = set(), 0
    for parameter in language_model.parameters():
        if parameter.data_ptr() in seen or (parameter is embedding and not tied):
            continue
        seen.add(parameter.data_ptr())
        total += parameter.numel() * parameter.element_size()
    return total


def kv_bytes_per_token(language_model: torch.nn.Module, context: int) -> int:
    """Bytes of KV cache one decode step reads at `context` cached positions."""
    cfg = text_config_of(language_model)
    heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    element = next(language_model.parameters()).element_size()
    return 2 * cfg.num_hidden_layers * heads * head_dim * element * context


def engine_decode_seconds(engine: Engine, prompt: Prompt, tokens: int) -> list[float]:
    """Seconds between consecutive tokens of one request alone in the engine (prefill excluded), with the
    engine on this thread and the request beside it, as `vlbridge serve` runs them."""

    async def request() -> list[float]:
        stamps = []
        params = SamplingParams(tokens, temperature=0.0, ignore_eos=True)
        async for event in Generation(engine.start(), prompt, params, 1).events():
            stamps.append(time.perf_counter())
            assert event.tokens == 1
        return [b - a for a, b in zip(stamps, stamps[1:], strict=False)]

    gaps: list[float] = []

    def client() -> None:
        try:
            gaps.extend(asyncio.run(request()))
        finally:
            engine.stop()

    engine.run_beside(threading.Thread(target=client))
    return gaps


def decode_roofline(
    model, tokenizer, processor, *, tokens: int = 64, bandwidth_mib: int = 512
) -> dict[str, float]:
    """Batch-1 decode rate of the engine, eager and compiled, vs bandwidth / bytes per token, for a text
    prompt. The bandwidth is measured before and after the decoding and the higher kept, so a busy moment
    on a shared machine cannot lower the limit."""
    encoded = processor.encode(
        [{"role": "user", "content": "Describe the image."}], [], add_generation_prompt=True
    )
    prompt = Prompt(encoded, 0, 0)
    bandwidth = memory_bandwidth(bandwidth_mib, device=model.device)
    steps, threads = {}, {}
    for mode, compile in (("eager", False), ("compiled", True)):
        engine = Engine(
            model, tokenizer, context_length=prompt.tokens + tokens + 1, max_batch_size=1, compile=compile
        )
        engine_decode_seconds(engine, prompt, 8)  # warm-up (and, compiled, the compiling)
        steps[mode] = statistics.median(engine_decode_seconds(engine, prompt, tokens))
        # the compiled step's tuned thread count (BatchOneDecode.tune; eager: torch's)
        threads[mode] = (engine.batch_one and engine.batch_one.threads) or torch.get_num_threads()
    bandwidth = max(bandwidth, memory_bandwidth(bandwidth_mib, device=model.device))
    lm = model.language_model
    weights = weight_bytes_per_token(lm)
    kv = kv_bytes_per_token(lm, prompt.tokens + tokens // 2)
    limit = bandwidth / (weights + kv)
    report = {
        "weight_bytes_per_token": weights,
        "kv_bytes_per_token": kv,
        "memory_bandwidth_gb_s": bandwidth / 1e9,
        "bandwidth_limit_tokens_per_s": limit,
        "threads": torch.get_num_threads(),
    }
    for mode, step in steps.items():
        report[mode] = {
            "decode_tokens_per_s": 1 / step,
            "decode_step_ms_p50": 1000 * step,
            "fraction_of_limit": (1 / step) / limit,
            "threads": threads[mode],
        }
    return report
