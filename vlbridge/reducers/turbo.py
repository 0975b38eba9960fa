"""Turbo (Ju et al., ECCV 2024): token merging ranked by redundancy minus λ × semantic value (the CLS
token's attention, or the mean attention a token receives). Spec: ../shared/specs/turbo.md; the shared
machinery is token_merging.py.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, NonNegativeInt

from ..errors import ConfigError
from ..registry import REDUCERS
from ..vision_towers import TowerSpec
from .token_merging import TokenMergeConfig, TokenMerging
from .tower_merge import SEMANTIC_VALUES, SemanticValue


class TurboConfig(TokenMergeConfig):
    """Turbo: information degree = redundancy − λ_l · semantic value, λ_l = β^|γ − t| · lam (§3 step 6)."""

    type: str = "turbo"
    lam: float = Field(default=500.0, ge=0)  # α·c: 5·100 in the official LLaVA code (BLIP: 5·30 = 150)
    beta: float = Field(default=1.0, gt=0)  # layer decay; the official defaults (1, 0) keep λ constant
    gamma: float = Field(default=0.0, ge=0)
    # auto: the CLS attention row where the tower has CLS (CLIP), else the mean attention received (SigLIP)
    semantic: Literal["auto", "cls", "mean_received", "none"] = "auto"
    min_tokens: NonNegativeInt = 40

    def ranking(self) -> tuple[float, float, float]:
        return self.lam, self.beta, self.gamma


@REDUCERS.register("turbo", config=TurboConfig)
class Turbo(TokenMerging):
    """Informativity-driven merging: redundant and semantically weak tokens merge first."""

    config: TurboConfig

    def semantic_value(self, tower: TowerSpec) -> SemanticValue | None:
        name = self.config.semantic
        if name == "auto":
            name = "cls" if tower.family.has_cls else "mean_received"
        if name == "cls" and not tower.family.has_cls:
            raise ConfigError(
                f"turbo.semantic='cls' but the {tower.hf_config.model_type} tower has no CLS token; use "
                "'auto' (mean attention received), 'mean_received' or 'none'"
            )
        return SEMANTIC_VALUES[name]
