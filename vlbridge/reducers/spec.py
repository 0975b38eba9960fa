"""`--reducer` on the command line: `TYPE[:key=value,...]` -> a reducer config section (dict)."""

from __future__ import annotations

from typing import Any

import yaml

from ..errors import ConfigError


def parse_reducer_spec(spec: str) -> dict[str, Any]:
    """`"turbo:r=16,lam=500"` -> `{"type": "turbo", "r": 16, "lam": 500}`; values are YAML, so lists
    work too: `"turbo:r=[16,8]"`."""
    kind, _, rest = spec.partition(":")
    if not kind.strip():
        raise ConfigError(f"--reducer {spec!r}: expected TYPE[:key=value,...], e.g. turbo:r=16")
    section: dict[str, Any] = {"type": kind.strip()}
    for item in filter(None, (part.strip() for part in _split_top_level(rest))):
        key, eq, value = item.partition("=")
        if not eq or not key.strip():
            raise ConfigError(f"--reducer {spec!r}: {item!r} is not key=value")
        section[key.strip()] = yaml.safe_load(value)
    return section


def _split_top_level(text: str) -> list[str]:
    """Split at commas outside brackets."""
    parts, depth, start = [], 0, 0
    for i, char in enumerate(text):
        if char in "[{":
            depth += 1
        elif char in "]}":
            depth -= 1
        if char == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    return [*parts, text[start:]]
