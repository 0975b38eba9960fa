"""Small requests first: a flood of huge request bodies must not slow down ordinary chats.

Receiving a body costs the event loop (and the GIL) time in proportion to its size; sixty-four 10 MiB
bodies are over half a second of it on two cores. So bodies over `LARGE_BODY` are read one at a time,
and only while no small request is being answered (a large one waits at most `max_wait_s` per chunk,
so it is slowed, never starved). Unread bodies cost nothing: uvicorn stops reading a socket whose body
nobody asked for, and the sender waits on TCP.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager

LARGE_BODY = 1024 * 1024  # bytes; a chat with no image is far below, one with a photo above


class SmallFirst:
    def __init__(self, max_wait_s: float = 0.005) -> None:
        self.max_wait_s = max_wait_s
        self._small = 0
        self._quiet = asyncio.Event()
        self._quiet.set()
        self._large = asyncio.Semaphore(1)

    @staticmethod
    def is_large(content_length: str) -> bool:
        """A body is large when it says so, or does not say (chunked uploads)."""
        return not content_length.isdigit() or int(content_length) > LARGE_BODY

    @contextmanager
    def small(self) -> Iterator[None]:
        """While a small request is answered, large bodies are not read."""
        self._small += 1
        self._quiet.clear()
        try:
            yield
        finally:
            self._small -= 1
            if not self._small:
                self._quiet.set()

    @asynccontextmanager
    async def large(self) -> AsyncIterator[None]:
        """One large body read at a time."""
        async with self._large:
            yield

    async def yield_to_small(self) -> None:
        """Between the chunks of a large body: wait while small requests are answered (bounded)."""
        if self._small:
            try:
                await asyncio.wait_for(self._quiet.wait(), self.max_wait_s)
            except TimeoutError:
                pass
