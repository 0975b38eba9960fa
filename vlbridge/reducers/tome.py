"""ToMe (Bolya et al., ICLR 2023): bipartite soft matching, the most similar token pairs merge first —
Turbo with λ = 0 and no token threshold. Spec: ../shared/specs/reduction_baselines.md §B; the shared
machinery is token_merging.py.
"""

from __future__ import annotations

from ..registry import REDUCERS
from .token_merging import TokenMergeConfig, TokenMerging


class TomeConfig(TokenMergeConfig):
    """ToMe: merges ranked by key similarity alone (Turbo with λ = 0, no token threshold)."""

    type: str = "tome"


@REDUCERS.register("tome", config=TomeConfig)
class Tome(TokenMerging):
    """ToMe's bipartite soft matching: the most similar pairs merge first (λ = 0)."""
