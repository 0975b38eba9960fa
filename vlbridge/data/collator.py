"""Samples -> padded training batches.

Samples are the `{"id", "images", "messages"}` records of `vlbridge.data.formats`. Images stay as
references until a sample is encoded, so a dataset of any size can be batched lazily; small datasets
are better encoded once up front with `prepare_samples` (tokenizing and resizing every epoch is then
saved) and the resulting `Encoded` list is batched by the same `Collator`.

Over-long samples are not errors: `VLProcessor.truncate` cuts text it can cut and drops (and counts in
a shared `DropCounter`) samples it cannot, so a run reports how much data its length limit cost.
"""

from __future__ import annotations

from collections.abc import Iterable

from ..processing import DropCounter, Encoded, VLProcessor, pad_batch
from .io import load_image


def encode_sample(sample: dict, processor: VLProcessor, drops: DropCounter | None = None) -> Encoded | None:
    """Load the images of one sample, encode and truncate it; None when truncation dropped it.

    Errors (unreadable image, marker/image count mismatch) raise `DataError` naming the sample, since
    they are bugs in the data rather than something a length limit explains.
    """
    sample_id = str(sample.get("id", "?"))
    images = [load_image(ref, sample_id) for ref in sample.get("images") or []]
    encoded = processor.encode(sample["messages"], images, sample_id=sample_id)
    return processor.truncate(encoded, drops)


def prepare_samples(
    samples: Iterable[dict], processor: VLProcessor, drops: DropCounter | None = None
) -> list[Encoded]:
    """Encode a whole (small) dataset once; over-long samples are dropped and counted in `drops`."""
    encoded = (encode_sample(sample, processor, drops) for sample in samples)
    return [e for e in encoded if e is not None]


class Collator:
    """`collate_fn` for a DataLoader: raw samples (or pre-encoded `Encoded`) -> one padded batch.

    `drops` is shared with the caller so drops that happen lazily, inside batches, are still reported
    (in the main process only: DataLoader workers count in their own copies, so `training/loader.py`
    sends each batch's counts back with it). A batch whose every sample was dropped comes back as None;
    training loops skip it.
    """

    def __init__(self, processor: VLProcessor, drops: DropCounter | None = None, *, side: str = "right"):
        self.processor = processor
        self.drops = drops if drops is not None else DropCounter()
        self.side = side

    def __call__(self, samples: list[dict | Encoded]) -> dict | None:
        encoded = [
            s if isinstance(s, Encoded) else encode_sample(s, self.processor, self.drops) for s in samples
        ]
        kept = [e for e in encoded if e is not None]
        if not kept:
            return None
        return pad_batch(kept, self.processor.tokenizer.pad_token_id, self.processor.layout, side=self.side)
