"""Efficiency measurements of one VLModel on one input: time, memory, FLOPs, KV cache, token counts.

Every figure is measured, none estimated: wall times are medians over repeats after a warm-up call,
FLOPs come from torch's FLOP counter on the real forward, the KV-cache size from the cache the LLM
actually returns. Peak memory comes from the CUDA allocator on GPU and from the kernel's resident-set
high-water mark on Linux CPUs.
"""

from __future__ import annotations

import ctypes
import functools
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


class TokenClock:
    """A logits processor that stamps the time of every generated token: generate calls it once per step,
    right after that step's forward, so the stamps after the first time the decode steps alone (the
    first follows the prefill). Timing the decode inside one call avoids subtracting two noisy medians."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.stamps: list[float] = []

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        synchronize(self.device)
        self.stamps.append(time.perf_counter())
        return scores

    def decode_seconds(self) -> float:
        """Time from the first generated token to the last (len(stamps) - 1 decode steps)."""
        if len(self.stamps) < 2:
            raise ValueError("the decode time needs at least two generated tokens")
        return self.stamps[-1] - self.stamps[0]


@contextmanager
def peak_memory(device: torch.device):
    """Yields a dict whose "bytes" is set on exit to the peak memory the block allocated on `device`.

    CUDA: the caching allocator's peak. CPU (Linux): growth of the resident-set high-water mark, reset
    through /proc/self/clear_refs before the block. For that mark to follow the live tensors, freed memory
    must leave the resident set: `track_cpu_memory` pins glibc's mmap threshold (call it before the work
    whose memory is measured; benchmarks do at start), and free heap pages are returned to the kernel before
    every block. Elsewhere "bytes" stays None.
    """
    result: dict[str, int | None] = {"bytes": None}
    if device.type == "cuda":
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        yield result
        synchronize(device)
        result["bytes"] = torch.cuda.max_memory_allocated(device) - before
        return
    libc = track_cpu_memory()
    if libc is None:
        yield result
        return
    libc.malloc_trim(0)  # freed chunks kept in glibc's bins would be reused without touching new pages
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current resident set
    before = _proc_status_bytes("VmRSS")
    yield result
    result["bytes"] = max(_proc_status_bytes("VmHWM") - before, 0)


@functools.cache
def track_cpu_memory() -> ctypes.CDLL | None:
    """Make CPU peaks measurable (Linux + glibc): every allocation above 1 MiB gets its own mapping,
    unmapped on free, instead of glibc's adaptive threshold keeping freed tensors resident. None where the
    high-water mark cannot be read and reset."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        m_mmap_threshold = -3
        if not libc.mallopt(m_mmap_threshold, 1 << 20):
            return None
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return libc if _proc_status_bytes("VmHWM") > 0 else None
    except (OSError, AttributeError):
        return None


def _proc_status_bytes(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(f"{key}:"):
                return int(line.split()[1]) * 1024
    raise OSError(f"no {key} in /proc/self/status")


def count_flops(fn: Callable[[], object]) -> int:
    """Floating-point operations of one call (matmuls, convolutions, attention), as torch counts them."""
    return sum(count_flops_by_module(fn).values())


def count_flops_by_module(fn: Callable[[], object], prefixes: tuple[str, ...] = ()) -> dict[str, int]:
    """FLOPs of one call split by module: for each of `prefixes` (dotted paths from the root module,
    e.g. "VLModel.language_model"), the FLOPs run while it was active; "other" holds the rest. A module
    called from inside another counts in both (give disjoint prefixes)."""
    _count_cpu_attention()
    with FlopCounterMode(display=False) as counter:
        fn()
    counts = {name: sum(ops.values()) for name, ops in counter.get_flop_counts().items()}
    parts = {prefix: _inside(counts, prefix) for prefix in prefixes}
    return {**parts, "other": counts.get("Global", 0) - sum(parts.values())}


def _inside(counts: dict[str, int], prefix: str) -> int:
    """FLOPs of the outermost modules called at or under `prefix` (a module reached only through
    method calls, like a front-end, has no entry of its own; its children do)."""
    under = [name for name in counts if name == prefix or name.startswith(prefix + ".")]
    outermost = [n for n in under if not any(n != m and n.startswith(m + ".") for m in under)]
    return sum(counts[name] for name in outermost)


@functools.cache
def _count_cpu_attention() -> None:
    """torch's FLOP counter knows the CUDA SDPA kernels but not the CPU one, so attention went uncounted
    on CPU; register it with the same formula (2·b·h·s_q·s_k·(d_q + d_v), GQA-aware)."""
    from torch.utils.flop_counter import flop_registry, register_flop_formula, sdpa_flop

    target = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    if target is not None and target not in flop_registry:
        register_flop_formula(target, get_raw=True)(sdpa_flop)  # sdpa_flop already maps tensors to shapes


def cache_bytes(cache) -> int:
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

    visit(cache)
    return total


def parameter_counts(model: torch.nn.Module) -> tuple[int, int]:
    """(trainable, total) parameters."""
    params = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


def cache_lengths(cache) -> list[int]:
    """Entries per decoder layer of a transformers KV cache (reduced layers hold fewer)."""
    return [layer.get_seq_length() for layer in cache.layers]
