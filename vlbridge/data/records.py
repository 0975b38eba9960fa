"""Records of a JSON list or JSON-lines file, read on access: only their byte offsets stay in memory.

Loaded whole, a million-row LLaVA file costs gigabytes of Python dicts in every process that touches it.
The index costs 16 bytes a record, pickles as two arrays and a path (DataLoader workers), and reopens the
file in each process. One streaming pass finds the records and parses each once, so a malformed file
fails when it is loaded, naming the line, not hours into a run.
"""

from __future__ import annotations

import codecs
import json
import os
import re
from array import array
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from ..errors import DataError

BLOCK = 1 << 20  # bytes read at a time by the scanning pass
MAX_RECORD = 256 << 20  # a record this long is a string or bracket left open, not data
NOT_RECORDS = "expected a list of records (JSON objects), one per sample"
_DECODE = json.JSONDecoder().raw_decode
# The slow path, for a record the decoded text does not hold whole (or a malformed one): inside a record
# only strings and brackets matter, so it matches a whole string (escapes skipped), a quote whose string
# runs past the buffer, or a bracket.
_TOKEN = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"|["{}\[\]]', re.DOTALL)
_SPACE = re.compile(rb"[ \t\r\n]*")
_QUOTE, _OPEN = ord('"'), frozenset(b"{[")


class _Window:
    """A sliding window over a binary file: `data` holds the file's bytes from offset `base` on."""

    def __init__(self, path: Path) -> None:
        self.path, self.file = path, open(path, "rb")  # noqa: SIM115 - closed by close()
        self.data, self.base, self.line = b"", 0, 1
        self.eof = False

    def more(self, keep: int) -> int:
        """Read another block, dropping the bytes before `keep`; returns how far local positions moved."""
        chunk = self.file.read(BLOCK)
        self.eof = not chunk
        self.line += self.data.count(b"\n", 0, keep)
        self.data, self.base = self.data[keep:] + chunk, self.base + keep
        return keep

    def skip_space(self, pos: int) -> int:
        """Position of the next non-blank byte (refilling as needed); len(data) only at end of file."""
        while True:
            pos = _SPACE.match(self.data, pos).end()
            if pos < len(self.data) or self.eof:
                return pos
            pos -= self.more(pos)

    def byte(self, pos: int) -> bytes:
        return self.data[pos : pos + 1]

    def line_at(self, pos: int) -> int:
        return self.line + self.data.count(b"\n", 0, pos)

    def fail(self, pos: int, what: str) -> DataError:
        return DataError(f"{self.path}: invalid JSON at line {self.line_at(pos)}: {what}")

    def close(self) -> None:
        self.file.close()


class _Text:
    """The window's bytes from one file offset on, decoded, so `json`'s C decoder finds whole records.

    It keeps one (file offset, character) pair in step; moving between records crosses only blanks and
    commas, one byte a character, so a record's start maps to a character without decoding again.
    """

    def __init__(self, window: _Window, pos: int) -> None:
        raw = window.data[pos:]
        try:
            self.text, used = codecs.utf_8_decode(raw, "strict", False)  # stops before a cut character
        except UnicodeDecodeError as err:  # decode up to the bad byte: that record takes the slow path
            self.text, used = raw[: err.start].decode(), err.start
        self.ascii = used == len(self.text)
        self.offset, self.char, self.stop = window.base + pos, 0, window.base + pos + used

    def record_end(self, offset: int) -> int | None:
        """File offset just past the object starting at `offset`, or None when this text cannot tell."""
        char = self.char + offset - self.offset
        try:
            _, end = _DECODE(self.text, char)
        except json.JSONDecodeError:
            return None
        self.offset = offset + (end - char if self.ascii else len(self.text[char:end].encode()))
        self.char = end
        return self.offset


def _record_end(window: _Window, start: int, number: int) -> tuple[int, int]:
    """(start, end) of the object opening at `start`; both are window positions, moved if it slides."""
    data, depth, pos = window.data, 0, start
    while True:
        found = _TOKEN.search(data, pos)
        byte = data[found.start()] if found is not None else _QUOTE
        if byte == _QUOTE and (found is None or found.end() - found.start() == 1):  # more bytes needed
            if window.eof or len(data) - start > MAX_RECORD:
                where = "the file ends inside" if window.eof else f"over {MAX_RECORD:,} bytes in"
                raise window.fail(start, f"{where} record {number}: a string or bracket is not closed")
            pos = len(data) if found is None else found.start()
            moved = window.more(start)
            data, start, pos = window.data, start - moved, pos - moved
            continue
        pos = found.end()
        if byte in _OPEN:
            depth += 1
        elif byte != _QUOTE:
            depth -= 1
            if depth == 0:
                return start, pos


def _parse(window: _Window, start: int, end: int, number: int) -> None:
    try:
        json.loads(window.data[start:end])
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        line = window.line_at(start) + getattr(err, "lineno", 1) - 1
        raise DataError(
            f"{window.path}: invalid JSON at line {line} (record {number}): {getattr(err, 'msg', err)}"
        ) from err


def scan_json_list(path: Path) -> tuple[array, array]:
    """Byte spans of the objects of a `[{...}, {...}]` file, each parsed once to check it, in one pass."""
    starts, ends = array("q"), array("q")
    window = _Window(path)
    try:
        pos = window.skip_space(0)
        if window.data.startswith(codecs.BOM_UTF8):  # written by some Windows tools; json.load refuses it
            pos = window.skip_space(len(codecs.BOM_UTF8))
        if pos == len(window.data):
            raise window.fail(pos, "the file is empty")
        if window.byte(pos) != b"[":
            raise DataError(f"{path}: {NOT_RECORDS}")
        pos = window.skip_space(pos + 1)
        text, closed = _Text(window, pos), window.byte(pos) == b"]"
        while not closed:
            if window.byte(pos) != b"{":
                if window.byte(pos) in (b"", b"]"):
                    at_end = pos == len(window.data)
                    raise window.fail(pos, "the file ends inside the list" if at_end else "a ',' before ']'")
                raise DataError(f"{path}: {NOT_RECORDS} (line {window.line_at(pos)})")
            if window.base + pos >= text.stop:
                text = _Text(window, pos)
            end = text.record_end(window.base + pos)
            if end is None:  # cut off by the decoded text, or malformed: find its end byte by byte
                start, pos = _record_end(window, pos, len(starts))
                _parse(window, start, pos, len(starts))
                text = _Text(window, pos)
            else:
                start, pos = pos, end - window.base
            starts.append(window.base + start)
            ends.append(window.base + pos)
            pos = window.skip_space(pos)
            if window.byte(pos) not in (b",", b"]"):
                raise window.fail(pos, f"expected ',' or ']' after record {len(starts) - 1}")
            closed = window.byte(pos) == b"]"
            pos = pos if closed else window.skip_space(pos + 1)
        pos = window.skip_space(pos + 1)
        if pos < len(window.data):
            raise window.fail(pos, "extra data after the closing ']'")
    finally:
        window.close()
    return starts, ends


def scan_json_lines(path: Path) -> tuple[array, array]:
    """Byte spans of the non-blank lines of a JSON-lines file, each parsed once to check it is an object."""
    starts, ends = array("q"), array("q")
    offset = 0
    with open(path, "rb") as file:
        for number, line in enumerate(file, 1):
            if line.strip():
                try:
                    record = json.loads(line)
                except (json.JSONDecodeError, UnicodeDecodeError) as err:
                    raise DataError(
                        f"{path}: invalid JSON at line {number}: {getattr(err, 'msg', err)}"
                    ) from err
                if not isinstance(record, dict):
                    raise DataError(f"{path}: {NOT_RECORDS} (line {number} is not an object)")
                starts.append(offset)
                ends.append(offset + len(line))
            offset += len(line)
    return starts, ends


# file suffix -> scanner; any other suffix is read as a JSON list, as read_records always did
SCANNERS: dict[str, Callable[[Path], tuple[array, array]]] = {".jsonl": scan_json_lines}


class RecordIndex(Sequence):
    """The records of a JSON list or JSON-lines file as a read-only sequence of dicts, parsed on access."""

    def __init__(self, path: str | Path, starts: np.ndarray, ends: np.ndarray) -> None:
        self.path, self.starts, self.ends = Path(path), starts, ends
        self._fd, self._pid = -1, -1

    @classmethod
    def build(cls, path: str | Path) -> RecordIndex:
        path = Path(path)
        if not path.is_file():
            raise DataError(f"file not found: {path}")
        starts, ends = SCANNERS.get(path.suffix, scan_json_list)(path)
        return cls(
            path, np.frombuffer(starts, dtype=np.int64).copy(), np.frombuffer(ends, dtype=np.int64).copy()
        )

    def __len__(self) -> int:
        return len(self.starts)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        if not -len(self) <= index < len(self):
            raise IndexError(f"record {index} of {len(self)}")
        index %= len(self)
        start, end = int(self.starts[index]), int(self.ends[index])
        data = os.pread(self._descriptor(), end - start, start)
        try:
            return json.loads(data)
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise DataError(f"{self.path}: record {index} no longer parses; was the file changed?") from err

    def _descriptor(self) -> int:
        """This process's own descriptor: pread shares no file position, but a fork's copy may be closed."""
        if self._pid != os.getpid():
            self._fd, self._pid = os.open(self.path, os.O_RDONLY), os.getpid()
        return self._fd

    def __getstate__(self) -> dict:
        return {"path": self.path, "starts": self.starts, "ends": self.ends}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["path"], state["starts"], state["ends"])

    def __del__(self) -> None:
        if self._pid == os.getpid():
            os.close(self._fd)
