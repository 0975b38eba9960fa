"""A vlbridge checkpoint answering in-process: left-padded batches, greedy decoding with the KV cache."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from vlbridge.config import IMAGE_MARKER
from vlbridge.processing import VLProcessor
from vlbridge.tokenization import generation_kwargs

from .base import Backend, Request


class ModelBackend(Backend):
    """Greedy answers from a `VLModel`; prompts lay images out as the model was trained
    (`model.config.image_position`). Left padding makes each answer independent of its batch."""

    def __init__(self, model, processor: VLProcessor, name: str = "model", path: str | None = None) -> None:
        self.model, self.processor = model.eval(), processor
        self.name, self.path = name, path
        self.image_position = model.config.image_position

    @classmethod
    def from_checkpoint(
        cls, checkpoint: str | Path, device: str | None = None, reducers: list[dict] | None = None
    ) -> ModelBackend:
        """`reducers` switch training-free token reducers on (e.g. `[{"type": "turbo", "r": 16}]`)."""
        from vlbridge.checkpoint import resolve_checkpoint
        from vlbridge.factory import load_pretrained

        path = resolve_checkpoint(checkpoint)
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        model, processor = load_pretrained(path, device=device, reducers=reducers)
        given = Path(checkpoint).resolve()
        name = given.parent.name if given.name == "model" else given.name
        return cls(model, processor, name=name, path=str(path))

    @torch.no_grad()
    def generate(self, requests: Sequence[Request], max_new_tokens: int) -> list[str]:
        tokenizer = self.processor.tokenizer
        batch = self.processor([self._messages(r) for r in requests], [r.images for r in requests])
        device = self.model.device
        batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
        tokens = self.model.generate(
            **batch, max_new_tokens=max_new_tokens, do_sample=False, **generation_kwargs(tokenizer)
        )
        return [tokenizer.decode(row, skip_special_tokens=True).strip() for row in tokens]

    def _messages(self, request: Request) -> list[dict]:
        """The request's messages with its image markers (`IMAGE_MARKER`) as this model writes them."""
        token = self.processor.image_token
        if token == IMAGE_MARKER:
            return request.messages
        return [{**m, "content": m["content"].replace(IMAGE_MARKER, token)} for m in request.messages]

    def describe(self) -> dict[str, Any]:
        return {
            "backend": "checkpoint",
            "name": self.name,
            "path": self.path,
            "image_position": self.image_position,
            "device": str(self.model.device),
            "frontend": self.model.config.frontend.type,
            "reducers": [r.model_dump(mode="json") for r in self.model.config.reducers],
        }
