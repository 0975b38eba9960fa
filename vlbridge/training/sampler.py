"""Deterministic, resumable batch orders: the batch for micro-step k is a pure function of (seed, k, rank).

Each epoch is a fresh seeded arrangement of all samples; positions run across epochs, so resuming at
micro-step k sees exactly the samples an uninterrupted run would have seen. Orders are named in
`BATCH_ORDERS` (`random`, `length_grouped`) and built by `make_order`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from ..registry import Registry

BATCH_ORDERS: Registry[Any] = Registry("batch order")


class BatchOrder:
    """A uniformly random permutation per epoch (torch's `randperm`, so runs resume across versions)."""

    def __init__(self, n: int, batch_size: int, seed: int, rank: int = 0, world: int = 1) -> None:
        if n == 0:
            raise ValueError("no training samples")
        self.n, self.batch_size, self.seed, self.rank, self.world = n, batch_size, seed, rank, world
        self._perms: dict[int, np.ndarray] = {}

    def _arrange(self, epoch: int) -> np.ndarray:
        generator = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
        return torch.randperm(self.n, generator=generator).numpy()

    def _permutation(self, epoch: int) -> np.ndarray:
        """Epoch `epoch`'s arrangement (8 bytes a sample; this epoch's and the one before are kept)."""
        if epoch not in self._perms:
            self._perms = {e: p for e, p in self._perms.items() if e >= epoch - 1}
            self._perms[epoch] = self._arrange(epoch)
        return self._perms[epoch]

    def batch(self, micro_step: int) -> list[int]:
        """Sample indices of this rank's share of global micro-batch `micro_step`."""
        start = (micro_step * self.world + self.rank) * self.batch_size
        return [
            int(self._permutation(p // self.n)[p % self.n]) for p in range(start, start + self.batch_size)
        ]

    def epoch_of(self, micro_step: int) -> float:
        return micro_step * self.world * self.batch_size / self.n


def modality_length(sample: dict) -> int:
    """A padding proxy that opens no image: the characters of the conversation (at least 1), negative for
    a text-only sample (the sign convention of LLaVA's `modality_lengths`)."""
    length = max(1, sum(len(m["content"]) for m in sample["messages"]))
    return length if sample.get("images") else -length


class LengthGroupedOrder(BatchOrder):
    """LLaVA's `group_by_modality_length`: samples of similar length share micro-batches, to cut padding.

    Each epoch, the image samples and the text-only ones are shuffled separately and cut into mega-batches
    of `group` global micro-batches (`world * batch_size * group` samples), so a mega-batch never mixes
    modalities; the mega-batches are shuffled, and the leftovers of both modalities end the epoch as one
    mixed mega-batch. Inside a mega-batch samples are sorted longest first and dealt to micro-steps in that
    order; within a micro-step, rank r takes every `world`-th sample from the r-th, so ranks get equal
    work. With `group` = the gradient accumulation steps an optimizer step still sees a uniformly random
    set of samples; only how it is split into micro-batches follows length.

    Lengths (`modality_length`, no image decoding) are read from the samples on the first batch asked for,
    once; they cost 8 bytes a sample.
    """

    def __init__(
        self,
        samples: Sequence[dict],
        batch_size: int,
        seed: int,
        rank: int = 0,
        world: int = 1,
        *,
        group: int = 1,
    ) -> None:
        super().__init__(len(samples), batch_size, seed, rank, world)
        self.samples, self.group = samples, group
        self._lengths: np.ndarray | None = None

    @property
    def lengths(self) -> np.ndarray:
        if self._lengths is None:
            lengths = (modality_length(self.samples[i]) for i in range(self.n))
            self._lengths = np.fromiter(lengths, dtype=np.int64, count=self.n)
        return self._lengths

    def _arrange(self, epoch: int) -> np.ndarray:
        rng = np.random.default_rng([self.seed, epoch])
        lengths, micro = self.lengths, self.world * self.batch_size
        mega = micro * self.group
        whole, leftovers = [], []
        for members in (np.flatnonzero(lengths > 0), np.flatnonzero(lengths < 0)):
            members = rng.permutation(members)
            cut = len(members) // mega * mega
            whole.append(members[:cut].reshape(-1, mega))
            leftovers.append(members[cut:])
        megabatches = np.concatenate(whole)[rng.permutation(sum(len(w) for w in whole))]
        tail = np.concatenate(leftovers)
        size = np.abs(lengths)
        # longest first inside each mega-batch (stable, so ties keep their random order)
        megabatches = np.take_along_axis(
            megabatches, np.argsort(-size[megabatches], axis=1, kind="stable"), 1
        )
        tail = tail[np.argsort(-size[tail], kind="stable")]
        # each micro-step's `world * batch_size` sorted samples are dealt round-robin: rank r takes r::world
        dealt = megabatches.reshape(-1, self.group, self.batch_size, self.world).transpose(0, 1, 3, 2)
        full = len(tail) // micro * micro
        tail_dealt = tail[:full].reshape(-1, self.batch_size, self.world).transpose(0, 2, 1)
        arranged = np.concatenate([dealt.reshape(-1), tail_dealt.reshape(-1), tail[full:]])
        # an epoch that starts mid micro-step (n not a multiple of world * batch_size) first completes that
        # step with its last samples, so its mega-batches start on micro-step boundaries
        return np.roll(arranged, -epoch * self.n % micro)


@BATCH_ORDERS.register("random")
def random_order(
    samples: Sequence, batch_size: int, seed: int, rank: int, world: int, group: int
) -> BatchOrder:
    return BatchOrder(len(samples), batch_size, seed, rank, world)


@BATCH_ORDERS.register("length_grouped")
def length_grouped_order(
    samples: Sequence, batch_size: int, seed: int, rank: int, world: int, group: int
) -> LengthGroupedOrder:
    return LengthGroupedOrder(samples, batch_size, seed, rank, world, group=group)


def make_order(
    name: str, samples: Sequence, batch_size: int, seed: int, rank: int = 0, world: int = 1, *, group: int = 1
) -> BatchOrder:
    """The order `name` over `samples`; `group` (micro-steps per mega-batch) matters to length_grouped."""
    return BATCH_ORDERS.get(name)(samples, batch_size, seed, rank, world, group)
