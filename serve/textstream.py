"""Incremental detokenization with stop strings: the text a row may show so far, and where it stops.

Decoding the whole token list each step keeps multi-byte characters and tokenizer-specific spacing
right; text that could still grow into a stop string (or ends in half a UTF-8 character) is held back
until it is decided, so a stream never shows a stop string or a replacement character.
"""

from __future__ import annotations

from collections.abc import Callable


class TextStream:
    """Accumulates a row's tokens; `push` returns the newly safe text and whether a stop string hit."""

    def __init__(self, decode: Callable[[list[int]], str], stops: list[str]) -> None:
        self.decode = decode
        self.stops = stops
        self.tokens: list[int] = []
        self.sent = ""  # text already handed out
        self.stopped = False

    def push(self, token: int) -> str:
        self.tokens.append(token)
        text = self.decode(self.tokens)
        cut = self._stop_at(text)
        if cut is not None:
            self.stopped = True
            return self._advance(text[:cut])
        if text.endswith("\ufffd"):
            return ""  # half a character: wait for the rest of its bytes
        return self._advance(text[: len(text) - self._held(text)])

    def finish(self) -> str:
        """The rest of the text once the row ends for a reason other than a stop string."""
        return "" if self.stopped else self._advance(self.decode(self.tokens))

    def _advance(self, upto: str) -> str:
        if not upto.startswith(self.sent) or len(upto) <= len(self.sent):
            return ""
        delta, self.sent = upto[len(self.sent) :], upto
        return delta

    def _stop_at(self, text: str) -> int | None:
        start = max(0, len(self.sent) - max((len(s) for s in self.stops), default=0))
        hits = [i for s in self.stops if (i := text.find(s, start)) >= 0]
        return min(hits) if hits else None

    def _held(self, text: str) -> int:
        """Length of the longest tail of `text` that begins some stop string."""
        for size in range(min(len(text), max((len(s) for s in self.stops), default=1) - 1), 0, -1):
            if any(s.startswith(text[-size:]) for s in self.stops):
                return size
        return 0
