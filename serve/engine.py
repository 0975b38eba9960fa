"""The generation engine: one worker thread decodes every running request together, step by step.

Continuous batching: between two decode steps, newly arrived requests are prefilled as one batch and
their KV cache rows join the running batch (kvcache.KVBatch); finished or abandoned rows leave it.
Each row keeps its own sampling parameters, random generator, stop strings and token budget, and its
text is handed to the request as soon as it is safe to show, so streaming works while batching.
Models whose batches keep per-row state (`VLModel.keeps_batch_state`: a deep-fusion front-end's visual
memory, in-LLM reducers' per-layer caches) run in static batches: a batch admits no one until all its
rows are done.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import DynamicCache

from vlbridge.llm_calls import key_bias_kwargs, with_cache
from vlbridge.processing import pad_batch
from vlbridge.tokenization import generation_kwargs

from .errors import APIError
from .kvcache import KVBatch
from .prompts import Prompt
from .sampling import SamplingParams, pick_token, row_generator, token_logprobs
from .textstream import TextStream

log = logging.getLogger("vlbridge.serve")


@dataclass
class Event:
    """What one step produced for one choice of a request (or why the request failed)."""

    choice: int = 0
    text: str = ""
    tokens: int = 0
    logprobs: list[dict[str, Any]] = field(default_factory=list)
    finish_reason: str | None = None
    error: Exception | None = None


class Overloaded(APIError):
    def __init__(self, waiting: int) -> None:
        super().__init__(
            503, f"the server is overloaded ({waiting} requests waiting); retry later", type="server_error"
        )


@dataclass(eq=False)
class Request:
    """A submitted request: n rows sharing one prompt; events go to `sink` from the worker thread."""

    prompt: Prompt
    params: SamplingParams
    n: int
    sink: Callable[[Event], None]
    cancelled: bool = False


class Row:
    """One choice of one request inside the running batch."""

    def __init__(self, request: Request, choice: int, engine: Engine) -> None:
        self.request = request
        self.choice = choice
        self.params = request.params
        self.generator = row_generator(request.params.seed, choice, engine.device)
        self.text = TextStream(engine.decode, request.params.stop)
        self.generated = 0
        self.done = False
        self.engine = engine

    def accept(self, token: int, logits: torch.Tensor) -> None:
        """Take the sampled token, emit the text it makes safe to show, and finish when due."""
        engine, params = self.engine, self.params
        self.generated += 1
        event = Event(self.choice, tokens=1)
        if params.logprobs:
            event.logprobs.append(engine.logprob_entry(logits, token, params.top_logprobs))
        if token in engine.stop_ids and not params.ignore_eos:
            event.text, event.finish_reason = self.text.finish(), "stop"
        else:
            event.text = self.text.push(token)
            if self.text.stopped:
                event.finish_reason = "stop"
            elif (
                self.generated >= params.max_tokens
                or self.request.prompt.tokens + self.generated >= engine.context_length
            ):
                event.text += self.text.finish()
                event.finish_reason = "length"
        self.done = event.finish_reason is not None
        self.request.sink(event)


@dataclass
class EngineStats:
    """Counters for tests and benchmarks: how much batching really happened."""

    requests: int = 0
    prefills: int = 0
    prefill_rows: int = 0
    decode_steps: int = 0
    decode_rows: int = 0
    max_batch: int = 0
    tokens: int = 0
    failed: int = 0
    batch_sizes: collections.Counter = field(default_factory=collections.Counter)

    def as_dict(self) -> dict[str, Any]:
        return {
            "requests": self.requests,
            "prefills": self.prefills,
            "prefill_rows": self.prefill_rows,
            "decode_steps": self.decode_steps,
            "mean_batch": self.decode_rows / self.decode_steps if self.decode_steps else 0.0,
            "max_batch": self.max_batch,
            "tokens": self.tokens,
            "failed": self.failed,
            "batch_sizes": {str(k): v for k, v in sorted(self.batch_sizes.items())},
        }


class Engine:
    """Batched generation over a VLModel; `submit` is thread-safe, the model runs on one worker thread."""

    def __init__(
        self,
        model,
        tokenizer,
        *,
        context_length: int,
        max_batch_size: int = 32,
        batching: str = "auto",
        batch_window_s: float = 0.002,
        max_queue: int = 1024,
    ) -> None:
        self.model = model
        self.lm = model.language_model
        self.tokenizer = tokenizer
        self.device = model.device
        self.context_length = context_length
        self.max_batch_size = max_batch_size
        self.static = batching == "static" or (batching == "auto" and model.keeps_batch_state)
        self.batch_window_s = batch_window_s
        self.max_queue = max_queue
        gen = generation_kwargs(tokenizer)
        self.stop_ids = set(gen["eos_token_id"])
        self.pad_id = gen["pad_token_id"]
        self.banned = list(model.frontend.special_token_ids)
        self.stats = EngineStats()
        self._waiting: collections.deque[Request] = collections.deque()
        self._cond = threading.Condition()
        self._rows: list[Row] = []
        self._kv: KVBatch | None = None
        self._last: torch.Tensor | None = None  # [B] the token each row feeds next
        self._stopping = False
        self._thread: threading.Thread | None = None

    # -- lifecycle ---------------------------------------------------------------------------------
    def start(self) -> Engine:
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="vlbridge-engine", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=30)

    def submit(self, request: Request) -> None:
        with self._cond:
            if len(self._waiting) >= self.max_queue:
                raise Overloaded(len(self._waiting))
            self._waiting.append(request)
            self._cond.notify_all()

    def load(self) -> dict[str, int]:
        """Rows decoding now and requests waiting to join (a snapshot)."""
        with self._cond:
            return {"running": sum(not r.done for r in self._rows), "waiting": len(self._waiting)}

    @property
    def mode(self) -> str:
        return "static" if self.static else "continuous"

    # -- helpers rows use --------------------------------------------------------------------------
    def decode(self, tokens: list[int]) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=True)

    def logprob_entry(self, logits: torch.Tensor, token: int, top: int) -> dict[str, Any]:
        logprob, best = token_logprobs(logits, token, top)

        def entry(tok: int, lp: float) -> dict[str, Any]:
            text = self.decode([tok])
            return {"token": text, "logprob": lp, "bytes": list(text.encode())}

        return {**entry(token, logprob), "top_logprobs": [entry(t, lp) for t, lp in best]}

    # -- worker ------------------------------------------------------------------------------------
    def _run(self) -> None:
        with torch.inference_mode():
            while True:
                new = self._admit()
                if self._stopping:
                    return
                try:
                    if new:
                        self._prefill(new)
                    if self._rows:
                        self._step()
                except Exception as err:  # never let one bad batch stop the server
                    log.exception("generation step failed")
                    self._fail([*new, *(r.request for r in self._rows)], err)
                    self._rows, self._kv, self._last = [], None, None

    def _admit(self) -> list[Request]:
        """Waiting requests that may join now (blocks while there is nothing to do)."""
        with self._cond:
            while not self._waiting and not self._rows and not self._stopping:
                self._cond.wait()
            if not self._rows and self.batch_window_s > 0:
                deadline = time.monotonic() + self.batch_window_s
                while len(self._waiting) < self.max_batch_size and not self._stopping:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        break
                    self._cond.wait(left)
            if self.static and self._rows:
                return []
            free = self.max_batch_size - len(self._rows)
            taken: list[Request] = []
            while self._waiting:
                request = self._waiting[0]
                rows = sum(r.n for r in taken) + request.n
                if request.cancelled:
                    self._waiting.popleft()
                elif rows <= free or (not self._rows and not taken):
                    taken.append(self._waiting.popleft())
                else:
                    break
            return taken

    def _prefill(self, requests: list[Request]) -> None:
        """Run the new prompts as one left-padded batch, sample their first tokens, join the batch."""
        rows = [Row(req, i, self) for req in requests for i in range(req.n)]
        try:
            logits, kv = self._forward_prompts([row.request.prompt for row in rows])
        except Exception as err:
            if len(requests) > 1:  # find the culprit: the others must not fail with it
                for request in requests:
                    self._prefill([request])
                return
            self._fail(requests, err)
            return
        self.stats.requests += len(requests)
        self.stats.prefills += 1
        self.stats.prefill_rows += len(rows)
        tokens = self._advance(rows, logits)
        if self._kv is None:
            self._rows, self._kv, self._last = rows, kv, tokens
        else:
            self._rows += rows
            self._kv = self._kv.merge(kv)
            self._last = torch.cat([self._last, tokens])
        self._drop_finished()

    def _forward_prompts(self, prompts: list[Prompt]) -> tuple[torch.Tensor, KVBatch]:
        batch = pad_batch([p.encoded for p in prompts], self.pad_id, self.model.frontend.layout, side="left")
        ids, mask = batch["input_ids"].to(self.device), batch["attention_mask"].to(self.device)
        pixels = batch["pixel_values"]
        if isinstance(pixels, torch.Tensor):
            pixels = pixels.to(self.device)
        inputs = self.model.llm_inputs(ids, mask, pixels)
        if inputs.position_ids is None:  # left padding: each row counts its own real tokens
            inputs.position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
        cache = DynamicCache()
        out = self.lm(**with_cache(self.lm, cache, **inputs.kwargs()), use_cache=True, logits_to_keep=1)
        shift = inputs.position_ids[:, -1] - (mask.sum(-1) - 1)
        return out.logits[:, -1], KVBatch(cache, mask, shift, inputs.key_bias, inputs.frontend_kwargs)

    def _step(self) -> None:
        """One decode step for every running row."""
        mask, positions = self._kv.step_inputs()
        out = self.lm(
            **with_cache(self.lm, self._kv.cache, input_ids=self._last[:, None], attention_mask=mask),
            position_ids=positions,
            **key_bias_kwargs(self._kv.bias),
            **self._kv.call_kwargs,
            use_cache=True,
        )
        live = sum(not r.done for r in self._rows)
        self.stats.decode_steps += 1
        self.stats.decode_rows += live
        self.stats.max_batch = max(self.stats.max_batch, live)
        self.stats.batch_sizes[live] += 1
        self._last = self._advance(self._rows, out.logits[:, -1])
        self._drop_finished()

    def _advance(self, rows: list[Row], logits: torch.Tensor) -> torch.Tensor:
        """Sample each live row's next token from logits [B, V]; returns the tokens to feed next [B]."""
        logits = logits.float()
        if self.banned:
            logits[:, self.banned] = float("-inf")
        argmax = logits.argmax(-1).tolist()
        tokens = []
        for i, row in enumerate(rows):
            if row.done or row.request.cancelled:
                row.done = True
                tokens.append(self.pad_id)
                continue
            token = argmax[i] if row.params.greedy else pick_token(logits[i], row.params, row.generator)
            row.accept(token, logits[i])
            self.stats.tokens += 1
            tokens.append(token)
        return torch.tensor(tokens, dtype=torch.long, device=self.device)

    def _drop_finished(self) -> None:
        """Continuous: finished rows leave now. Static: the batch ends when its last row finishes."""
        keep = [i for i, row in enumerate(self._rows) if not row.done]
        if not keep:
            self._rows, self._kv, self._last = [], None, None
        elif not self.static and len(keep) < len(self._rows):
            self._rows = [self._rows[i] for i in keep]
            self._kv = self._kv.select(keep)
            self._last = self._last[keep]

    def _fail(self, requests: list[Request], err: Exception) -> None:
        for request in dict.fromkeys(requests):
            self.stats.failed += 1
            request.sink(Event(error=err))
