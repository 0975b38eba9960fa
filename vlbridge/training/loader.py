"""Training micro-batches built in DataLoader worker processes, in exactly the order the loop asks for.

An item of the DataLoader is a whole micro-batch (`batch_size=None`). What goes into it is decided in the
main process, in micro-step order: `order.batch(k)` for an indexed dataset, the next samples for a stream;
so the sequence is the same with any number of workers and resuming at any micro-step is exact. A worker
reads the samples, opens their images, encodes and pads them. Workers cannot count into the main
process's `DropCounter`, so each batch travels with its own drop counts, merged here as it is handed out:
totals are the same with 0 or 8 workers.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

from torch.utils.data import DataLoader, Dataset

from ..data.collator import Collator
from ..processing import DropCounter, VLProcessor


def collate_counted(processor: VLProcessor, samples: list[dict]) -> tuple[dict | None, dict[str, int]]:
    """One padded micro-batch (None when every sample was dropped) and the drops it cost, by reason."""
    drops = DropCounter()
    return Collator(processor, drops)(samples), drops.counts


class IndexedBatches(Dataset):
    """Item `indices` -> (batch, drop counts), as `EncodedSamples.batch(indices)` builds it."""

    def __init__(self, samples: Sequence[dict], processor: VLProcessor) -> None:
        self.samples, self.processor = samples, processor

    def __getitem__(self, indices: list[int]) -> tuple[dict | None, dict[str, int]]:
        return collate_counted(self.processor, [{"id": i} | self.samples[i] for i in indices])


class GivenBatches(Dataset):
    """Item (samples, state) -> (batch, drop counts, state): samples a stream read in the main process."""

    def __init__(self, processor: VLProcessor) -> None:
        self.processor = processor

    def __getitem__(self, job: tuple[list[dict], Any]) -> tuple[dict | None, dict[str, int], Any]:
        samples, state = job
        return (*collate_counted(self.processor, samples), state)


class _Jobs:
    """The DataLoader's sampler: one job per micro-step, made in the main process."""

    def __init__(self, make: Callable[[], Iterator], length: int) -> None:
        self.make, self.length = make, length

    def __iter__(self) -> Iterator:
        return self.make()

    def __len__(self) -> int:
        return self.length


def _as_is(item):
    return item


def _data_loader(dataset: Dataset, jobs: _Jobs, workers: int, prefetch: int, pin_memory: bool) -> DataLoader:
    """One pass over `jobs` is the whole stage (epochs are inside the order), so the workers live as long
    as the loader is read: `persistent_workers` would add nothing."""
    return DataLoader(
        dataset,
        batch_size=None,
        sampler=jobs,
        collate_fn=_as_is,
        num_workers=workers,
        prefetch_factor=prefetch if workers else None,
        pin_memory=pin_memory,
    )


def _read(loader: DataLoader) -> Iterator:
    """The loader's items; its workers stop as soon as reading ends, early break and error included (a
    worker error's traceback would leave them to garbage collection, whose shutdown waits 5 s)."""
    items = iter(loader)
    try:
        yield from items
    finally:
        getattr(items, "_shutdown_workers", lambda: None)()


class BatchLoader(Iterable):
    """The micro-batches of steps start, start + 1, ..., stop - 1 of `order` (None for an all-dropped one).

    `num_workers=0` builds them in this process, the same batches; `prefetch_factor` batches per worker are
    built ahead. Drop counts go to `drops` as each batch is handed out.
    """

    def __init__(
        self,
        samples: Sequence[dict],
        processor: VLProcessor,
        order,
        start: int,
        stop: int,
        *,
        num_workers: int = 0,
        drops: DropCounter | None = None,
        prefetch_factor: int = 2,
        pin_memory: bool = False,
    ) -> None:
        self.order, self.start, self.stop = order, start, stop
        self.drops = drops if drops is not None else DropCounter()
        jobs = _Jobs(lambda: (order.batch(k) for k in range(start, stop)), stop - start)
        self.loader = _data_loader(
            IndexedBatches(samples, processor), jobs, num_workers, prefetch_factor, pin_memory
        )

    def __len__(self) -> int:
        return self.stop - self.start

    def __iter__(self) -> Iterator[dict | None]:
        for batch, drops in _read(self.loader):
            self.drops.merge(drops)
            yield batch


class StreamLoader(Iterable):
    """`steps` micro-batches of `batch_size` consecutive samples of a rank's stream (`StreamingSamples`).

    `state_dict()` is the stream's state after the last batch handed out (batches built ahead do not
    count), for a checkpoint; a loader over a stream given that state continues with the next batch.
    """

    def __init__(
        self,
        stream,
        processor: VLProcessor,
        batch_size: int,
        steps: int,
        *,
        num_workers: int = 0,
        drops: DropCounter | None = None,
        prefetch_factor: int = 2,
        pin_memory: bool = False,
    ) -> None:
        self.stream, self.batch_size, self.steps = stream, batch_size, steps
        self.drops = drops if drops is not None else DropCounter()
        self.state = stream.state_dict()
        self.loader = _data_loader(
            GivenBatches(processor), _Jobs(self._jobs, steps), num_workers, prefetch_factor, pin_memory
        )

    def _jobs(self) -> Iterator[tuple[list[dict], Any]]:
        samples = iter(self.stream)
        for _ in range(self.steps):
            yield [next(samples) for _ in range(self.batch_size)], self.stream.state_dict()

    def __len__(self) -> int:
        return self.steps

    def __iter__(self) -> Iterator[dict | None]:
        for batch, drops, state in _read(self.loader):
            self.drops.merge(drops)
            self.state = state
            yield batch

    def state_dict(self) -> dict[str, Any]:
        return self.state
