"""The interface every answering backend implements: a batch of chat requests in, greedy answers out."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

from PIL import Image

ImagePosition = Literal["before", "after"]


@dataclass
class Request:
    """One prompt: chat messages whose text marks each image with `<image>`, and the images in order."""

    messages: list[dict]
    images: list[Image.Image]


class Backend(ABC):
    """Answers requests greedily. `image_position` is where task prompts put the images for this model."""

    image_position: ImagePosition

    @abstractmethod
    def generate(self, requests: Sequence[Request], max_new_tokens: int) -> list[str]:
        """One answer per request, in order; independent of how requests are grouped into calls."""

    @abstractmethod
    def describe(self) -> dict[str, Any]:
        """What answered (recorded in results.json)."""

    def close(self) -> None:  # noqa: B027 - optional hook: most backends hold nothing to release
        """Release resources (connections, processes)."""
