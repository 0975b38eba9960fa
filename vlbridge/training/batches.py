"""Training batches: samples encoded on first use (then cached), dropped ones counted, padded by index list."""

from __future__ import annotations

from collections.abc import Sequence

from ..data.formats import load_image
from ..processing import DropCounter, Encoded, VLProcessor, pad_batch


class EncodedSamples:
    """Random access to encoded samples; a sample whose truncation would break it encodes to None."""

    def __init__(self, samples: Sequence[dict], processor: VLProcessor, drops: DropCounter, cache: bool) -> None:
        self.samples, self.processor, self.drops = samples, processor, drops
        self._cache: dict[int, Encoded | None] | None = {} if cache else None

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> Encoded | None:
        if self._cache is not None and index in self._cache:
            return self._cache[index]
        sample = self.samples[index]
        sid = str(sample.get("id", index))
        images = [load_image(ref, sid) for ref in sample.get("images", [])]
        encoded = self.processor.encode(sample["messages"], images, sample_id=sid)
        encoded = self.processor.truncate(encoded, self.drops)
        if self._cache is not None:
            self._cache[index] = encoded
        return encoded

    def batch(self, indices: list[int]) -> dict | None:
        encoded = [e for e in (self[i] for i in indices) if e is not None]
        if not encoded:
            return None
        return pad_batch(encoded, self.processor.tokenizer.pad_token_id, self.processor.frontend)
