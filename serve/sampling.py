"""Per-row sampling: each request in a batch keeps its own temperature, top-p and random generator.

A row's generator is seeded from (request seed, choice index), so a seeded request gives the same
tokens whatever else shares its batch, and the n choices of one request differ from each other.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field

import numpy as np
import torch


@dataclass(frozen=True)
class SamplingParams:
    """What one request asks of generation (already validated by the protocol layer)."""

    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    logprobs: bool = False
    top_logprobs: int = 0
    ignore_eos: bool = False

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0 or self.top_p == 0.0


def row_generator(seed: int | None, choice: int, device: torch.device) -> torch.Generator:
    """A generator for choice `choice` of a request: reproducible from `seed`, else fresh entropy."""
    generator = torch.Generator(device=device)
    if seed is None:
        generator.manual_seed(secrets.randbits(63))
    else:
        entropy = [seed % 2**64 >> 32, seed % 2**32, choice]
        generator.manual_seed(int(np.random.SeedSequence(entropy).generate_state(1, np.uint64)[0] >> 1))
    return generator


def pick_token(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator) -> int:
    """One token id from one row's logits [V] (banned tokens already at -inf)."""
    if params.greedy:
        return int(logits.argmax())
    probs = torch.softmax(logits.float() / params.temperature, dim=-1)  # [V]
    if params.top_p < 1.0:
        probs = top_p_filter(probs, params.top_p)
    return int(torch.multinomial(probs, 1, generator=generator))


def top_p_filter(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """Keep the smallest set of most likely tokens whose mass reaches `top_p` (nucleus sampling)."""
    sorted_probs, order = probs.sort(descending=True)
    before = sorted_probs.cumsum(-1) - sorted_probs  # mass of the tokens ranked above each one
    sorted_probs = sorted_probs.masked_fill(before >= top_p, 0.0)
    kept = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
    return kept / kept.sum()


def token_logprobs(logits: torch.Tensor, token: int, top: int) -> tuple[float, list[tuple[int, float]]]:
    """log p(token) under the model's distribution and the `top` most likely (id, log p) pairs."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    best = logp.topk(top) if top else None
    pairs = list(zip(best.indices.tolist(), best.values.tolist(), strict=True)) if best is not None else []
    return float(logp[token]), pairs
