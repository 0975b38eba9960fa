"""Efficiency measurements of one VLModel on one input: time, memory, FLOPs, KV cache, token counts.

Every figure is measured, none estimated: wall times are medians over repeats after a warm-up call,
FLOPs come from torch's FLOP counter on the real forward, the KV-cache size from the cache the LLM
actually returns. Peak memory comes from the CUDA allocator and is reported on GPU only.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from contextlib import contextmanager
from typing import Any

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


@contextmanager
def peak_memory(device: torch.device):
    """Yields a dict whose "bytes" is set on exit to the peak memory the block allocated on `device`.

    CUDA only: the caching allocator's statistics are exact. On CPU there is no allocator-level peak
    (glibc's adaptive mmap threshold makes resident-set samples miss or inflate it), so "bytes" stays None.
    """
    result: dict[str, int | None] = {"bytes": None}
    if device.type != "cuda":
        yield result
        return
    synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    yield result
    synchronize(device)
    result["bytes"] = torch.cuda.max_memory_allocated(device) - before


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
