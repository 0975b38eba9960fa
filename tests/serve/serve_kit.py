"""Helpers for the serve tests: a live uvicorn server on a free loopback port, request builders.

The server runs in a background thread of the test process (its model work on the engine's own
thread), so tests talk to it over real HTTP with real clients, and can read its engine's counters.
"""

from __future__ import annotations

import base64
import io
import socket
import threading
import time
from pathlib import Path

import httpx
import uvicorn
from PIL import Image

from vlbridge.serve.config import MediaConfig, ServerConfig
from vlbridge.serve.server import build_app

API_KEY = "test-key"


class LiveServer:
    """uvicorn serving `build_app(config)` in a thread, on a socket bound before the thread starts."""

    def __init__(self, config: ServerConfig) -> None:
        self.app = build_app(config)
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.api_key = config.api_key
        uv_config = uvicorn.Config(self.app, log_level="warning", timeout_graceful_shutdown=2)
        self.server = uvicorn.Server(uv_config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self) -> LiveServer:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline and self.thread.is_alive(), "the server did not start"
            time.sleep(0.02)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=15)
        self.sock.close()

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def post(self, body, **kwargs) -> httpx.Response:
        return httpx.post(
            f"{self.url}/v1/chat/completions", json=body, headers=self.headers(), timeout=60, **kwargs
        )

    def stats(self) -> dict:
        return httpx.get(f"{self.url}/stats", headers=self.headers(), timeout=10).json()

    def client(self):
        from openai import OpenAI

        return OpenAI(base_url=f"{self.url}/v1", api_key=self.api_key or "none", max_retries=0, timeout=60)


def server_config(checkpoint: Path, **overrides) -> ServerConfig:
    """The test servers' settings: an API key, at most 3 images of 256x256 pixels; `overrides` win."""
    media = overrides.pop("media", {})
    overrides.setdefault("api_key", API_KEY)
    return ServerConfig(
        checkpoint=str(checkpoint),
        media=MediaConfig(max_images=3, max_pixels=256 * 256, **media),
        **overrides,
    )


def png_bytes(image: Image.Image, fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def data_url(image: Image.Image | bytes, mime: str = "image/png") -> str:
    data = image if isinstance(image, bytes) else png_bytes(image)
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def image_message(text: str, *images) -> dict:
    """A user message with `images` (PIL images or URLs) followed by `text`."""
    parts = [
        {"type": "image_url", "image_url": {"url": im if isinstance(im, str) else data_url(im)}}
        for im in images
    ]
    return {"role": "user", "content": [*parts, {"type": "text", "text": text}]}
