"""p-MoD: mixture-of-depths over vision tokens with progressive ratio decay.

Zhang, Meng et al., "p-MoD: Building Mixture-of-Depths MLLMs via Progressive Ratio Decay", ICCV 2025
(arXiv 2412.04449); official code `llava/model/language_model/pmod_llava_llama.py` (`ModLayer`).
Spec: pmod.md (section numbers below). Each routed decoder layer gets a Linear(D, 1) router; on a
prompt, only the top R_l fraction of its vision tokens (plus every real non-vision token) runs through
the layer and enters its KV cache. Kept vision tokens get x + a + ω·m, skipped ones ω·x (STRing with the
code's semantics), ω = TanhNorm(router logit). Decode steps (new text tokens) run densely against each
layer's shorter cache. p-MoD is not training-free: the routers (module group `routers`, saved in
`reducers.safetensors`) learn through ω during fine-tuning.
"""

from __future__ import annotations

import functools
from typing import Any, Literal

import torch
from pydantic import Field, model_validator
from torch import nn

from ..config import ReducerConfig
from ..errors import ConfigError
from ..llm_calls import cache_in, layer_kinds
from ..registry import REDUCERS
from .decoder import LayerForward, LLMReducer, Pack, Slots, packed_kwargs
from .schedules import DECAYS, LAYOUTS, Ratios, decay_ratios, layout_ratios

Schedule = Literal[
    "shiftedcos", "shiftedlinear", "deep_all", "deep_all_include_last", "interleave", "explicit"
]


class PModConfig(ReducerConfig):
    """Official defaults: `shiftedcos_decay_0.85_0.15`, mod_router_factor 0.5, `tanh_0.2_1`, zero-init
    routers with bias."""

    type: str = "pmod"
    schedule: Schedule = "shiftedcos"
    ratio: float = Field(default=0.5, ge=0)  # r̄: mean of the decay, or the ratio of a fixed layout
    max_ratio: float = Field(default=0.85, gt=0, le=1)  # decays: layers with ρ_l above it stay dense
    min_ratio: float = Field(default=0.15, ge=0, le=1)  # decays: floor of R_l
    decay_span: int | None = Field(default=None, ge=1)  # ρ's denominator; None: L−1 (official: 31)
    ratios: list[float | None] | None = None  # schedule explicit: one per layer, None = dense
    weight_norm: Literal["tanh", "sigmoid", "softmax", "none"] = "tanh"
    norm_scale: float = Field(default=0.2, ge=0)  # s_α
    norm_bias: float = 1.0  # s_β
    string_scope: Literal["mlp", "layer_delta"] = "mlp"  # ω scales the MLP branch (code) or the whole delta
    budget: Literal["float32", "floor"] = "float32"  # k = trunc(float32(n)·R) as the code, or exact floor
    router_bias: bool = True
    router_init: Literal["zeros", "default"] = "zeros"  # zeros: ω ≡ 1 at the start (mod_special_init)

    @model_validator(mode="after")
    def _schedule_fields(self) -> PModConfig:
        if (self.schedule == "explicit") != (self.ratios is not None):
            raise ValueError("schedule 'explicit' and ratios go together: give both or neither")
        if self.ratios is not None and any(r is not None and not 0 < r <= 1 for r in self.ratios):
            raise ValueError(f"ratios must be in (0, 1] or null (dense layer), got {self.ratios}")
        if self.schedule in LAYOUTS and not 0 < self.ratio <= 1:
            raise ValueError(f"a fixed layout keeps `ratio` of the vision tokens: (0, 1], got {self.ratio}")
        return self

    def layer_ratios(self, depth: int) -> Ratios:
        """R_l for every decoder layer (None: dense), spec §4."""
        if self.schedule == "explicit":
            if len(self.ratios) != depth:
                raise ConfigError(
                    f"pmod ratios has {len(self.ratios)} entries but the LLM has {depth} decoder layers"
                )
            return list(self.ratios)
        if self.schedule in DECAYS:
            return decay_ratios(
                self.schedule,
                depth,
                mean=self.ratio,
                max_ratio=self.max_ratio,
                min_ratio=self.min_ratio,
                span=self.decay_span,
            )
        return layout_ratios(self.schedule, depth, self.ratio)


# -- the pieces of one routed layer, spec §3 --------------------------------------------------------
def keep_budget(n_visual: torch.Tensor, ratio: float, mode: str = "float32") -> torch.Tensor:
    """k_b per sample [B] (§3.4, §12): the code's trunc(float32(n)·R), or the exact floor (float64).
    The same arithmetic runs on the host (shapes) and on the device (masks), so both agree."""
    if mode == "floor":
        return torch.floor(n_visual.double() * ratio).long()
    return torch.trunc(n_visual.to(torch.int32) * ratio).long()  # int32 · float -> float32, as the code


def host_budget(n_visual: list[int], ratio: float, mode: str = "float32") -> list[int]:
    return keep_budget(torch.tensor(n_visual), ratio, mode).tolist()


def router_weights(
    logits: torch.Tensor, visual: torch.Tensor, norm: str, scale: float, bias: float
) -> torch.Tensor:
    """ω [B, S]: the normalised router score of vision tokens (TanhNorm: 0.2·tanh(g) + 1 ∈ (0.8, 1.2)),
    exactly 1 elsewhere (§3.3). Softmax normalises over each row's vision tokens."""
    if norm == "softmax":
        low = torch.finfo(logits.dtype).min
        score = torch.softmax(logits.masked_fill(~visual, low), dim=1)
    else:
        score = {"tanh": torch.tanh, "sigmoid": torch.sigmoid, "none": lambda g: g}[norm](logits)
    return torch.where(visual, score * scale + bias, torch.ones_like(score))


def select_top(scores: torch.Tensor, visual: torch.Tensor, k: torch.Tensor, top: int) -> torch.Tensor:
    """[B, S] bool: the k_b (`k` [B], `top` = max k_b) vision tokens of each row with the highest score;
    ties go to the earlier token, so a left-padded row selects what it selects alone. p-MoD passes raw
    router logits (§3.4, §10: never the weights, which saturate and tie with text in bf16)."""
    selected = torch.zeros_like(visual)
    if top == 0:
        return selected
    scores = scores.detach().float().masked_fill(~visual, float("-inf"))
    order = scores.sort(dim=1, descending=True, stable=True).indices[:, :top]  # [B, k_max]
    take = torch.arange(top, device=scores.device) < k[:, None]
    return selected.scatter(1, order, take)


def new_router(hidden: int, bias: bool, init: str, like: torch.Tensor) -> nn.Linear:
    """Linear(D, 1); zero-initialised without drawing random numbers (the model's weights stay those
    of its seed whether or not p-MoD is attached)."""
    router = nn.utils.skip_init(nn.Linear, hidden, 1, bias=bias, device=like.device, dtype=like.dtype)
    if init == "zeros":
        nn.init.zeros_(router.weight)
        if bias:
            nn.init.zeros_(router.bias)
    else:
        router.reset_parameters()
    return router


@REDUCERS.register("pmod", config=PModConfig)
class PMod(LLMReducer):
    """Routers live here (`routers.<layer>`); the decoder layers are wrapped, not changed."""

    config: PModConfig

    def __init__(self, config: PModConfig) -> None:
        super().__init__(config)
        self.routers = nn.ModuleDict()
        self.ratios: Ratios = []
        self._mlp_scale: dict[int, torch.Tensor] = {}

    def group_paths(self) -> dict[str, str]:
        return {"routers": "routers"}

    def reduced_layers(self) -> list[int]:
        return [layer for layer, ratio in enumerate(self.ratios) if ratio is not None]

    def attach(self, model) -> None:
        llm = model.language_model
        config = llm.config.get_text_config()
        ratios = self.config.layer_ratios(config.num_hidden_layers)
        # Sliding-window layers stay dense: their windows count cache slots, not positions (§10).
        self.ratios = [
            r if kind == "full_attention" else None
            for r, kind in zip(ratios, layer_kinds(config), strict=True)
        ]
        if not self.reduced_layers():
            raise ConfigError(
                f"pmod schedule {self.config.schedule!r} routes no layer of this {config.num_hidden_layers}-"
                f"layer LLM (ratios {ratios}; sliding-window layers stay dense): choose another schedule"
            )
        super().attach(model)
        like = llm.get_input_embeddings().weight
        for layer in self.reduced_layers():
            self.routers[str(layer)] = new_router(
                config.hidden_size, self.config.router_bias, self.config.router_init, like
            )
            scaled = self._layers[layer].get_submodule(self.family.post_mlp_norm or self.family.mlp)
            scaled.register_forward_hook(functools.partial(self._scale_mlp, layer))

    def _scale_mlp(self, layer: int, module: nn.Module, args: tuple, output: torch.Tensor) -> Any:
        """STRing on kept tokens (§3.8, code semantics): the MLP branch times ω (1 on text)."""
        scale = self._mlp_scale.get(layer)
        return None if scale is None else output * scale.to(output.dtype)

    def layer_forward(
        self, layer: int, original: LayerForward, hidden_states: torch.Tensor, *, kwargs: dict[str, Any]
    ) -> Any:
        prompt = self.step.prompt if self.step is not None else None
        if prompt is None or prompt.visual.shape != hidden_states.shape[:2]:
            return self.run_dense(layer, original, hidden_states, kwargs)  # §3.1: decode, text-only
        return self._route(layer, original, hidden_states, kwargs)

    def _route(
        self, layer: int, original: LayerForward, x: torch.Tensor, kwargs: dict[str, Any]
    ) -> torch.Tensor:
        """One prompt call of a routed layer, spec §3 steps 2-8. x: [B, S, D]."""
        cfg, prompt = self.config, self.step.prompt
        ratio = self.ratios[layer]
        k, k_t = (
            host_budget(prompt.n_visual, ratio, cfg.budget),
            keep_budget(prompt.n_visual_t, ratio, cfg.budget),
        )
        logits = self.routers[str(layer)](x).squeeze(-1)  # [B, S] g on the raw layer input, §3.2
        weight = router_weights(logits, prompt.visual, cfg.weight_norm, cfg.norm_scale, cfg.norm_bias)
        keep = select_top(logits, prompt.visual, k_t, max(k)) | prompt.other  # [B, S], §3.3-3.5
        counts = [text + kept for text, kept in zip(prompt.n_other, k, strict=True)]
        base = x * weight[..., None]  # skipped vision: ω·x; padding and text: x (overwritten if kept)
        self._record(layer, k, counts, keep)
        cache = cache_in(kwargs)
        prior = self.slots(layer, cache)
        if prior is None:
            prior = self.dense_slots(layer) if self.step.past else Slots(0, None)
        if max(counts) == 0:  # k = 0 and no text: nothing runs, nothing is cached
            self.remember(layer, prior, cache)
            return base
        pack = Pack.from_keep(keep, counts, prompt.n_other_t + k_t)  # §3.6
        slots = prior.extend(pack.valid, pack.index.shape[1])
        mask = self.mask_for(slots, pack.index.shape[1], x)
        packed = pack.gather(x)  # [B, n, D]
        scale = pack.gather(weight)[..., None]  # [B, n, 1]
        self._mlp_scale[layer] = scale if cfg.string_scope == "mlp" else None
        try:  # §3.7: attention writes K/V of the kept tokens only
            out = original(packed, **packed_kwargs(pack, kwargs, mask))
        finally:
            self._mlp_scale.pop(layer, None)
        if cfg.string_scope == "layer_delta":  # variant: ω scales the whole update of kept vision tokens
            vision = pack.gather(prompt.visual)[..., None]
            out = torch.where(vision, packed + scale * (out - packed), out)
        self.remember(layer, slots, cache)
        return pack.scatter(base, out)  # §3.8

    def _record(self, layer: int, k: list[int], counts: list[int], keep: torch.Tensor) -> None:
        meter = self._vl.meter
        if meter is not None:
            meter.record_layer(layer, k, counts)
            meter.record("pmod.keep", (layer, keep))
