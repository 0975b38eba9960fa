"""Token merging inside the vision tower, what Turbo (turbo.py) and ToMe (tome.py) share.

Both merge the r most redundant token pairs of every encoder block between its attention and MLP
(tower_merge.py, merge.py), so the LLM receives fewer visual tokens; nothing is trained. They differ
in how merges are ranked (`TokenMerging.lam`, `semantic_value`).
Spec: ../shared/specs/turbo.md (official code, LLaVA-1.5 defaults) and reduction_baselines.md §B.

Budget: `r` (ToMe's forms: an int for every block, with `inflect` a linear ramp, or a list per block)
or `tokens` (visual tokens per image that reach the LLM; r is then spread evenly over the blocks
before the feature layer, earlier blocks taking the remainder). `first_blocks` confines either budget to
the first k blocks: the same tokens reach the LLM, but the tower runs shorter sequences sooner, which is
what speeds up models whose tower is a large share of the prefill (at some accuracy cost: early merges
see less context). Blocks after the front-end's feature layer never merge: their output is unused.
`positions: dense | original` keeps each image on the RoPE span the full image took (`image_span`,
`image_positions`), for models that locate text by its distance across the image; the official code
numbers the kept tokens 0..V'-1. `llm_proportional` weighs each merged token by its size in the LLM's
attention too (size_bias.py), so that the LLM's counts do not drift; off in the official code.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Literal

import torch
from pydantic import Field, NonNegativeInt, PositiveInt, model_validator

from ..config import ReducerConfig
from ..errors import ConfigError
from ..vision_towers import TowerSpec, VisionTower
from . import size_bias
from .base import Reducer
from .merge import token_trajectory
from .tower_merge import MergeSchedule, SemanticValue, TowerMerger, patch_encoder

if TYPE_CHECKING:
    from ..modeling import VLModel

DEFAULT_R = 16  # official LLaVA-1.5 setting (CLIP ViT-L/14-336: 576 -> 208 visual tokens)

# Vision towers whose encoder blocks can be patched: transformers model_type -> path of the block list.
ENCODER_BLOCKS: dict[str, str] = {
    "clip_vision_model": "encoder.layers",
    "siglip_vision_model": "encoder.layers",
}


class TokenMergeConfig(ReducerConfig):
    """What ToMe and Turbo share: the merge budget, the threshold, proportional attention, output order."""

    r: NonNegativeInt | list[NonNegativeInt] | None = None  # default DEFAULT_R unless `tokens` is set
    inflect: float = Field(default=0.0, ge=-1, le=1)  # ToMe's (r, inflect) linear schedule for an int r
    tokens: PositiveInt | None = None  # target visual tokens per image that reach the LLM
    first_blocks: PositiveInt | None = None  # merge only in the first k encoder blocks (None: all)
    min_tokens: NonNegativeInt = 0  # blocks whose input is shorter merge nothing (official r_threshold)
    proportional: bool = True  # attention logits + log(size); False = the official LLaVA path (unused bias)
    order: Literal["merge", "raster"] = "merge"  # raster: output sorted by each token's original index
    # contiguous: the LLM numbers the V' tokens 0..V'-1 (official). The image keeps the V positions the full
    # one took, so the text after it keeps its positions (VLModel.llm_inputs), with dense: its tokens
    # spread evenly over them; original: each token at its representative patch's position (as p-MoD)
    positions: Literal["contiguous", "dense", "original"] = "contiguous"
    # the LLM's attention also weighs each visual token by the patches it stands for (size_bias.py);
    # off: the LLM sees merged tokens as single patches (official)
    llm_proportional: bool = False

    @model_validator(mode="before")
    @classmethod
    def _default_r(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("r") is None and data.get("tokens") is None:
            data = {**data, "r": DEFAULT_R}
        return data

    @model_validator(mode="after")
    def _one_budget(self) -> TokenMergeConfig:
        if self.r is not None and self.tokens is not None:
            raise ValueError(
                f"set either r (tokens merged per block, got {self.r}) or tokens (visual tokens left per "
                f"image, got {self.tokens}), not both"
            )
        if self.inflect != 0 and not isinstance(self.r, int):
            raise ValueError(f"inflect={self.inflect} shapes an int r; with r={self.r} leave it at 0")
        if self.first_blocks is not None and isinstance(self.r, list):
            raise ValueError(
                f"first_blocks={self.first_blocks} confines an int r or a tokens target; the list r={self.r} "
                "already gives every block's value (end it with zeros instead)"
            )
        return self

    def ranking(self) -> tuple[float, float, float]:
        """(λ, β, γ) of the merge ranking; Turbo's config overrides (ToMe: λ = 0)."""
        return 0.0, 1.0, 0.0

    def schedule(self, tower: TowerSpec) -> Callable[[int], MergeSchedule]:
        """n (tokens entering block 0) -> the forward's MergeSchedule; fixed unless a token target is set."""
        blocks = mergeable_blocks(tower, self.type)
        merging = feature_block_count(tower, self.type)
        protected, dropped = int(tower.family.has_cls), cls_dropped(tower)
        if self.first_blocks is not None:
            if self.first_blocks > blocks:
                raise ConfigError(
                    f"{self.type}.first_blocks={self.first_blocks} but the vision tower has only {blocks} "
                    f"encoder blocks; set it to at most {blocks}"
                )
            merging = min(merging, self.first_blocks)
        if self.tokens is None:
            span = self.first_blocks or blocks
            r = per_block_r(self.r, self.inflect, span, self.type) + [0] * (blocks - span)
            fixed = self._with_lam([v if i < merging else 0 for i, v in enumerate(r)])
            return lambda n: fixed
        cache: dict[int, MergeSchedule] = {}

        def for_tokens(n: int) -> MergeSchedule:
            if n not in cache:
                target = self.tokens + dropped
                spread = spread_budget(n, target, merging, protected, self.min_tokens, self.type)
                cache[n] = self._with_lam(spread + [0] * (blocks - merging))
            return cache[n]

        return for_tokens

    def tokens_after(self, tower: TowerSpec, size: int) -> int:
        """Tokens per image the merged tower returns for a `size`-pixel image, from the schedule alone."""
        n = tower.sequence(size)
        r = self.schedule(tower)(n).r[: feature_block_count(tower, self.type)]
        left = token_trajectory(n, r, protected=int(tower.family.has_cls), min_tokens=self.min_tokens)[-1]
        return left - cls_dropped(tower)

    def _with_lam(self, r: list[int]) -> MergeSchedule:
        """λ_l = β^|γ − t_l|·λ, t_l = blocks before l with a scheduled merge (official BLIP counting, §10)."""
        lam, beta, gamma = self.ranking()
        before = [sum(1 for v in r[:i] if v > 0) for i in range(len(r))]
        return MergeSchedule(r=tuple(r), lam=tuple(lam * beta ** abs(gamma - t) for t in before))


class TokenMerging(Reducer):
    """Patches the front-end's vision tower so that every encoder block merges tokens (spec §10)."""

    config: TokenMergeConfig
    shrinks_tower = True

    def __init__(self, config: TokenMergeConfig) -> None:
        super().__init__(config)
        self.merger: TowerMerger | None = None
        self._meter: Callable[[], Any] = lambda: None

    @classmethod
    def tower_tokens(cls, config: TokenMergeConfig, tower: TowerSpec, size: int) -> int:
        return config.tokens_after(tower, size)

    def attach(self, model: VLModel) -> None:
        owner = weakref.ref(model)
        self._meter = lambda: getattr(owner(), "meter", None)
        tower, size = model.frontend.reducible_tower(self.config.type)
        self._dense = tower.spec.tokens(size)
        self._patch(tower)
        if self.config.llm_proportional:
            size_bias.install(model, self.config.type)

    def image_span(self) -> int | None:
        """The image keeps its full token count's positions unless `positions: contiguous`."""
        return None if self.config.positions == "contiguous" else self._dense

    def image_positions(self) -> torch.Tensor | None:
        """With `positions: original`, each visual token's patch index in the last encoded images."""
        positions = self.merger.output_positions() if self.config.positions == "original" else None
        return None if positions is None else positions[:, self._dropped :] - self._dropped

    def image_sizes(self) -> torch.Tensor | None:
        """With `llm_proportional`, the patches each visual token of the last encoded images stands for."""
        sizes = self.merger.output_sizes() if self.config.llm_proportional else None
        return None if sizes is None else sizes[:, self._dropped :]

    def semantic_value(self, tower: TowerSpec) -> SemanticValue | None:
        """How merges are ranked besides redundancy (Turbo overrides; ToMe: none)."""
        return None

    def _patch(self, tower: VisionTower) -> None:
        spec = tower.spec
        layers = tower.model.get_submodule(ENCODER_BLOCKS[spec.hf_config.model_type])
        protected = int(spec.family.has_cls)
        self._dropped = cls_dropped(spec)  # CLS never reaches the LLM
        self.merger = TowerMerger(
            blocks=len(layers),
            schedule_for=self.config.schedule(spec),
            protected=protected,
            min_tokens=self.config.min_tokens,
            proportional=self.config.proportional,
            semantic=self.semantic_value(spec) if self.config.ranking()[0] > 0 else None,
            output_block=feature_block_count(spec, self.config.type) - 1,
            raster_order=self.config.order == "raster",
            meter=self._meter,
        )
        patch_encoder(layers, self.merger)


def cls_dropped(tower: TowerSpec) -> int:
    """1 when the tower's CLS token is in its encoder sequence but not in what the front-end reads."""
    return int(tower.family.has_cls and tower.cfg.feature_select == "patch")


def mergeable_blocks(tower: TowerSpec, reducer: str) -> int:
    """The tower's encoder block count, or a ConfigError naming the towers token merging supports."""
    model_type = tower.hf_config.model_type
    if model_type not in ENCODER_BLOCKS:
        raise ConfigError(
            f"reducer {reducer!r} merges tokens inside ViT encoder blocks; the {model_type!r} tower has none "
            f"it supports (supported: {', '.join(ENCODER_BLOCKS)}); use a CLIP or SigLIP tower, or an "
            "in-LLM reducer (pmod, fastv)"
        )
    return tower.depth


def feature_block_count(tower: TowerSpec, reducer: str) -> int:
    """How many encoder blocks run before the front-end's feature layer (hidden_states[feature_layer])."""
    merging = tower.feature_state
    if merging == 0:
        raise ConfigError(
            f"reducer {reducer!r}: vision.feature_layer={tower.cfg.feature_layer} selects the patch "
            "embeddings, before any encoder block, so there is nothing to merge; select a later layer"
        )
    return merging


def per_block_r(r: int | list[int], inflect: float, blocks: int, reducer: str) -> list[int]:
    """ToMe's schedule: an int is r in every block (inflect 0) or a line from ⌊r(1 − inflect)⌋ to 2r minus
    that over all blocks; a list gives the blocks in order, missing ones merging nothing."""
    if isinstance(r, list):
        if len(r) > blocks:
            raise ConfigError(
                f"{reducer}.r lists {len(r)} values but the vision tower has only {blocks} encoder blocks; "
                "give at most one value per block, or a single int for all"
            )
        return r + [0] * (blocks - len(r))
    low = int(r * (1 - inflect))
    step = (2 * r - 2 * low) / max(blocks - 1, 1)
    return [int(low + step * i) for i in range(blocks)]


def spread_budget(
    n: int, target: int, blocks: int, protected: int, min_tokens: int, reducer: str
) -> list[int]:
    """Per-block r taking n tokens to `target` over `blocks` blocks: even, the remainder to earlier blocks."""
    total = n - target
    if total < 0:
        raise ConfigError(
            f"{reducer}.tokens asks for {target} tokens per image (CLS included) but the tower gives only "
            f"{n}; lower it"
        )
    base, extra = divmod(total, blocks)
    schedule = [base + (i < extra) for i in range(blocks)]
    reached = token_trajectory(n, schedule, protected=protected, min_tokens=min_tokens)[-1]
    if reached != target:
        raise ConfigError(
            f"{reducer}.tokens cannot be reached: spreading {total} merges over {blocks} blocks leaves "
            f"{reached} tokens, not {target} (each block merges at most half its tokens and none below "
            f"min_tokens={min_tokens}); lower min_tokens, ask for more tokens, or give r per block"
        )
    return schedule
