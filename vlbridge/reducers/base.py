"""The reducer interface: plug-ins that change how many visual tokens a built VLModel pays for.

Two kinds exist. *Tower* reducers (Turbo, ToMe) shorten the vision tower's token sequence, so the
front-end must agree to it (`Frontend.reducible_tower`), and they say from their config how many tokens
an image keeps (`tower_tokens`, which the processor counts with); they may tell
`VLModel.llm_inputs` where a reduced image's tokens sit and what each stands for (`image_span`,
`image_positions`, `image_sizes`). *LLM* reducers (p-MoD, FastV) act inside decoder layers; they read
which positions of a prompt are visual from the LLM call's `visual_mask` keyword (`reads_visual_mask`).

Reducers never add modules inside the LLM or the tower (state dicts stay loadable by transformers):
they patch forwards in place and keep their own parameters (p-MoD routers) on themselves, saved in
`reducers.safetensors` beside the front-end.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections import defaultdict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ..config import ReducerConfig

if TYPE_CHECKING:
    from ..modeling import VLModel
    from ..vision_towers import TowerSpec


class Reducer(nn.Module, ABC):
    """A token reducer built from its config section and attached once to a VLModel."""

    # False when the LLM's layers stop sharing one KV-cache layout (p-MoD, FastV keep fewer entries in some
    # layers): code that splices or pads caches row-wise (serving engines) must then refuse the model.
    aligned_cache = True
    reads_visual_mask = False  # True: the LLM call must carry the prompt's visual mask
    shrinks_tower = False  # True: a tower reducer, which changes the tokens per image (`tower_tokens`)

    def __init__(self, config: ReducerConfig) -> None:
        super().__init__()
        self.config = config

    @classmethod
    def tower_tokens(cls, config: ReducerConfig, tower: TowerSpec, size: int) -> int:
        """Tokens per image a tower reducer leaves of a `size`-pixel image, from the config alone (the
        processor's count, `frontends/layout.image_layout`)."""
        raise NotImplementedError(f"{cls.__name__} does not shorten the vision tower")

    @abstractmethod
    def attach(self, model: VLModel) -> None:
        """Patch the model (tower blocks or decoder layers); called once, after the front-end attached."""

    def group_paths(self) -> dict[str, str]:
        """Trainable parts (name -> attribute path relative to this reducer), e.g. p-MoD's routers."""
        return {}

    # What a tower reducer tells `VLModel.llm_inputs` about the images the tower just encoded (None: nothing).
    def image_span(self) -> int | None:
        """RoPE positions one image keeps (its token count before reduction), when it keeps them."""
        return None

    def image_positions(self) -> torch.Tensor | None:
        """Where in its span each of the last encoded images' tokens sits, [N_img, V'] (None: evenly)."""
        return None

    def image_sizes(self) -> torch.Tensor | None:
        """Patches each of the last encoded images' tokens stands for, [N_img, V'], when the LLM weighs
        merged tokens by it (reducers/size_bias.py)."""
        return None


@dataclass(frozen=True)
class LayerCount:
    """Tokens one decoder layer processed on a prompt forward, per sample (padding excluded)."""

    layer: int
    visual: tuple[int, ...]  # visual tokens the layer ran on (queries, keys and cache entries)
    tokens: tuple[int, ...]  # all tokens it ran on


@dataclass
class Meter:
    """What the reducers did on the last forward passes: counts per named stage, appended in call order.

    Off by default (`VLModel.meter = Meter()` turns it on): reducers call `record` only when one is set,
    so a plain run pays nothing. Benchmarks read it after a prefill; `reset` between measurements.

    Keys in use: `LLM_LAYER` (a `LayerCount` from every decoder layer an in-LLM reducer shortened; layers
    without a record ran on every token), `TOWER_TOKENS` (tower reducers: tokens per image entering the
    first block and leaving each block), `pmod.keep` / `fastv.keep` (`(layer, [B, T] bool kept mask)`).
    """

    LLM_LAYER = "llm.layer"
    TOWER_TOKENS = "tower.tokens"

    records: dict[str, list[Any]] = field(default_factory=lambda: defaultdict(list))

    def record(self, key: str, value: Any) -> None:
        self.records[key].append(value)

    def last(self, key: str, default: Any = None) -> Any:
        values = self.records.get(key)
        return values[-1] if values else default

    def reset(self) -> None:
        self.records.clear()

    def record_layer(self, layer: int, visual: list[int], tokens: list[int]) -> None:
        self.record(self.LLM_LAYER, LayerCount(layer, tuple(visual), tuple(tokens)))

    def llm_layers(self) -> dict[int, LayerCount]:
        """The latest `LayerCount` of every decoder layer that recorded one."""
        return {count.layer: count for count in self.records.get(self.LLM_LAYER, [])}

    def visual_per_layer(self, num_layers: int, visual_in: list[int]) -> list[list[int]]:
        """Visual tokens each of `num_layers` decoder layers processed, per sample; layers with no record
        ran on all `visual_in` (the visual tokens that entered the LLM)."""
        layers = self.llm_layers()
        return [list(layers[i].visual) if i in layers else list(visual_in) for i in range(num_layers)]
