"""What identifies a prompt's content for reuse: its token ids with every image's placeholder slots
marked by a digest of that image's pixels.

Placeholder ids are the same for every image, so two prompts that differ only in their image have equal
ids; the digest tells them apart. Keys are int64 arrays (text: the token id, >= 0; an image's slots:
-1 - its digest), so the longest common prefix of two keys is one vectorised comparison.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
import torch

from vlbridge.errors import DataError
from vlbridge.frontends.layout import ImageLayout
from vlbridge.processing import Encoded


def image_digest(pixels: torch.Tensor) -> int:
    """A 63-bit digest of one processed image: its values, shape and dtype."""
    digest = hashlib.blake2b(f"{tuple(pixels.shape)} {pixels.dtype}".encode(), digest_size=8)
    digest.update(pixels.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return int.from_bytes(digest.digest(), "little") >> 1


@dataclass(frozen=True)
class PromptKey:
    """A prompt (`encoded`), its images' digests and its key; `spans` are the [start, end) token ranges of
    each image's slots, which a reused prefix must not cut apart (the rest would hold part of an image)."""

    encoded: Encoded
    digests: list[int]
    tokens: np.ndarray  # [T] int64
    spans: list[tuple[int, int]]

    @classmethod
    def of(cls, encoded: Encoded, layout: ImageLayout, image_token_id: int) -> PromptKey:
        ids = np.asarray(encoded.input_ids, dtype=np.int64)
        digests = [image_digest(pixels) for pixels in encoded.pixel_values]
        slots = np.flatnonzero(ids == image_token_id)
        counts = [layout.placeholder(pixels).count(layout.image_token) for pixels in encoded.pixel_values]
        if len(slots) != sum(counts):
            raise DataError(
                f"the prompt has {len(slots)} image placeholder tokens but its {len(counts)} images take "
                f"{counts}; build prompts with VLProcessor.encode"
            )
        tokens, spans = ids.copy(), []
        for digest, end, count in zip(digests, np.cumsum(counts), counts, strict=True):
            mine = slots[end - count : end]
            tokens[mine] = -1 - digest
            spans.append((int(mine[0]), int(mine[-1]) + 1))
        return cls(encoded, digests, tokens, spans)

    def boundary(self, length: int) -> int:
        """The longest prefix of at most `length` tokens that cuts no image apart."""
        return next((start for start, end in self.spans if start < length < end), length)

    def images_before(self, length: int) -> int:
        """Images wholly inside the first `length` tokens (a boundary)."""
        return sum(end <= length for _, end in self.spans)

    def tail(self, start: int) -> tuple[Encoded, list[int]]:
        """The prompt from token `start` (a boundary) on, with the images there, and their digests."""
        images = self.images_before(start)
        encoded = self.encoded
        rest = Encoded(encoded.input_ids[start:], encoded.labels[start:], encoded.pixel_values[images:])
        return rest, self.digests[images:]


def common_prefix(a: np.ndarray, b: np.ndarray) -> int:
    """How many leading entries two keys share."""
    n = min(len(a), len(b))
    differ = np.flatnonzero(a[:n] != b[:n])
    return int(differ[0]) if len(differ) else n
