"""Batch orders: `random` unchanged, `length_grouped` (LLaVA's group_by_modality_length) a seeded permutation
per epoch whose micro-batches hold samples of one modality and similar length."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from vlbridge.errors import ConfigError
from vlbridge.training.sampler import (
    BATCH_ORDERS,
    BatchOrder,
    LengthGroupedOrder,
    make_order,
    modality_length,
)


def mixed_samples(n: int, seed: int = 0) -> list[dict]:
    """Conversations of 1 to 400 characters, with an image in about half of them."""
    rng = random.Random(seed)
    samples = []
    for i in range(n):
        text = "x" * rng.randint(1, 400)
        images = ["img.png"] if rng.random() < 0.5 else []
        samples.append({"id": str(i), "images": images, "messages": [{"role": "user", "content": text}]})
    return samples


class Counting(list):
    """Samples that count how often they are read."""

    reads = 0

    def __getitem__(self, index):
        self.reads += 1
        return super().__getitem__(index)


def test_random_order_is_torch_randperm_as_before() -> None:
    order = BatchOrder(10, 4, seed=7)
    perms = [
        torch.randperm(10, generator=torch.Generator().manual_seed(7 * 100_003 + e)).tolist() for e in (0, 1)
    ]
    flat = perms[0] + perms[1]
    assert [order.batch(k) for k in range(5)] == [flat[4 * k : 4 * k + 4] for k in range(5)]
    assert all(type(i) is int for i in order.batch(3))


def test_registry_builds_orders_by_name() -> None:
    samples = mixed_samples(30)
    assert {"random", "length_grouped"} <= set(BATCH_ORDERS.names())
    assert make_order("random", samples, 4, seed=1).batch(2) == BatchOrder(30, 4, 1).batch(2)
    grouped = make_order("length_grouped", samples, 4, seed=1, rank=1, world=2, group=3)
    assert isinstance(grouped, LengthGroupedOrder) and (grouped.rank, grouped.world, grouped.group) == (
        1,
        2,
        3,
    )
    with pytest.raises(ConfigError, match="unknown batch order 'sorted'; available: length_grouped, random"):
        make_order("sorted", samples, 4, seed=1)


@pytest.mark.parametrize("n", [48, 50])
def test_length_grouped_is_a_permutation_per_epoch_and_deterministic(n) -> None:
    samples = Counting(mixed_samples(n))
    world, batch_size = 2, 3
    orders = [
        LengthGroupedOrder(samples, batch_size, seed=5, rank=r, world=world, group=2) for r in range(world)
    ]
    assert samples.reads == 0  # lengths are read on the first batch, not before
    steps = 3 * n // (world * batch_size) + 1
    seen = [i for k in range(steps) for order in orders for i in order.batch(k)]
    assert samples.reads == world * n  # once per order (one per rank in a run)
    for epoch in range(3):
        assert sorted(seen[epoch * n : (epoch + 1) * n]) == list(range(n))
    assert seen[:n] != seen[n : 2 * n]  # every epoch arranged afresh
    again = LengthGroupedOrder(mixed_samples(n), batch_size, seed=5, rank=1, world=world, group=2)
    assert [again.batch(k) for k in range(steps)] == [orders[1].batch(k) for k in range(steps)]
    other = LengthGroupedOrder(mixed_samples(n), batch_size, seed=6, rank=1, world=world, group=2)
    assert [other.batch(k) for k in range(steps)] != [orders[1].batch(k) for k in range(steps)]


def test_length_grouped_micro_batches_keep_one_modality_and_balance_ranks() -> None:
    samples = mixed_samples(400)
    lengths = np.array([modality_length(s) for s in samples])
    world, batch_size, group = 2, 4, 4
    orders = [
        LengthGroupedOrder(samples, batch_size, seed=0, rank=r, world=world, group=group)
        for r in range(world)
    ]
    steps = len(samples) // (world * batch_size)
    mixed = [
        k for k in range(steps) if len({np.sign(lengths[i]) for order in orders for i in order.batch(k)}) > 1
    ]
    # only the epoch's last mega-batch, the leftovers of both modalities (under 2 mega-batches), mixes them
    assert mixed and min(mixed) >= steps - 2 * group, mixed
    for k in range(steps):
        totals = [abs(lengths[orders[r].batch(k)]).sum() for r in range(world)]
        assert max(totals) <= 1.25 * min(totals) + 400, (k, totals)


def padding(order, lengths: np.ndarray, steps: int) -> int:
    """Padding positions of `steps` micro-batches padded to their longest sample."""
    sizes = [np.abs(lengths[order.batch(k)]) for k in range(steps)]
    return int(sum(s.max() * len(s) - s.sum() for s in sizes))


def test_length_grouping_cuts_padding() -> None:
    samples = mixed_samples(512, seed=1)
    lengths = np.array([modality_length(s) for s in samples])
    steps = 2 * len(samples) // 8  # two epochs
    random_pad = padding(BatchOrder(len(samples), 8, seed=0), lengths, steps)
    grouped_pad = {
        group: padding(LengthGroupedOrder(samples, 8, seed=0, group=group), lengths, steps)
        for group in (1, 4, 16)
    }
    # group=1 only separates the modalities; pooling more micro-batches per mega-batch sorts more finely
    assert grouped_pad[16] < grouped_pad[4] < random_pad
    assert grouped_pad[16] < 0.2 * random_pad, (random_pad, grouped_pad)
