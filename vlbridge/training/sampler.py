"""Deterministic, resumable batch order: the batch for micro-step k is a pure function of (seed, k, rank).

Each epoch is a fresh seeded permutation; positions run across epochs, so resuming at micro-step k
sees exactly the samples an uninterrupted run would have seen.
"""

from __future__ import annotations

import torch


class BatchOrder:
    def __init__(self, n: int, batch_size: int, seed: int, rank: int = 0, world: int = 1) -> None:
        if n == 0:
            raise ValueError("no training samples")
        self.n, self.batch_size, self.seed, self.rank, self.world = n, batch_size, seed, rank, world
        self._perms: dict[int, list[int]] = {}

    def _permutation(self, epoch: int) -> list[int]:
        if epoch not in self._perms:
            generator = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
            self._perms = {e: p for e, p in self._perms.items() if e >= epoch - 1}
            self._perms[epoch] = torch.randperm(self.n, generator=generator).tolist()
        return self._perms[epoch]

    def batch(self, micro_step: int) -> list[int]:
        """Sample indices of this rank's share of global micro-batch `micro_step`."""
        start = (micro_step * self.world + self.rank) * self.batch_size
        return [self._permutation(p // self.n)[p % self.n] for p in range(start, start + self.batch_size)]

    def epoch_of(self, micro_step: int) -> float:
        return micro_step * self.world * self.batch_size / self.n
