"""Streaming Hugging Face datasets: samples read in order, so a dataset never has to be on disk whole.

A streaming `datasets.IterableDataset` (`load_dataset(..., streaming=True)`) is shuffled by `datasets`
itself (shard order plus a buffer, `shuffle(seed, buffer_size)`, reseeded each epoch by `set_epoch`), split
across ranks with `split_dataset_by_node`, and read epoch after epoch. Its state after any sample is small
(epoch, samples read, `datasets`' own position), and resuming from it continues at exactly the next sample:
from `datasets`' `state_dict` when it is not shuffled, otherwise by reading the epoch again up to that
sample, since `datasets` does not save its shuffle buffer's content (resuming from its state alone would
refill the buffer and yield other samples).
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable, Iterator
from itertools import chain, islice
from typing import Any

from pydantic import Field

from ..errors import DataError
from ..registry import DATA_FORMATS
from .formats import DataSourceConfig, hf_row_converter


class HFStreamConfig(DataSourceConfig):
    """A dataset streamed with `datasets`: a hub id, or a builder (`json`, `parquet`) over `data_files`."""

    type: str = "hf_streaming"
    path: str
    name: str | None = None
    data_files: str | list[str] | dict[str, str | list[str]] | None = None
    split: str = "train"
    image_column: str = "image"
    messages_column: str = "messages"
    # 0: the stored order; 1: shards shuffled; more: shards and a buffer of that many samples (shuffled
    # streams resume by rereading the epoch up to where they stopped)
    shuffle_buffer: int = Field(default=1000, ge=0)
    # a tokenizer trained for the recipe (`tokenizer.train_vocab_size`) learns from this many first samples
    tokenizer_samples: int = Field(default=10_000, ge=1)


class StreamingSamples:
    """One rank's endless sequence of samples from a streaming dataset, resumable at any sample.

    `convert(row, index)` turns a row into a sample (`index`: the row's position in this rank's epoch).
    Images stay undecoded (`{"bytes", "path"}`) so DataLoader workers, not the reader, open them.
    `epoch_size` ends each epoch after that many samples on this rank (a quick run's `limit`).
    """

    def __init__(
        self,
        dataset,
        convert: Callable[[dict, int], dict],
        *,
        seed: int,
        buffer_size: int = 1000,
        rank: int = 0,
        world: int = 1,
        epoch_size: int | None = None,
    ) -> None:
        # undecoded images (a stream of unknown features, such as JSON files, decodes none anyway)
        known = getattr(dataset, "features", None) is not None
        self.dataset = dataset.decode(False) if known and hasattr(dataset, "decode") else dataset
        self.convert, self.seed, self.buffer_size = convert, seed, buffer_size
        self.rank, self.world, self.epoch_size = rank, world, epoch_size
        self.epoch, self.consumed, self._position = 0, 0, None
        self._reading = None  # the epoch's IterableDataset while it is being read

    @property
    def replays(self) -> bool:
        """Whether resuming rereads the epoch (any shuffling), rather than jumping to `datasets`' state: with
        shuffled shards the lowest `datasets` this project supports (4.0) resumes a sample off."""
        return self.buffer_size > 0

    def _epoch(self, epoch: int):
        from datasets.distributed import split_dataset_by_node

        dataset = self.dataset
        if self.buffer_size:
            dataset = dataset.shuffle(seed=self.seed, buffer_size=self.buffer_size)
        dataset = split_dataset_by_node(dataset, rank=self.rank, world_size=self.world)
        dataset.set_epoch(epoch)
        return dataset

    def state_dict(self) -> dict[str, Any]:
        """Where the stream stands: after the last sample it yielded."""
        reading = self._reading is not None and self.consumed and not self.replays
        position = self._reading.state_dict() if reading else self._position
        return {"epoch": self.epoch, "consumed": self.consumed, "position": position}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch, self.consumed, self._position = state["epoch"], state["consumed"], state["position"]
        self._reading = None

    def __iter__(self) -> Iterator[dict]:
        """Samples from the current state on, epoch after epoch; the state moves with each one yielded."""
        while True:
            dataset = self._epoch(self.epoch)
            if self.consumed and not self.replays:
                rows = _resume(dataset, self._position)
            else:
                rows = iter(dataset)
                deque(islice(rows, self.consumed), maxlen=0)  # read the epoch again up to where it stopped
            self._reading = dataset
            left = None if self.epoch_size is None else self.epoch_size - self.consumed
            for row in islice(rows, left):
                sample = self.convert(row, self.consumed)
                self.consumed += 1
                yield sample
            if not self.consumed:
                raise DataError(f"the stream has no samples for rank {self.rank} of {self.world}")
            self.epoch, self.consumed, self._position, self._reading = self.epoch + 1, 0, None, None


def _resume(dataset, position: dict) -> Iterator[dict]:
    """The rows after `position`, by `datasets`' own resume (it loads the position on the first read) of an
    unshuffled stream."""
    dataset.load_state_dict(position)
    rows = iter(dataset)
    logger = logging.getLogger("datasets.iterable_dataset")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        first = list(islice(rows, 1))
    finally:
        logger.setLevel(level)
    return chain(first, rows)


@DATA_FORMATS.register("hf_streaming", config=HFStreamConfig)
class StreamSource:
    """A recipe's streaming source: the trainer opens one stream per rank and stage (`open`), resumable at
    any sample; nothing is read before."""

    def __init__(self, cfg: HFStreamConfig) -> None:
        self.cfg = cfg

    def open(self, *, seed: int, rank: int = 0, world: int = 1) -> StreamingSamples:
        return open_stream(self.cfg, seed=seed, rank=rank, world=world)

    def head(self, count: int) -> list[dict]:
        """The first `count` samples in the stored order (at most one epoch), images undecoded."""
        stream = open_stream(self.cfg.model_copy(update={"shuffle_buffer": 0}), seed=0)
        count = min(count, self.cfg.limit or count)
        return [stream.convert(row, i) for i, row in enumerate(islice(stream.dataset, count))]


def open_stream(cfg: HFStreamConfig, *, seed: int, rank: int = 0, world: int = 1) -> StreamingSamples:
    """This rank's stream of `cfg`'s dataset (nothing is downloaded until samples are read)."""
    import datasets

    try:
        dataset = datasets.load_dataset(
            cfg.path, cfg.name, split=cfg.split, data_files=cfg.data_files, streaming=True
        )
    except Exception as err:  # noqa: BLE001 - offline, unknown id, bad files: all need the same advice
        raise DataError(
            f"could not stream dataset {cfg.path!r} (config {cfg.name!r}, split {cfg.split!r}): {err}"
        ) from err
    convert = hf_row_converter(cfg.messages_column, cfg.image_column)
    epoch_size = None if cfg.limit is None else max(1, cfg.limit // world)
    return StreamingSamples(
        dataset,
        convert,
        seed=seed,
        buffer_size=cfg.shuffle_buffer,
        rank=rank,
        world=world,
        epoch_size=epoch_size,
    )
