"""FastAPI routes of the OpenAI-compatible server; every error leaves in OpenAI's JSON shape.

GET /health, GET /v1/models, POST /v1/chat/completions (plain or SSE streaming), GET /stats (engine
counters), and the chat page at /. The body of a chat request is read and parsed here (not by
FastAPI) so that size limits, malformed JSON and schema errors all become 4xx answers that say what
was wrong; model work happens on the engine's thread, image decoding in a thread pool.
"""

from __future__ import annotations

import hmac
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from fastapi.staticfiles import StaticFiles
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from vlbridge.errors import VLBridgeError

from .admission import SmallFirst
from .config import ServerConfig
from .engine import Engine, Event
from .errors import APIError, bad_request, error_body
from .generation import Generation
from .prompts import Prompt, PromptBuilder
from .protocol import ChatCompletionRequest, ModelCard, ModelList, completion_id, now
from .request_body import Limits, check_prefix, invalid, parse_body
from .sampling import SamplingParams

STATIC = Path(__file__).parent / "static"


def create_app(engine: Engine, builder: PromptBuilder, config: ServerConfig, model_name: str) -> FastAPI:
    """The ASGI app; starts the engine's worker on startup and stops it on shutdown."""

    @asynccontextmanager
    async def lifespan(_: FastAPI):
        engine.start()
        yield
        engine.stop()

    app = FastAPI(title="vlbridge", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.engine = engine
    _install_error_handlers(app)
    auth = Depends(_authenticator(config.api_key))
    limits = Limits(max_image_bytes=config.media.max_bytes, max_text_bytes=builder.max_text_bytes)
    admission = SmallFirst()
    created = now()

    @app.get("/", include_in_schema=False)
    async def index() -> FileResponse:
        return FileResponse(STATIC / "index.html")

    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "model": model_name}

    @app.get("/v1/models", dependencies=[auth])
    async def models() -> dict[str, Any]:
        card = ModelCard(id=model_name, created=created, max_model_len=engine.context_length)
        return ModelList(data=[card]).model_dump()

    @app.get("/stats", dependencies=[auth])
    async def stats() -> dict[str, Any]:
        return {
            "mode": engine.mode,
            "max_batch_size": engine.max_batch_size,
            **engine.load(),
            **engine.stats.as_dict(),
            "reuse": engine.reuse(),
            "prepacked_mb": round(engine.prepacked_mb, 1),
        }

    @app.post("/v1/chat/completions", dependencies=[auth])
    async def chat_completions(request: Request):
        if admission.is_large(request.headers.get("content-length", "")):
            async with admission.large():
                raw = await _read(request, config.max_request_bytes, limits, admission.yield_to_small)
                body = parse_body(raw, limits)
            return await _answer(body)
        with admission.small():
            body = parse_body(await _read(request, config.max_request_bytes, limits), limits)
            return await _answer(body)

    async def _answer(body: ChatCompletionRequest):
        if body.model is not None and body.model != model_name:
            raise APIError(
                404,
                f"the model {body.model!r} does not exist here; this server serves {model_name!r} "
                "(see GET /v1/models)",
                param="model",
                code="model_not_found",
            )
        if body.n > config.max_n:
            raise bad_request(f"n={body.n} is over this server's limit of {config.max_n}", "n")
        prompt = await run_in_threadpool(builder.build, body.messages)
        params = _sampling_params(body, prompt, engine.context_length, config.default_max_tokens)
        generation = Generation(engine, prompt, params, body.n)
        reply = _Reply(body, prompt, model_name)
        if body.stream:
            return await _stream(generation, reply)
        return await _complete(generation, reply)

    return app


# -- requests ---------------------------------------------------------------------------------------------
async def _read(request: Request, limit: int, limits: Limits, between_chunks=None) -> bytearray:
    """The body, checked as it arrives. Once it proves too large, the rest is read and dropped (unchecked,
    unstored, still after small requests) before the refusal goes out."""
    declared = request.headers.get("content-length", "")
    refusal = _too_large(limit) if declared.isdigit() and int(declared) > limit else None
    raw, check_at = bytearray(), limits.max_text_bytes
    async for chunk in request.stream():
        if refusal is None:
            raw += chunk
            try:
                if len(raw) > limit:
                    raise _too_large(limit)
                if len(raw) > check_at:  # past what any text may take: is it images, or one to refuse?
                    check_prefix(raw, limits)
                    check_at = len(raw) + 1024 * 1024
            except APIError as err:
                refusal, raw = err, bytearray()
        if between_chunks is not None:
            await between_chunks()
    if refusal is not None:
        raise refusal
    return raw


def _too_large(limit: int) -> APIError:
    return APIError(413, f"the request body is over this server's limit of {limit:,} bytes")


def _authenticator(api_key: str | None):
    async def check(request: Request) -> None:
        if api_key is None:
            return
        header = request.headers.get("authorization")
        if not header:
            raise APIError(
                401,
                "missing API key: send it as 'Authorization: Bearer <key>'",
                code="invalid_api_key",
            )
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), api_key.encode()):
            raise APIError(401, "invalid API key", code="invalid_api_key")

    return check


def _sampling_params(
    body: ChatCompletionRequest, prompt: Prompt, context_length: int, default_max: int
) -> SamplingParams:
    room = context_length - prompt.tokens
    asked = body.token_limit
    if asked is not None and asked > room:
        field = "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens"
        raise bad_request(
            f"{field}={asked} plus the prompt's {prompt.tokens} tokens exceeds this model's context length "
            f"of {context_length} tokens; ask for at most {room}",
            field,
            "context_length_exceeded",
        )
    return SamplingParams(
        max_tokens=asked if asked is not None else min(default_max, room),
        temperature=body.temperature,
        top_p=body.top_p,
        stop=body.stop,
        seed=body.seed,
        logprobs=body.logprobs,
        top_logprobs=body.top_logprobs or 0,
        ignore_eos=body.ignore_eos,
    )


# -- responses --------------------------------------------------------------------------------------------
class _Reply:
    """What every response and chunk of one request shares."""

    def __init__(self, body: ChatCompletionRequest, prompt: Prompt, model: str) -> None:
        self.id, self.created, self.model = completion_id(), now(), model
        self.n, self.logprobs, self.include_usage = body.n, body.logprobs, body.include_usage
        self.prompt_tokens = prompt.tokens
        self.completion_tokens = 0

    def usage(self) -> dict[str, int]:
        total = self.prompt_tokens + self.completion_tokens
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": total,
        }

    def head(self, kind: str) -> dict[str, Any]:
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model}

    def chunk(self, choices: list[dict[str, Any]], usage: dict[str, int] | None = None) -> str:
        payload = {**self.head("chat.completion.chunk"), "system_fingerprint": None, "choices": choices}
        if self.include_usage:
            payload["usage"] = usage
        return f"data: {json.dumps(payload)}\n\n"

    def choice_chunks(self, event: Event) -> list[str]:
        self.completion_tokens += event.tokens
        chunks = []
        if event.text or event.logprobs:
            logprobs = {"content": event.logprobs} if self.logprobs else None
            delta = {"content": event.text}
            chunks.append(self.chunk([_chunk_choice(event.choice, delta, None, logprobs)]))
        if event.finish_reason is not None:
            chunks.append(self.chunk([_chunk_choice(event.choice, {}, event.finish_reason, None)]))
        return chunks


def _chunk_choice(index: int, delta: dict, finish: str | None, logprobs: dict | None) -> dict[str, Any]:
    return {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}


async def _complete(generation: Generation, reply: _Reply) -> dict[str, Any]:
    texts, reasons = [""] * reply.n, [None] * reply.n
    logprobs: list[list[dict]] = [[] for _ in range(reply.n)]
    try:
        async for event in generation.events():
            texts[event.choice] += event.text
            logprobs[event.choice] += event.logprobs
            reasons[event.choice] = event.finish_reason or reasons[event.choice]
            reply.completion_tokens += event.tokens
    except Exception as err:
        raise _as_api_error(err) from err
    finally:
        generation.cancel()  # a no-op once every choice finished; stops the rows if the client left
    choices = [
        {
            "index": i,
            "message": {"role": "assistant", "content": texts[i]},
            "logprobs": {"content": logprobs[i]} if reply.logprobs else None,
            "finish_reason": reasons[i],
        }
        for i in range(reply.n)
    ]
    return {
        **reply.head("chat.completion"),
        "system_fingerprint": None,
        "choices": choices,
        "usage": reply.usage(),
    }


async def _stream(generation: Generation, reply: _Reply) -> StreamingResponse:
    bursts = generation.bursts()
    try:  # wait for the first token before sending headers, so a failed prefill is still a 4xx/5xx
        first = await anext(bursts)
    except Exception as err:
        generation.cancel()
        raise _as_api_error(err) from err

    async def sse() -> AsyncIterator[str]:
        try:
            roles = [
                _chunk_choice(i, {"role": "assistant", "content": ""}, None, None) for i in range(reply.n)
            ]
            yield "".join(reply.chunk([role]) for role in roles)
            yield "".join(chunk for event in first for chunk in reply.choice_chunks(event))
            async for burst in bursts:  # whatever arrived together leaves in one write
                yield "".join(chunk for event in burst for chunk in reply.choice_chunks(event))
            if reply.include_usage:
                yield reply.chunk([], reply.usage())
        except Exception as err:  # headers are gone: report in-band, as OpenAI does
            api_error = _as_api_error(err)
            yield f"data: {json.dumps(api_error.body())}\n\n"
        finally:
            generation.cancel()
        yield "data: [DONE]\n\n"

    headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    return StreamingResponse(sse(), media_type="text/event-stream", headers=headers)


# -- errors -----------------------------------------------------------------------------------------------
def _as_api_error(err: Exception) -> APIError:
    if isinstance(err, APIError):
        return err
    if isinstance(err, VLBridgeError):
        return bad_request(str(err))
    return APIError(500, f"generation failed: {type(err).__name__}: {err}", type="server_error")


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def api_error(_: Request, err: APIError) -> JSONResponse:
        return JSONResponse(err.body(), status_code=err.status)

    @app.exception_handler(RequestValidationError)
    async def validation_error(_: Request, err: RequestValidationError) -> JSONResponse:
        api = invalid(list(err.errors()))
        return JSONResponse(api.body(), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, err: StarletteHTTPException) -> JSONResponse:
        messages = {
            404: f"no such endpoint: {request.method} {request.url.path}; this server has GET /health, "
            "GET /v1/models, POST /v1/chat/completions, GET /stats and the chat page at /",
            405: f"method {request.method} is not allowed on {request.url.path}",
        }
        message = messages.get(err.status_code, str(err.detail))
        code = {404: "not_found", 405: "method_not_allowed"}.get(err.status_code)
        return JSONResponse(
            error_body(message, code=code), status_code=err.status_code, headers=getattr(err, "headers", None)
        )

    @app.exception_handler(Exception)
    async def server_error(_: Request, err: Exception) -> JSONResponse:
        return JSONResponse(
            error_body(f"internal server error: {type(err).__name__}", "server_error"), status_code=500
        )
