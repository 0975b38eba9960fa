"""Assemble and run the server: load the checkpoint, size the context, build engine + app, run uvicorn."""

from __future__ import annotations

import copy
import signal
import threading
from pathlib import Path

import torch
from fastapi import FastAPI

from vlbridge.checkpoint import resolve_checkpoint
from vlbridge.errors import ConfigError
from vlbridge.factory import load_pretrained
from vlbridge.modeling import text_config_of
from vlbridge.processing import VLProcessor

from .app import create_app
from .config import ServerConfig
from .engine import Engine
from .media import ImageLoader
from .prompts import PromptBuilder


def pick_device(requested: str) -> str:
    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if requested.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"--device {requested}: CUDA is not available on this machine; use cpu or auto")
    return requested


def context_length(model, requested: int | None) -> int:
    """Tokens a prompt plus its completion may span: --max-model-len, else (as vLLM does) the LLM's position
    limit; a checkpoint whose LLM states none falls back to its training max_length."""
    limit = getattr(text_config_of(model.language_model), "max_position_embeddings", None)
    if requested is not None and limit is not None and requested > limit:
        raise ConfigError(
            f"--max-model-len {requested} is over the LLM's max_position_embeddings ({limit}); "
            "use at most that"
        )
    return requested or limit or model.config.max_length


def build_app(config: ServerConfig) -> FastAPI:
    model, loaded = load_pretrained(
        resolve_checkpoint(config.checkpoint),
        device=pick_device(config.device),
        reducers=config.reducers or None,
    )
    tokenizer = loaded.tokenizer
    length = context_length(model, config.max_model_len)
    # Prompts are tokenized in request threads with a tokenizer of their own: the engine's thread decodes
    # with `tokenizer` meanwhile, and a Rust tokenizer must not be reconfigured while another thread uses it.
    processor = VLProcessor.from_config(model.config, copy.deepcopy(tokenizer), max_length=length)
    engine = Engine(
        model,
        tokenizer,
        context_length=length,
        max_batch_size=config.max_batch_size,
        batching=config.batching,
        batch_window_s=config.batch_window_ms / 1000,
        max_queue=config.max_queue,
        encoder_cache_mb=config.encoder_cache_mb,
        prefix_cache_mb=config.prefix_cache_mb,
        compile=config.compile,
        prepack=config.prepack,
    )
    builder = PromptBuilder(
        processor,
        ImageLoader(config.media),
        image_position=model.config.image_position,
        context_length=length,
        max_images=config.media.max_images,
    )
    name = config.model_name or Path(config.checkpoint).resolve().name
    return create_app(engine, builder, config, name)


def run(config: ServerConfig) -> None:
    """Serve until Ctrl-C or SIGTERM: HTTP on a thread of its own, the engine on the main thread
    (Engine.run_beside says why)."""
    import uvicorn

    app = build_app(config)
    engine: Engine = app.state.engine
    server = uvicorn.Server(
        uvicorn.Config(app, host=config.host, port=config.port, log_level="info", timeout_graceful_shutdown=5)
    )

    def serve_http() -> None:
        try:
            server.run()  # its lifespan starts and stops the engine
        finally:
            engine.stop()  # also when it could not start (a port in use)

    print(f"vlbridge serve: http://{config.host}:{config.port}/ (OpenAI API under /v1)", flush=True)
    # uvicorn's graceful shutdown, which it only sets up itself on the main thread
    previous = {sig: signal.signal(sig, server.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        http = threading.Thread(target=serve_http, name="vlbridge-http")
        engine.run_beside(http)
        http.join(timeout=30)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if not server.started:
        raise ConfigError(f"could not listen on {config.host}:{config.port} (the log above says why)")
