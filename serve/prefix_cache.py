"""Prefix reuse: the KV of a finished request (prompt and answer), so that a prompt starting the same way
(the next turn of a chat, the same question resent) prefills only the rest on a copy of it.

Entries are one row's cache (kvcache.KVBatch) under its key (prompt_keys: text ids, image slots marked
by their image's digest), bounded by bytes, evicted least recently used. A lookup takes the entry with
the longest common prefix, not only a whole-key match: the chat template may render a past answer other
than as the tokens generated. The prefix is cut back so that it splits no image and leaves at least one
token to run (its logits give the first new token).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any

import numpy as np

from .kvcache import KVBatch
from .lru import ByteLRU
from .prompt_keys import PromptKey, common_prefix

# Shorter shared prefixes (a chat template's header) save less than a prefill of its own costs when the
# prompt could instead join the others' batched prefill.
MIN_REUSED_TOKENS = 16


def refusal(model) -> str | None:
    """Why a cached KV cannot stand in for `model`'s prefill of the same tokens (None: it can)."""
    if model.frontend.batch_state:
        return (
            f"the {model.config.frontend.type!r} front-end's decoder hooks read a visual memory built for "
            "each batch, which a cached KV does not carry"
        )
    pruning = [r.config.type for r in model.reducers if not r.aligned_cache]
    if pruning:
        return (
            f"in-LLM reducers ({', '.join(pruning)}) drop visual tokens inside the LLM, so its cache no "
            "longer holds one entry per prompt token in every layer"
        )
    return None


@dataclass
class Hit:
    """A cached entry whose first `tokens` tokens are those of the prompt looked up."""

    tokens: int
    kv: KVBatch  # one row, at least `tokens` columns


class PrefixCache:
    """Keys -> one row's KV each, at most `budget` bytes; counts hits, misses and tokens reused."""

    def __init__(self, budget: int) -> None:
        self.store = ByteLRU(budget)
        self._ids = itertools.count()
        self.hits = 0
        self.misses = 0
        self.reused_tokens = 0

    def lookup(self, key: PromptKey) -> Hit | None:
        """The entry sharing the longest usable prefix with `key` (None: none shares MIN_REUSED_TOKENS)."""
        best, found = 0, None
        for entry_id, (tokens, _) in self.store.items():
            shared = common_prefix(tokens, key.tokens)
            if shared > best:
                best, found = shared, entry_id
        length = key.boundary(min(best, len(key.tokens) - 1))
        if found is None or length < MIN_REUSED_TOKENS:
            self.misses += 1
            return None
        self.hits += 1
        self.reused_tokens += length
        return Hit(length, self.store.get(found)[1])

    def keep(self, tokens: np.ndarray, kv: KVBatch) -> None:
        """Store one row's KV of `tokens`. Entries whose tokens begin these are dropped: this one serves
        every lookup they would, at least as far."""
        if len(tokens) != kv.mask.shape[1]:
            raise ValueError(
                f"a key of {len(tokens)} tokens for the KV of {kv.mask.shape[1]}: they must match"
            )
        for entry_id, (other, _) in self.store.items():
            if len(other) <= len(tokens) and common_prefix(other, tokens) == len(other):
                self.store.pop(entry_id)
        self.store.put(next(self._ids), (tokens, kv), kv.nbytes + tokens.nbytes)

    def summary(self) -> dict[str, Any]:
        return {
            "hits": self.hits,
            "misses": self.misses,
            "reused_tokens": self.reused_tokens,
            **self.store.summary(),
        }
