"""A chat request's raw JSON body -> ChatCompletionRequest, without parsing megabytes on the event loop.

Inline images are most of a large body. Their base64 is lifted out of the bytes before the JSON is parsed
(a byte search and a copy, not a parse), so a 20 MiB image costs the server a few milliseconds on the
event loop, where parsing it would hold up every other request for tens. An image over the size limit,
or text too long for any prompt that fits the context, is refused from these byte counts alone.
"""

from __future__ import annotations

import json
import re
from typing import Any

from pydantic import ValidationError

from .errors import APIError, bad_request
from .protocol import ChatCompletionRequest

_LIFTED = re.compile(r"data:[^,]*,\x00(\d+)\Z")  # what a lifted string reads as after the parse
_MAX_LIFTS = 64  # data URLs lifted per body at most (a server takes a handful of images per request)


class Limits:
    """What a body may hold: bytes of image data per image, bytes of everything else."""

    def __init__(self, max_image_bytes: int, max_text_bytes: int) -> None:
        self.max_image_bytes = max_image_bytes
        self.max_text_bytes = max_text_bytes


def parse_body(raw: bytes | bytearray, limits: Limits) -> ChatCompletionRequest:
    spans = image_spans(raw, limits.max_image_bytes)
    rest, payloads = _lift(raw, spans)
    if len(rest) > limits.max_text_bytes:
        raise _text_too_long(len(rest), limits)
    if not rest.strip():
        raise bad_request("the request body is empty; send a JSON object", code="invalid_json")
    try:
        data = json.loads(rest)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise bad_request(f"the request body is not valid JSON: {err}", code="invalid_json") from err
    if not isinstance(data, dict):
        raise bad_request(f"the request body must be a JSON object, not {type(data).__name__}")
    if payloads:
        data = _restore(data, payloads)
    try:
        return ChatCompletionRequest.model_validate(data)
    except ValidationError as err:
        raise invalid(err.errors()) from err


def check_prefix(prefix: bytes | bytearray, limits: Limits) -> None:
    """Refuse a body still arriving as soon as what has arrived proves it too large: an image over the
    limit, or more text than fits."""
    spans = image_spans(prefix, limits.max_image_bytes, partial=True)
    text = len(prefix) - sum(end - begin for begin, end in spans)
    if text > limits.max_text_bytes:
        raise _text_too_long(text, limits, arrived=True)


def image_spans(
    raw: bytes | bytearray, max_image_bytes: int, *, partial: bool = False
) -> list[tuple[int, int]]:
    """[begin, end) of each data URL's payload in a JSON body, refusing one over `max_image_bytes`.

    Searched with `bytes.find` (memchr speed): a regex over megabytes of base64 would cost what the parse
    does. With `partial` (a body still arriving), a data URL not closed yet runs to the end of `raw`.
    """
    spans: list[tuple[int, int]] = []
    at, tries = 0, 0
    while tries < _MAX_LIFTS and (start := raw.find(b'"data:', at)) != -1:
        tries += 1
        at = start + 1
        if raw[start - 1 : start] == b"\\":  # an escaped quote: inside a string, not the start of one
            continue
        comma, end = raw.find(b",", start, start + 256), raw.find(b'"', start + 1)
        if end == -1 and partial:  # still arriving: count it as image data
            spans.append((comma + 1 if comma != -1 else start, len(raw)))
            end = len(raw)
        elif not 0 < comma < end or raw[end - 1 : end] == b"\\":  # not a data URL string that ends here
            continue
        else:
            spans.append((comma + 1, end))
        size = (spans[-1][1] - spans[-1][0]) * 3 // 4  # from the base64 length, before any decoding
        if size > max_image_bytes + 3:
            holds = "at least" if partial and end == len(raw) else "about"
            raise APIError(
                413,
                f"an inline image holds {holds} {size:,} bytes, over this server's limit of "
                f"{max_image_bytes:,} bytes per image; send a smaller image",
                code="image_too_large",
            )
        at = end + 1
    return spans


def _text_too_long(size: int, limits: Limits, arrived: bool = False) -> APIError:
    holds = "holds at least" if arrived else "holds"
    return APIError(
        413,
        f"the request {holds} {size:,} bytes besides its inline images, more than any prompt that fits this "
        f"model's context ({limits.max_text_bytes:,} bytes); shorten the conversation",
        code="context_length_exceeded",
    )


def _lift(raw: bytes | bytearray, spans: list[tuple[int, int]]) -> tuple[bytes | bytearray, list]:
    """(the body with each payload in `spans` replaced by a marker, the payloads)."""
    if not spans:
        return raw, []
    pieces, cursor = [], 0
    for index, (begin, end) in enumerate(spans):
        pieces += [raw[cursor:begin], b"\\u0000", str(index).encode()]
        cursor = end
    pieces.append(raw[cursor:])
    return b"".join(pieces), [raw[begin:end] for begin, end in spans]


def _restore(value: Any, payloads: list) -> Any:
    """Put each lifted payload back into its string, wherever in the request that string was."""
    if isinstance(value, dict):
        return {k: _restore(v, payloads) for k, v in value.items()}
    if isinstance(value, list):
        return [_restore(v, payloads) for v in value]
    if isinstance(value, str) and (match := _LIFTED.match(value)):
        header = value[: value.index(",") + 1]
        return header + _decode(payloads[int(match.group(1))])
    return value


def _decode(payload: bytes | bytearray) -> str:
    """A JSON string's raw bytes as text: a copy, unless the client escaped characters in it."""
    if b"\\" in payload:
        try:
            return json.loads(b'"' + bytes(payload) + b'"')
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise bad_request(f"the request body is not valid JSON: {err}", code="invalid_json") from err
    try:
        return payload.decode("ascii")
    except UnicodeDecodeError:
        return payload.decode("utf-8", errors="replace")


def invalid(errors: list[dict[str, Any]]) -> APIError:
    """One 400 naming each invalid field, what it must be, and (briefly) the value seen."""
    lines, first = [], None
    for err in errors:
        where = ".".join(str(p) for p in err["loc"] if not _is_type_tag(p)) or "body"
        first = first or where
        seen = repr(err.get("input"))
        seen = seen if len(seen) <= 60 else seen[:57] + "..."
        line = f"{where}: {err['msg']}" + ("" if err["type"] == "missing" else f" (got {seen})")
        if line not in lines:
            lines.append(line)
    return bad_request("invalid request: " + "; ".join(lines[:5]), first)


def _is_type_tag(part: Any) -> bool:
    """Pydantic names union members in error locations ('str', 'list[...]'); users never wrote those."""
    return isinstance(part, str) and ("[" in part or part in {"str", "int", "float", "bool", "list"})
