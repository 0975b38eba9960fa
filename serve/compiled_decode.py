"""Batch-1 decode compiled (`vlbridge serve --compile`): one request's next-token step as fused kernels.

Decoding one request reads every weight once per token, and an eager step adds hundreds of small
operations, each a Python call. `torch.compile` fuses them; with each linear layer's one-row product
written as multiply-and-sum (serve/linear.py's `ServingLinear`) instead of a BLAS call, the compiler
turns it into one pass over the weight, so the step runs near the memory-bandwidth limit
(serve/roofline.py measures both ways). Batched steps stay eager: there the matrix products dominate
(on prepacked weights, serve/linear.py) and compiling measured no gain. Prefill stays eager too (each
prompt length would be a new graph).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from typing import Any

import torch

log = logging.getLogger("vlbridge.serve")


def refusal(model) -> str | None:
    """Why `model`'s decode step stays eager (None: it may be compiled)."""
    if model.keeps_batch_state:
        return (
            "its decoder hooks (a deep-fusion front-end or an in-LLM reducer) keep per-batch state outside "
            "the call, which a compiled graph would not see change"
        )
    return None


class BatchOneDecode:
    """The language model's forward for one-row decode steps, compiled on first call, run with `threads`
    torch threads (None: torch's count); its linear layers should be `ServingLinear`s (`serving_linears`),
    whose one-row products then fuse. Once tuned, an input its graphs do not cover runs eager instead of
    compiling again, which would stall every request for as long."""

    def __init__(self, language_model: torch.nn.Module) -> None:
        self.forward = torch.compile(language_model)
        self.threads: int | None = None
        self.stance = "default"  # compile what is new

    def __call__(self, **kwargs: Any) -> Any:
        before = torch.get_num_threads()
        torch.set_num_threads(self.threads or before)
        try:
            with torch.compiler.set_stance(self.stance):
                return self.forward(**kwargs)
        finally:
            torch.set_num_threads(before)

    def tune(self, steps: Callable[[int], float], rounds: int = 2, tokens: int = 4) -> None:
        """Keep the faster of torch's thread count and one thread, timing `steps(tokens)` (seconds for that
        many steps) alternately. A step streams the weights, which one core may do about as fast as all,
        and OpenMP's wake-ups cost more off the main thread (2-core CPU, a worker thread: 12 ms with one
        thread, 16 ms with two; the main thread: two win). Each count is a graph of its own, compiled here."""
        best: dict[int | None, float] = {}
        for _ in range(rounds):
            for threads in (None, 1):
                self.threads = threads
                best[threads] = min(best.get(threads, math.inf), steps(tokens))
        self.threads = min(best, key=best.__getitem__)
        self.stance = "eager_on_recompile"

    def warm_up(
        self, rows: list[tuple[torch.Tensor, Any]], decode: Callable[[Any, torch.Tensor], torch.Tensor]
    ) -> bool:
        """Compile on throwaway one-row batches ((last logits, KV) each; `decode(kv, tokens)` runs a step
        and returns the next logits), on the thread that will decode, then `tune`. False (logged) when it
        cannot compile (no working C++ compiler, say): the step then stays eager."""
        started = time.perf_counter()

        def steps(n: int) -> float:
            begin = time.perf_counter()
            for i, (logits, kv) in enumerate(rows):
                for _ in range(n):
                    logits = decode(kv, logits.argmax(-1))
                rows[i] = logits, kv
            return time.perf_counter() - begin

        try:
            steps(3)  # compiles for one cache length, then for any
            self.tune(steps)
        except Exception:
            log.exception("--compile: the batch-1 decode step could not be compiled; it stays eager")
            return False
        log.info("--compile: batch-1 decode compiled in %.1f s", time.perf_counter() - started)
        return True
