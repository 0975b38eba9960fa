"""String-keyed registries: recipes name a component, the registry finds its class.

Each registry entry may declare the pydantic config class that validates its section of a
recipe, so adding a component never means touching an if-chain elsewhere.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from .errors import ConfigError

T = TypeVar("T")


@dataclass(frozen=True)
class Entry(Generic[T]):
    name: str
    target: T
    config_class: type | None


class Registry(Generic[T]):
    """A named table of components, filled by the `@REGISTRY.register("name")` decorator."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, Entry[T]] = {}

    def register(self, name: str, *, config: type | None = None) -> Callable[[T], T]:
        def decorator(target: T) -> T:
            if name in self._entries:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            self._entries[name] = Entry(name, target, config)
            return target

        return decorator

    def entry(self, name: str) -> Entry[T]:
        _load_builtins()
        if name not in self._entries:
            raise ConfigError(
                f"unknown {self.kind} {name!r}; available: {', '.join(sorted(self._entries)) or '(none)'}"
            )
        return self._entries[name]

    def get(self, name: str) -> T:
        return self.entry(name).target

    def config_class(self, name: str) -> type | None:
        return self.entry(name).config_class

    def names(self) -> list[str]:
        _load_builtins()
        return sorted(self._entries)

    def __contains__(self, name: str) -> bool:
        _load_builtins()
        return name in self._entries


FRONTENDS: Registry[Any] = Registry("front-end")
CONNECTORS: Registry[Any] = Registry("connector")
VISION_TOWERS: Registry[Any] = Registry("vision tower family")
REDUCERS: Registry[Any] = Registry("reducer")
DATA_FORMATS: Registry[Any] = Registry("data format")
# checkpoint layouts besides vlbridge's own: objects with detect(path), load(path, ...) and export(...)
CHECKPOINT_FORMATS: Registry[Any] = Registry("checkpoint format")
# how a training run's ranks share the model (train.distributed)
DISTRIBUTED: Registry[Any] = Registry("distributed engine")

_BUILTIN_MODULES = (
    "vlbridge.frontends",
    "vlbridge.frontends.adem_vl",
    "vlbridge.frontends.inf_llava",
    "vlbridge.frontends.llava_next",
    "vlbridge.frontends.solo",
    "vlbridge.connectors",
    "vlbridge.vision_towers",
    "vlbridge.reducers",
    "vlbridge.reducers.pmod",  # in-LLM reducers
    "vlbridge.reducers.fastv",
    "vlbridge.reducers.turbo",
    "vlbridge.reducers.tome",
    "vlbridge.data.formats",
    "vlbridge.data.streaming",
    "vlbridge.interop",
    "vlbridge.training.distributed",
    "vlbridge.training.zero",
)
_loaded = False


def _load_builtins() -> None:
    """Import the modules whose decorators fill the registries (once, on first lookup)."""
    global _loaded
    if _loaded:
        return
    _loaded = True
    import importlib

    for module in _BUILTIN_MODULES:
        importlib.import_module(module)
