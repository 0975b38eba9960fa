"""The generation engine: one worker thread decodes every running request together, step by step.

Continuous batching: between two decode steps, newly arrived requests are prefilled as one batch and
their KV cache rows join the running batch (kvcache.KVBatch); finished or abandoned rows leave it.
Each row keeps its own sampling parameters, random generator, stop strings and token budget, and its
text is handed to the request as soon as it is safe to show, so streaming works while batching.
Models whose batches keep per-row state (`VLModel.keeps_batch_state`: a deep-fusion front-end's visual
memory, in-LLM reducers' per-layer caches) run in static batches: a batch admits no one until all its
rows are done.

Multi-turn reuse: an image seen before is not encoded again (encoder_cache.py), and a prompt that starts
as a finished request's prompt and answer did (the next turn of a chat) runs only the rest, on a copy of
that KV (prefix_cache.py), alone, before joining the batch. Models for which either would change the
answer run without it (`reuse()` says why).
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from transformers import DynamicCache

from vlbridge.errors import VLBridgeError
from vlbridge.llm_calls import key_bias_kwargs, with_cache
from vlbridge.processing import Encoded, pad_batch
from vlbridge.reducers.size_bias import weighs_keys
from vlbridge.tokenization import generation_kwargs

from . import compiled_decode, encoder_cache, prefix_cache
from .compiled_decode import BatchOneDecode
from .encoder_cache import EncoderCache
from .errors import APIError
from .kvcache import KVBatch
from .linear import serving_linears
from .prefix_cache import Hit, PrefixCache
from .prompt_keys import PromptKey
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
    """One choice of one request inside the running batch; `key` identifies its prompt for reuse (None:
    the engine reuses nothing)."""

    def __init__(self, request: Request, choice: int, engine: Engine, key: PromptKey | None) -> None:
        self.request = request
        self.choice = choice
        self.key = key
        self.params = request.params
        self.generator = row_generator(request.params.seed, choice, engine.device)
        self.text = TextStream(engine.decode, request.params.stop)
        self.generated: list[int] = []
        self.done = False
        self.engine = engine

    def prompt_part(self, start: int) -> tuple[Encoded, list[int]]:
        """The prompt from token `start` on, and its images' digests."""
        return self.key.tail(start) if self.key is not None else (self.request.prompt.encoded, [])

    def accept(self, token: int, logits: torch.Tensor) -> None:
        """Take the sampled token, emit the text it makes safe to show, and finish when due."""
        engine, params = self.engine, self.params
        self.generated.append(token)
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
                len(self.generated) >= params.max_tokens
                or self.request.prompt.tokens + len(self.generated) >= engine.context_length
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
        encoder_cache_mb: float = 256,
        prefix_cache_mb: float = 1024,
        compile: bool = False,
        prepack: bool = True,
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
        self._off = {
            "encoder_cache": _reason_off(
                encoder_cache_mb, "--encoder-cache-mb", encoder_cache.refusal(model)
            ),
            "prefix_cache": _reason_off(prefix_cache_mb, "--prefix-cache-mb", prefix_cache.refusal(model)),
        }
        self.encoder_cache = (
            None if self._off["encoder_cache"] else EncoderCache(model, _mib(encoder_cache_mb))
        )
        self.prefix_cache = None if self._off["prefix_cache"] else PrefixCache(_mib(prefix_cache_mb))
        # The LLM's linear layers as serve/linear.py's: products on weights packed once (eager steps and
        # prefill on a CPU), one-row products the compiled step fuses.
        self.prepacked_mb = serving_linears(self.lm, pack=prepack)
        if self.prepacked_mb:
            log.info("prepacked the LLM's linear weights for oneDNN: %.0f MB more memory", self.prepacked_mb)
        refused = compiled_decode.refusal(model) if compile else None
        if refused:
            log.warning("--compile: off for this model, because %s", refused)
        # Batch-1 decode steps compiled (--compile), on the engine's thread when it starts.
        self.batch_one = BatchOneDecode(self.lm) if compile and not refused else None
        self._tuned = threading.Event()
        self._hosted = False  # run_beside: the worker is the main thread
        self._waiting: collections.deque[Request] = collections.deque()
        self._cond = threading.Condition()
        self._rows: list[Row] = []
        self._kv: KVBatch | None = None
        self._last: torch.Tensor | None = None  # [B] the token each row feeds next
        self._stopping = False
        self._thread: threading.Thread | None = None

    # -- lifecycle ---------------------------------------------------------------------------------
    def start(self) -> Engine:
        """Start the worker on a thread of its own (unless `run_beside` has it on the main thread); with
        --compile, return once it has compiled the batch-1 step."""
        if not self._hosted:
            self._stopping = False
            self._thread = threading.Thread(target=self._run, name="vlbridge-engine", daemon=True)
            self._thread.start()
        if self.batch_one is not None:
            self._tuned.wait()
        return self

    def run_beside(self, other: threading.Thread) -> None:
        """Be the worker on this (the main) thread, with `other` started beside it, until `stop`. Torch's
        OpenMP parallel regions cost far more when another thread starts them (measured on 2 cores: a
        200k-element add 8 us from the main thread, 55 us from any other; a batch-16 decode step of the
        mid model 46 vs 54 ms), so `vlbridge serve` decodes here and answers HTTP beside it (16 text
        clients: 17-18 % more tokens/s, two runs each way)."""
        self._hosted, self._stopping = True, False
        other.start()
        self._run()

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

    def reuse(self) -> dict[str, dict[str, Any]]:
        """Each reuse cache's counters, or why it is off."""
        caches = {"encoder_cache": self.encoder_cache, "prefix_cache": self.prefix_cache}
        return {
            name: {"enabled": True, **cache.summary()}
            if cache is not None
            else {"enabled": False, "reason": self._off[name]}
            for name, cache in caches.items()
        }

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
            if self.batch_one is not None and not self._tuned.is_set():
                self._warm_up()
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
        """Prefill the new requests, sample their first tokens, join the batch. Requests continuing a cached
        prefix run on a copy of it, together only with those continuing the same prefix by as many tokens
        (nothing to pad); the others run as one left-padded batch."""
        cold: list[Row] = []
        warm: dict[tuple[int, int, int], tuple[Hit, list[Row]]] = {}
        for request in requests:
            try:
                key = self._key(request.prompt)
            except VLBridgeError as err:  # its images do not fill its placeholders
                self._fail([request], err)
                continue
            rows = [Row(request, i, self, key) for i in range(request.n)]
            hit = self.prefix_cache.lookup(key) if self.prefix_cache is not None else None
            if hit is None:
                cold += rows
            else:
                warm.setdefault((id(hit.kv), hit.tokens, len(key.tokens)), (hit, []))[1].extend(rows)
        for hit, rows in warm.values():
            self._prefill_rows(rows, hit)
        if cold:
            self._prefill_rows(cold, None)

    def _key(self, prompt: Prompt) -> PromptKey | None:
        if self.encoder_cache is None and self.prefix_cache is None:
            return None
        return PromptKey.of(prompt.encoded, self.model.frontend.layout, self.model.frontend.image_token_id)

    def _prefill_rows(self, rows: list[Row], hit: Hit | None) -> None:
        """Prefill `rows` together (on `hit`'s cached prefix, when given) and add them to the batch."""
        requests = list(dict.fromkeys(row.request for row in rows))
        try:
            logits, kv = self._forward_rows(rows, hit)
        except Exception as err:
            if len(requests) > 1:  # find the culprit: the others must not fail with it
                for request in requests:
                    self._prefill_rows([row for row in rows if row.request is request], hit)
                return
            self._fail(requests, err)
            return
        self.stats.requests += len(requests)
        self.stats.prefills += 1
        self.stats.prefill_rows += len(rows)
        tokens, finished = self._advance(rows, logits)
        self._keep_prefixes(rows, kv, finished)
        if self._kv is None:
            self._rows, self._kv, self._last = rows, kv, tokens
        else:
            self._rows += rows
            self._kv = self._kv.merge(kv)
            self._last = torch.cat([self._last, tokens])
        self._drop_finished()

    def _forward_rows(self, rows: list[Row], hit: Hit | None) -> tuple[torch.Tensor, KVBatch]:
        """The rows' prompts from scratch, or (`hit`) what follows the cached prefix they all share."""
        if hit is None:
            return self._forward_prompts([row.prompt_part(0) for row in rows])
        key, start = rows[0].key, hit.tokens
        past = hit.kv.prefix(start, len(rows), self.model.position_after(start, key.images_before(start)))
        return self._forward_prompts([row.prompt_part(start) for row in rows], past)

    def _forward_prompts(
        self, prompts: list[tuple[Encoded, list[int]]], past: KVBatch | None = None
    ) -> tuple[torch.Tensor, KVBatch]:
        """Run (prompt, image digests) pairs as one left-padded batch, on an empty cache or on `past` (the KV
        of what precedes each; then no prompt is padded); the last logits [B, V] and the KV of all."""
        batch = pad_batch([p for p, _ in prompts], self.pad_id, self.model.frontend.layout, side="left")
        ids, mask = batch["input_ids"].to(self.device), batch["attention_mask"].to(self.device)
        pixels = batch["pixel_values"]
        if isinstance(pixels, torch.Tensor):
            pixels = pixels.to(self.device)
        inputs = self.model.llm_inputs(ids, mask, pixels, self._image_features(prompts))
        if inputs.position_ids is None:  # left padding: each row counts its own real tokens
            inputs.position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
        cache = DynamicCache()
        if past is not None:
            cache = past.cache
            inputs.position_ids = inputs.position_ids + (past.mask.sum(-1) + past.shift)[:, None]
            inputs.attention_mask, inputs.key_bias = past.continued(mask, inputs.key_bias)
        out = self.lm(**with_cache(self.lm, cache, **inputs.kwargs()), use_cache=True, logits_to_keep=1)
        mask = inputs.attention_mask
        shift = inputs.position_ids[:, -1] - (mask.sum(-1) - 1)
        return out.logits[:, -1], KVBatch(cache, mask, shift, inputs.key_bias, inputs.frontend_kwargs)

    def _image_features(self, prompts: list[tuple[Encoded, list[int]]]) -> torch.Tensor | None:
        """The prompts' image features from the encoder cache (None: the front-end encodes them itself)."""
        digests = [d for _, ds in prompts for d in ds]
        if self.encoder_cache is None or not digests:
            return None
        return self.encoder_cache.features([p for e, _ in prompts for p in e.pixel_values], digests)

    def _step(self) -> None:
        """One decode step for every running row."""
        logits = self._decode(self._kv, self._last)
        live = sum(not r.done for r in self._rows)
        self.stats.decode_steps += 1
        self.stats.decode_rows += live
        self.stats.max_batch = max(self.stats.max_batch, live)
        self.stats.batch_sizes[live] += 1
        self._last, finished = self._advance(self._rows, logits)
        self._keep_prefixes(self._rows, self._kv, finished)
        self._drop_finished()

    def _decode(self, kv: KVBatch, tokens: torch.Tensor) -> torch.Tensor:
        """Feed each row its next token [B] on `kv` (which grows by it); the next logits [B, V]."""
        forward = self.lm
        if self.batch_one is not None and len(tokens) == 1:
            forward, kv = self.batch_one, kv.contiguous()
        mask, positions = kv.step_inputs()
        out = forward(
            **with_cache(self.lm, kv.cache, input_ids=tokens[:, None], attention_mask=mask),
            position_ids=positions,
            **key_bias_kwargs(kv.bias),
            **kv.call_kwargs,
            use_cache=True,
        )
        return out.logits[:, -1]

    def _warm_up(self) -> None:
        """Compile the batch-1 decode step here, on the engine's thread where it will run, on throwaway
        rows (BatchOneDecode.warm_up). A size-bias model's image requests carry a key bias, a graph of
        their own: a second row with a bias compiles it too."""
        try:
            ids = [self.pad_id] * 4
            rows = [self._forward_prompts([(Encoded(ids, ids), [])]) for _ in range(1 + weighs_keys(self.lm))]
            for _, kv in rows[1:]:
                kv.bias = torch.zeros(kv.mask.shape, device=self.device)
            if not self.batch_one.warm_up(rows, self._decode):
                self.batch_one = None
        finally:
            self._tuned.set()

    def _advance(self, rows: list[Row], logits: torch.Tensor) -> tuple[torch.Tensor, list[int]]:
        """Sample each live row's next token from logits [B, V]; returns the tokens to feed next [B] and
        the rows that finished now."""
        logits = logits.float()
        if self.banned:
            logits[:, self.banned] = float("-inf")
        argmax = logits.argmax(-1).tolist()
        tokens, finished = [], []
        for i, row in enumerate(rows):
            if row.done or row.request.cancelled:
                if not row.done:
                    finished.append(i)
                row.done = True
                tokens.append(self.pad_id)
                continue
            token = argmax[i] if row.params.greedy else pick_token(logits[i], row.params, row.generator)
            row.accept(token, logits[i])
            self.stats.tokens += 1
            tokens.append(token)
            if row.done:
                finished.append(i)
        return torch.tensor(tokens, dtype=torch.long, device=self.device), finished

    def _keep_prefixes(self, rows: list[Row], kv: KVBatch, finished: list[int]) -> None:
        """Cache the KV of the rows that finished now: their prompt and every answer token fed so far (the
        last one sampled never is)."""
        if self.prefix_cache is None:
            return
        for i in finished:
            row = kv.row(i)
            tokens = np.concatenate([rows[i].key.tokens, np.asarray(rows[i].generated, dtype=np.int64)])
            self.prefix_cache.keep(tokens[: row.mask.shape[1]], row)

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


def _mib(megabytes: float) -> int:
    return int(megabytes * 2**20)


def _reason_off(megabytes: float, flag: str, refusal: str | None) -> str | None:
    """Why a reuse cache is off (None: it is on); a model's refusal is logged once."""
    if megabytes <= 0:
        return f"{flag} is 0"
    if refusal is not None:
        log.warning(
            "%s: off for this model, because %s", flag.removeprefix("--").removesuffix("-mb"), refusal
        )
    return refusal
