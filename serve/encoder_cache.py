"""The encoder cache: an image seen before (a later turn, another request) skips the tower and connector.

Keyed by the digest of the processed pixels (prompt_keys.image_digest), it holds the front-end's `encode`
output for each image, bounded by bytes and evicted least recently used. Only front-ends whose embeddings
are exactly those features of each image alone, spliced at its placeholders (the default
`Frontend.embed`: llava, inf_llava) can use it; `refusal` names why others cannot.
"""

from __future__ import annotations

from typing import Any

import torch

from vlbridge.frontends.base import Frontend

from .lru import ByteLRU


def refusal(model) -> str | None:
    """Why `model`'s image features cannot be computed apart and reused (None: they can)."""
    frontend = type(model.frontend)
    if frontend.embed is not Frontend.embed:
        return (
            f"the {model.config.frontend.type!r} front-end builds its embeddings in its own `embed` "
            "(per-patch projections, packed or per-row state), not from per-image features alone"
        )
    towers = [r.config.type for r in model.reducers if r.shrinks_tower]
    if towers:
        return (
            f"tower reducers ({', '.join(towers)}) report where each image's merged tokens sit and what they "
            "weigh from the tower call itself, which a cached image would skip"
        )
    return None


class EncoderCache:
    """digest -> one image's features [T_img, D], at most `budget` bytes; counts hits and misses."""

    def __init__(self, model, budget: int) -> None:
        self.model = model
        self.store = ByteLRU(budget)
        self.hits = 0
        self.misses = 0

    def features(self, pixels: list[torch.Tensor], digests: list[int]) -> torch.Tensor:
        """The features of `pixels` [N_img, T_img, D], encoding only the images not in the cache (in one
        call; an image twice in `pixels` is encoded once)."""
        found = {d: f for d in digests if (f := self.store.get(d)) is not None}
        missing = {d: p for p, d in zip(pixels, digests, strict=True) if d not in found}
        self.hits += len(digests) - len(missing)  # every other image is served without encoding it
        self.misses += len(missing)
        if missing:
            frontend = self.model.frontend
            batch = frontend.layout.collate(list(missing.values())).to(self.model.device)
            for digest, features in zip(missing, frontend.encode(batch), strict=True):
                found[digest] = features.clone()  # its own storage: the batch's would outlive it
                self.store.put(digest, found[digest], features.nbytes)
        return torch.stack([found[d] for d in digests])

    def summary(self) -> dict[str, Any]:
        return {"hits": self.hits, "misses": self.misses, **self.store.summary()}
