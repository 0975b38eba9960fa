"""The asyncio side of the engine: a request's events cross from the worker thread to the event loop.

The engine (engine.py) decodes on its own thread; each request hands its events to a callback.
`Generation` turns that callback into an async iterator for the HTTP handlers and the load tools.
"""

from __future__ import annotations

import asyncio
import threading
import weakref

from .engine import Engine, Event, Request
from .prompts import Prompt
from .sampling import SamplingParams


class _Mailbox:
    """Hands events from the worker thread to one event loop, waking it once per burst rather than once
    per event: with many streams, per-event wake-ups cost more than the decoding of tiny models."""

    _boxes: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.lock = threading.Lock()
        self.posts: list[tuple[asyncio.Queue, Event]] = []

    @classmethod
    def of(cls, loop: asyncio.AbstractEventLoop) -> _Mailbox:
        if loop not in cls._boxes:
            cls._boxes[loop] = cls(loop)
        return cls._boxes[loop]

    def post(self, queue: asyncio.Queue, event: Event) -> None:
        with self.lock:
            self.posts.append((queue, event))
            wake = len(self.posts) == 1
        if wake:
            self.loop.call_soon_threadsafe(self._deliver)

    def _deliver(self) -> None:
        with self.lock:
            posts, self.posts = self.posts, []
        for queue, event in posts:
            queue.put_nowait(event)


class Generation:
    """The asyncio side of one request: events arrive from the worker thread through a queue."""

    def __init__(self, engine: Engine, prompt: Prompt, params: SamplingParams, n: int) -> None:
        mailbox = _Mailbox.of(asyncio.get_running_loop())
        self.queue: asyncio.Queue[Event] = asyncio.Queue()
        queue = self.queue
        self.request = Request(prompt, params, n, lambda event: mailbox.post(queue, event))
        self.n = n
        engine.submit(self.request)

    def cancel(self) -> None:
        self.request.cancelled = True

    async def events(self):
        """Every event until each of the n choices has finished; raises the error of a failed request."""
        async for burst in self.bursts():
            for event in burst:
                yield event

    async def bursts(self):
        """Events in bursts: all that have arrived by the time the caller asks (at least one)."""
        open_choices = self.n
        while open_choices:
            burst = [await self.queue.get()]
            while not self.queue.empty():
                burst.append(self.queue.get_nowait())
            for event in burst:
                if event.error is not None:
                    raise event.error
                open_choices -= event.finish_reason is not None
            yield burst
