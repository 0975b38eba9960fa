"""p-MoD's per-layer retention ratios: progressive ratio decay (PRD) and the official fixed layouts.

A schedule maps a decoder depth L to one entry per layer: the fraction R_l of vision tokens layer l
processes, or None for a plain dense layer (no router). Spec pmod.md §4; official code
`pmod_llava_llama.py::build_mod_layers` and its `decay_func_dict`.
"""

from __future__ import annotations

import math
from collections.abc import Callable

from ..errors import ConfigError

Ratios = list[float | None]

# shape name -> ρ(r̄, l, span): the decay curve before the Rmax / Rmin cuts.
DECAYS: dict[str, Callable[[float, int, int], float]] = {
    # ρ_l = ½·cos(π·l/span) + r̄ (official: span hard-coded to 31)
    "shiftedcos": lambda mean, layer, span: math.cos(layer * math.pi / span) / 2 + mean,
    # ρ_l = 0.5 − l/span + r̄
    "shiftedlinear": lambda mean, layer, span: 0.5 - layer / span + mean,
}

# fixed layout name -> which of L layers route (each keeping the same ratio r̄)
LAYOUTS: dict[str, Callable[[int], range]] = {
    "deep_all": lambda depth: range(2, depth - 1),
    "deep_all_include_last": lambda depth: range(2, depth),
    "interleave": lambda depth: range(1, depth, 2),
}


def decay_ratios(
    shape: str, depth: int, *, mean: float, max_ratio: float, min_ratio: float, span: int | None = None
) -> Ratios:
    """PRD: layer l routes iff ρ_l ≤ Rmax, and then keeps R_l = max(ρ_l, Rmin); other layers are dense.

    `span` is the denominator (official: 31 whatever the depth; default here: L−1, identical for L = 32).
    """
    if shape not in DECAYS:
        raise ConfigError(f"unknown p-MoD decay {shape!r}; available: {', '.join(DECAYS)}")
    span = span if span is not None else depth - 1
    if span <= 0:
        raise ConfigError(f"p-MoD decay over {depth} layer(s) needs span > 0, got {span}; set decay_span")
    rho = [DECAYS[shape](mean, layer, span) for layer in range(depth)]
    return [max(r, min_ratio) if r <= max_ratio else None for r in rho]


def layout_ratios(layout: str, depth: int, ratio: float) -> Ratios:
    """A fixed layout: the layers `layout` names keep `ratio` of the vision tokens, the rest are dense."""
    if layout not in LAYOUTS:
        raise ConfigError(f"unknown p-MoD layout {layout!r}; available: {', '.join(LAYOUTS)}")
    routed = set(LAYOUTS[layout](depth))
    return [ratio if layer in routed else None for layer in range(depth)]
