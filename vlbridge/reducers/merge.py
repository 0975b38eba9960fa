"""Bipartite soft matching and size-weighted merging: the tensor core of ToMe and Turbo.

Pure functions on one encoder block's tokens ([B, N, C], spec turbo.md §3 steps 3-10): `budget` clips
a block's r, `match` decides which tokens merge into which, `merge_weighted` applies that plan to the
features and their sizes, `unmerge` copies merged tokens back to their sources. Everything is batched
gathers and scatters; nothing loops over tokens.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F


def budget(r: int, n: int, *, protected: int, min_tokens: int) -> int:
    """How many tokens a block with scheduled `r` merges away from `n` (§3 step 3).

    r is clipped to ⌊(n − protected)/2⌋ so the protected token (CLS) never has to merge, and a block
    whose input is shorter than `min_tokens` (the official r_threshold) merges nothing.
    """
    if n < min_tokens:
        return 0
    return max(0, min(r, (n - protected) // 2))


def token_trajectory(n: int, schedule: Sequence[int], *, protected: int, min_tokens: int) -> list[int]:
    """Token counts entering the first block and leaving every block: [n, n₁, …, n_L]."""
    counts = [n]
    for r in schedule:
        counts.append(counts[-1] - budget(r, counts[-1], protected=protected, min_tokens=min_tokens))
    return counts


@dataclass(frozen=True)
class MergePlan:
    """One block's merge decision, as indices [B, *, 1] into the even (𝒜) and odd (𝓑) token halves."""

    unmerged: torch.Tensor  # [B, |𝒜| − r, 1] 𝒜 tokens that stay, ascending
    sources: torch.Tensor  # [B, r, 1] 𝒜 tokens merged away, highest information degree first
    destinations: torch.Tensor  # [B, r, 1] the 𝓑 token each source joins

    @property
    def r(self) -> int:
        return self.sources.shape[1]


@torch.no_grad()
def match(
    metric: torch.Tensor,
    r: int,
    *,
    semantic: torch.Tensor | None = None,
    lam: float = 0.0,
    protect_first: bool = False,
) -> MergePlan:
    """Pick the r merges of one block (§3 steps 4-8).

    metric [B, N, C] (keys averaged over heads) gives the cosine similarity S between the even tokens 𝒜
    and the odd tokens 𝓑; each source i ∈ 𝒜 targets its most similar 𝓑 token, and the r sources with the
    highest information degree e_i = max_j S_ij − λ·a_i merge (a = `semantic` [B, N], the attention each
    token receives; λ = 0 or no `semantic` is ToMe). `protect_first` keeps token 0 (CLS) out of the sources.
    """
    metric = F.normalize(metric.float(), dim=-1)
    similarity = metric[:, ::2] @ metric[:, 1::2].transpose(1, 2)  # [B, |𝒜|, |𝓑|]
    degree, destination = similarity.max(dim=-1)  # [B, |𝒜|]; λ·a_i is constant along a row (§3 step 7)
    if semantic is not None and lam != 0:
        degree = degree - lam * semantic[:, ::2].float()
    if protect_first:
        degree[:, 0] = -torch.inf
    ranked = degree.argsort(dim=-1, descending=True)[..., None]  # [B, |𝒜|, 1]
    sources = ranked[:, :r]
    return MergePlan(
        unmerged=ranked[:, r:].sort(dim=1).values,
        sources=sources,
        destinations=destination[..., None].gather(1, sources),
    )


def merge(x: torch.Tensor, plan: MergePlan) -> torch.Tensor:
    """[B, N, C] -> [B, N − r, C]: [unmerged 𝒜 ascending] + [𝓑 with their sources summed in] (§3 step 10)."""
    width = x.shape[-1]
    even, odd = x[:, ::2], x[:, 1::2]
    kept = even.gather(1, plan.unmerged.expand(-1, -1, width))
    moved = even.gather(1, plan.sources.expand(-1, -1, width))
    odd = odd.scatter_add(1, plan.destinations.expand(-1, -1, width), moved)
    return torch.cat([kept, odd], dim=1)


def merge_weighted(
    x: torch.Tensor, sizes: torch.Tensor, plan: MergePlan
) -> tuple[torch.Tensor, torch.Tensor]:
    """Size-weighted average of every merged group (§3 step 9): x [B, N, C], sizes [B, N, 1]."""
    total = merge(x * sizes, plan)
    sizes = merge(sizes, plan)
    return total / sizes, sizes


def merge_positions(positions: torch.Tensor, plan: MergePlan) -> torch.Tensor:
    """Original index of each merged token's representative (its 𝓑 token if merged): [B, N − r, 1]."""
    kept = positions[:, ::2].gather(1, plan.unmerged)
    return torch.cat([kept, positions[:, 1::2]], dim=1)


def unmerge(x: torch.Tensor, plan: MergePlan) -> torch.Tensor:
    """[B, N − r, C] -> [B, N, C]: each source gets a copy of the token it merged into (ToMe's unmerge)."""
    batch, _, width = x.shape
    n_kept = plan.unmerged.shape[1]
    kept, odd = x[:, :n_kept], x[:, n_kept:]
    out = x.new_empty(batch, n_kept + plan.r + odd.shape[1], width)  # |𝒜| + |𝓑| = N
    out[:, 1::2] = odd
    out.scatter_(1, (2 * plan.unmerged).expand(-1, -1, width), kept)
    moved = odd.gather(1, plan.destinations.expand(-1, -1, width))
    out.scatter_(1, (2 * plan.sources).expand(-1, -1, width), moved)
    return out
