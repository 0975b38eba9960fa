"""Training batches: samples encoded once and cached, dropped ones counted, padded by index list."""

from __future__ import annotations

from collections.abc import Sequence

from ..data.collator import Collator, encode_sample
from ..processing import DropCounter, Encoded, VLProcessor


class EncodedSamples:
    """Random access to encoded samples (None for a dropped one), cached so each is encoded once."""

    def __init__(
        self, samples: Sequence[dict], processor: VLProcessor, drops: DropCounter, cache: bool
    ) -> None:
        self.samples, self.processor, self.drops = samples, processor, drops
        self.collate = Collator(processor, drops)
        self._cache: dict[int, Encoded | None] | None = {} if cache else None

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> Encoded | None:
        if self._cache is not None and index in self._cache:
            return self._cache[index]
        encoded = encode_sample({"id": index} | self.samples[index], self.processor, self.drops)
        if self._cache is not None:
            self._cache[index] = encoded
        return encoded

    def encode_all(self) -> None:
        """Encode every sample now (small datasets), so the training loop is pure model compute."""
        for index in range(len(self)):
            self[index]

    def batch(self, indices: list[int]) -> dict | None:
        encoded = [e for e in (self[i] for i in indices) if e is not None]
        return self.collate(encoded) if encoded else None
