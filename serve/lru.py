"""A least-recently-used store bounded by the bytes of what it holds (the server's reuse caches use it).

Sizes are given by the caller (tensors' bytes); storing past the budget evicts the least recently used
entries first, and an entry larger than the whole budget is not stored at all.
"""

from __future__ import annotations

import collections
from collections.abc import Hashable, Iterator
from typing import Any


class ByteLRU:
    """key -> value, at most `budget` bytes in all; `get` and `put` make an entry the most recent."""

    def __init__(self, budget: int) -> None:
        self.budget = budget
        self.bytes = 0
        self.evictions = 0
        self._entries: collections.OrderedDict[Hashable, tuple[Any, int]] = collections.OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: Hashable) -> Any | None:
        if key not in self._entries:
            return None
        self._entries.move_to_end(key)
        return self._entries[key][0]

    def put(self, key: Hashable, value: Any, size: int) -> bool:
        """Store `value` (`size` bytes), evicting the oldest entries to make room; False if it cannot fit."""
        self.pop(key)
        if size > self.budget:
            return False
        while self.bytes + size > self.budget:
            self.pop(next(iter(self._entries)))
            self.evictions += 1
        self._entries[key] = (value, size)
        self.bytes += size
        return True

    def pop(self, key: Hashable) -> None:
        if key in self._entries:
            self.bytes -= self._entries.pop(key)[1]

    def items(self) -> Iterator[tuple[Hashable, Any]]:
        """(key, value) from the least to the most recently used (a snapshot: the store may change)."""
        return iter([(key, value) for key, (value, _) in self._entries.items()])

    def clear(self) -> None:
        self._entries.clear()
        self.bytes = 0

    def summary(self) -> dict[str, Any]:
        return {
            "budget_mb": self.budget / 2**20,
            "used_mb": round(self.bytes / 2**20, 3),
            "entries": len(self),
            "evictions": self.evictions,
        }
