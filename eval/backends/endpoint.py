"""Any OpenAI-compatible chat endpoint (vlbridge's own server included) as an eval backend.

Each request is one `POST {base}/chat/completions` with temperature 0; images travel as PNG data URLs in
`image_url` content parts, placed where the prompt's `<image>` markers are, so a server that lays parts
out in order sees the prompt a checkpoint would. Requests of a batch are sent concurrently.
"""

from __future__ import annotations

import base64
import io
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from PIL import Image

from vlbridge.config import IMAGE_MARKER
from vlbridge.errors import ConfigError, VLBridgeError

from .base import Backend, ImagePosition, Request

_RETRY_STATUS = {429, 500, 502, 503, 504}


class EndpointError(VLBridgeError):
    """The endpoint could not be reached or did not answer as the OpenAI chat API does."""


def data_url(image: Image.Image) -> str:
    """Lossless PNG, so the server decodes exactly the pixels a local run would use."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def content_parts(text: str, images: list[Image.Image]) -> list[dict] | str:
    """A message's text split at `<image>` markers into text and `image_url` parts (in order)."""
    if IMAGE_MARKER not in text:
        return text
    parts: list[dict] = []
    pieces = text.split(IMAGE_MARKER)
    for i, piece in enumerate(pieces):
        piece = piece.strip("\n")
        if piece:
            parts.append({"type": "text", "text": piece})
        if i < len(pieces) - 1:
            if not images:
                raise ConfigError("the prompt has more <image> markers than images")
            parts.append({"type": "image_url", "image_url": {"url": data_url(images.pop(0))}})
    return parts


def openai_messages(request: Request) -> list[dict]:
    images = list(request.images)
    messages = [{"role": m["role"], "content": content_parts(m["content"], images)} for m in request.messages]
    if images:
        raise ConfigError(f"{len(images)} images more than <image> markers in the prompt")
    return messages


def completions_url(url: str) -> str:
    """Accept a base URL (`http://host:8000/v1`) or the full chat completions URL."""
    url = url.rstrip("/")
    return url if url.endswith("/chat/completions") else f"{url}/chat/completions"


class EndpointBackend(Backend):
    def __init__(
        self,
        url: str,
        model: str,
        *,
        api_key: str | None = None,
        image_position: ImagePosition = "before",
        concurrency: int = 8,
        timeout: float = 120.0,
        retries: int = 3,
    ) -> None:
        import httpx

        if not url.startswith(("http://", "https://")):
            raise ConfigError(
                f"--endpoint must be an http(s) URL such as http://127.0.0.1:8000/v1, got {url!r}"
            )
        self.url, self.model, self.image_position = completions_url(url), model, image_position
        self.retries = retries
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.client = httpx.Client(headers=headers, timeout=timeout)
        self.pool = ThreadPoolExecutor(max_workers=max(concurrency, 1))

    def generate(self, requests: Sequence[Request], max_new_tokens: int) -> list[str]:
        return list(self.pool.map(lambda r: self._complete(r, max_new_tokens), requests))

    def _complete(self, request: Request, max_new_tokens: int) -> str:
        import httpx

        body = {
            "model": self.model,
            "messages": openai_messages(request),
            "temperature": 0,
            "max_tokens": max_new_tokens,
        }
        for attempt in range(self.retries + 1):
            try:
                response = self.client.post(self.url, json=body)
            except httpx.TransportError as err:
                if attempt == self.retries:
                    raise EndpointError(f"cannot reach {self.url}: {err}") from err
            else:
                if response.status_code not in _RETRY_STATUS or attempt == self.retries:
                    return self._answer(response)
            time.sleep(0.5 * 2**attempt)
        raise AssertionError("unreachable")

    def _answer(self, response) -> str:
        try:
            payload = response.json()
        except ValueError:
            payload = None
        if response.status_code != 200:
            message = payload.get("error", {}).get("message") if isinstance(payload, dict) else response.text
            raise EndpointError(f"{self.url} answered {response.status_code}: {message}")
        try:
            return (payload["choices"][0]["message"]["content"] or "").strip()
        except (TypeError, KeyError, IndexError) as err:
            raise EndpointError(f"{self.url}: not an OpenAI chat completion: {str(payload)[:200]}") from err

    def describe(self) -> dict[str, Any]:
        return {
            "backend": "endpoint",
            "name": self.model,
            "url": self.url,
            "image_position": self.image_position,
        }

    def close(self) -> None:
        self.pool.shutdown(wait=False)
        self.client.close()
