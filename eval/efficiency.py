"""Efficiency measurements of one VLModel on one input: time, memory, FLOPs, KV cache, token counts.

Every figure is measured, none estimated: wall times are medians over repeats after a warm-up call,
FLOPs come from torch's FLOP counter on the real forward, the KV-cache size from the cache the LLM
actually returns. Peak memory is exact on CUDA (allocator statistics); on CPU it is the peak rise of
the process's resident set during the call, sampled every millisecond (an upper-bound-ish proxy:
allocator caching makes it depend on what ran before, so compare cases measured the same way).
"""

from __future__ import annotations

import statistics
import threading
import time
from collections.abc import Callable
from contextlib import contextmanager
from typing import Any

import psutil
import torch
from torch.utils.flop_counter import FlopCounterMode


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_seconds(fn: Callable[[], Any], device: torch.device, repeats: int = 3, warmup: int = 1) -> float:
    """Median wall time of `fn()` over `repeats` calls after `warmup` untimed ones."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


class _RssSampler(threading.Thread):
    """Background thread recording the process's peak resident set size."""

    def __init__(self, interval: float = 0.001) -> None:
        super().__init__(daemon=True)
        self.process, self.interval = psutil.Process(), interval
        self.peak = self.baseline = self.process.memory_info().rss
        self._stop_event = threading.Event()

    def run(self) -> None:
        while not self._stop_event.is_set():
            self.peak = max(self.peak, self.process.memory_info().rss)
            time.sleep(self.interval)

    def stop(self) -> int:
        self._stop_event.set()
        self.join()
        self.peak = max(self.peak, self.process.memory_info().rss)
        return self.peak - self.baseline


@contextmanager
def peak_memory(device: torch.device):
    """Yields a dict whose "bytes" is filled on exit with the peak memory the block added."""
    result = {"bytes": 0}
    if device.type == "cuda":
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        yield result
        synchronize(device)
        result["bytes"] = torch.cuda.max_memory_allocated(device) - before
        return
    sampler = _RssSampler()
    sampler.start()
    try:
        yield result
    finally:
        result["bytes"] = sampler.stop()


def count_flops(fn: Callable[[], object]) -> int:
    """Floating-point operations of one call (matmuls, convolutions, attention), as torch counts them."""
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def cache_bytes(past_key_values) -> int:
    """Bytes held by a transformers KV cache (any Cache class or legacy tuple)."""
    seen, total = set(), 0

    def visit(obj) -> None:
        nonlocal total
        if torch.is_tensor(obj):
            if obj.data_ptr() not in seen:
                seen.add(obj.data_ptr())
                total += obj.numel() * obj.element_size()
        elif isinstance(obj, (list, tuple)):
            for item in obj:
                visit(item)
        elif hasattr(obj, "layers"):  # transformers >= 4.56 Cache: .layers[i].keys / .values
            for layer in obj.layers:
                visit([getattr(layer, "keys", None), getattr(layer, "values", None)])
        elif hasattr(obj, "key_cache"):
            visit([obj.key_cache, obj.value_cache])

    visit(past_key_values)
    return total


def parameter_counts(model: torch.nn.Module) -> tuple[int, int]:
    """(trainable, total) parameters."""
    params = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)
