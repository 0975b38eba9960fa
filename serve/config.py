"""ServerConfig: every knob of `vlbridge serve`, typed and validated where it enters (CLI or code)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator

from vlbridge.config import Strict


class MediaConfig(Strict):
    """How images in requests are loaded: limits for inline data and the remote-URL policy."""

    allow_remote: bool = False  # http(s) image URLs; off by default, data: URLs always work
    allowed_domains: list[str] = Field(default_factory=list)  # empty: any public host (when remote is on)
    timeout_s: float = Field(default=10.0, gt=0)
    max_bytes: int = Field(default=20 * 1024 * 1024, ge=1024)  # encoded image size, inline or fetched
    max_pixels: int = Field(default=4096 * 4096, ge=1)  # width x height, checked before decoding
    max_images: int = Field(default=8, ge=0)  # per request, across all messages
    max_redirects: int = Field(default=3, ge=0)

    @field_validator("allowed_domains")
    @classmethod
    def _normalise_domains(cls, domains: list[str]) -> list[str]:
        return [d.strip().lower().strip(".") for d in domains if d.strip()]


class ServerConfig(Strict):
    """The server: which model, where it listens, who may call it, and how requests are batched."""

    checkpoint: str
    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=0, le=65535)
    api_key: str | None = None
    model_name: str | None = None  # the id clients send as `model`; default: the checkpoint's folder name
    device: str = "auto"  # auto: cuda when available, else cpu
    reducers: list[dict[str, Any]] = Field(default_factory=list)  # added to the checkpoint's own
    # Batching: continuous (rows join and leave a running batch every step), static (a batch runs until
    # all its rows finish; used for models with in-layer hooks, whose per-batch state cannot be
    # re-sliced), or auto (continuous unless the model has such hooks). max_batch_size 1 = one at a time.
    batching: Literal["auto", "continuous", "static"] = "auto"
    max_batch_size: int = Field(default=32, ge=1)
    batch_window_ms: float = Field(default=2.0, ge=0)  # wait this long after an idle arrival for company
    max_queue: int = Field(default=1024, ge=1)  # waiting requests beyond this get 503
    max_model_len: int | None = Field(default=None, ge=8)  # default: the LLM's max_position_embeddings
    default_max_tokens: int = Field(default=256, ge=1)
    max_n: int = Field(default=8, ge=1)
    # Multi-turn reuse (0: off): the features of images seen before, and the KV of finished requests'
    # prompts and answers, whose next turns then prefill only what is new.
    encoder_cache_mb: float = Field(default=256, ge=0)
    prefix_cache_mb: float = Field(default=1024, ge=0)
    # Batch-1 decode steps compiled with torch.compile (serve/compiled_decode.py): about twice as fast on a
    # CPU, at the cost of compiling at start (a minute the first time, seconds once torch has cached it).
    compile: bool = False
    # CPU: linear products on a copy of the LLM's float32 weights packed once for oneDNN (serve/linear.py):
    # batched decode steps about 1.7x as fast, at the cost of that copy's memory.
    prepack: bool = True
    max_request_bytes: int = Field(default=64 * 1024 * 1024, ge=1024)
    media: MediaConfig = Field(default_factory=MediaConfig)
