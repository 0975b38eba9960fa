"""The running batch's KV cache: rows join (left-padded to a common length) and leave between steps.

Every row's cache is aligned on the right; a row shorter than the batch has masked zero columns on
its left. Positions come from each row's own count of real tokens, so a row's attention sees exactly
what it would see alone (the padding is masked out), whatever joins or leaves around it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from transformers import DynamicCache


@dataclass
class KVBatch:
    """A DynamicCache over B rows plus their attention mask [B, T] (1 = real token), per row how far its
    positions run ahead of its real-token count (non-zero where reduced images keep a dense span), and
    the keys' attention bias [B, T] where merged visual tokens weigh by their size (None: none)."""

    cache: DynamicCache
    mask: torch.Tensor
    shift: torch.Tensor  # [B]
    bias: torch.Tensor | None = None
    # keywords every step's LLM call repeats (a deep-fusion front-end's per-row memory); such a batch is
    # static: its rows never join or leave another's
    call_kwargs: dict = field(default_factory=dict)

    @property
    def rows(self) -> int:
        return self.mask.shape[0]

    def step_inputs(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Extend the mask by the column the next token fills; (mask [B, T+1], position ids [B, 1])."""
        self.mask = F.pad(self.mask, (0, 1), value=1)
        if self.bias is not None:
            self.bias = F.pad(self.bias, (0, 1))
        return self.mask, (self.mask.sum(-1) - 1 + self.shift)[:, None]

    def merge(self, other: KVBatch) -> KVBatch:
        """This batch's rows followed by `other`'s, left-padded to the longer cache."""
        self._refuse_row_changes()
        width = max(self.mask.shape[1], other.mask.shape[1])
        for mine, theirs in zip(self.cache.layers, other.cache.layers, strict=True):
            mine.keys = torch.cat([_left_pad(mine.keys, width), _left_pad(theirs.keys, width)])
            mine.values = torch.cat([_left_pad(mine.values, width), _left_pad(theirs.values, width)])
        if self.bias is not None or other.bias is not None:
            self.bias = torch.cat([_left_pad_columns(b._bias_or_zeros(), width) for b in (self, other)])
        self.mask = torch.cat([_left_pad_columns(self.mask, width), _left_pad_columns(other.mask, width)])
        self.shift = torch.cat([self.shift, other.shift])
        return self

    def contiguous(self) -> KVBatch:
        """Every layer's keys and values in a block of their own (a batch cut from a larger one holds
        slices): the layout a compiled step was built for."""
        for layer in self.cache.layers:
            layer.keys, layer.values = layer.keys.contiguous(), layer.values.contiguous()
        return self

    def _refuse_row_changes(self) -> None:
        if self.call_kwargs:
            raise RuntimeError(
                f"this batch carries per-row call keywords ({', '.join(self.call_kwargs)}): its rows are "
                "tied together until it ends, so the engine must run it as a static batch"
            )

    @property
    def nbytes(self) -> int:
        states = sum(layer.keys.nbytes + layer.values.nbytes for layer in self.cache.layers)
        return states + (0 if self.bias is None else self.bias.nbytes)

    def row(self, i: int) -> KVBatch:
        """Row `i` alone, only its real tokens, in tensors of its own (the batch goes on changing)."""
        columns = self.mask[i].nonzero().flatten()
        bias = None if self.bias is None else self.bias[i : i + 1, columns]
        mask = self.mask[i : i + 1, columns]
        return self._rebuilt(lambda states: states[i : i + 1, :, columns], mask, self.shift[i : i + 1], bias)

    def prefix(self, length: int, rows: int, next_position: int) -> KVBatch:
        """`rows` copies of this one-row batch's first `length` tokens, after which the next token sits at
        RoPE position `next_position`."""
        mask = self.mask[:, :length].expand(rows, -1)
        shift = self.shift.new_full((rows,), next_position - length)
        bias = None if self.bias is None else self.bias[:, :length].expand(rows, -1)
        return self._rebuilt(lambda states: states[:, :, :length].expand(rows, -1, -1, -1), mask, shift, bias)

    def _rebuilt(self, pick, mask: torch.Tensor, shift: torch.Tensor, bias: torch.Tensor | None) -> KVBatch:
        """A batch in fresh tensors: `pick` of every layer's keys and values, with this mask, shift, bias."""
        self._refuse_row_changes()
        cache = DynamicCache()
        for index, layer in enumerate(self.cache.layers):
            cache.update(pick(layer.keys), pick(layer.values), index)  # copies
        return KVBatch(cache, mask.clone(), shift.clone(), None if bias is None else bias.clone())

    def continued(
        self, mask: torch.Tensor, bias: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The attention mask and key bias [B, T + S] of a call that runs S more tokens on these rows
        (their `mask` and `bias` [B, S]; bias None: none)."""
        joined = torch.cat([self.mask, mask.to(self.mask.dtype)], dim=1)
        if self.bias is None and bias is None:
            return joined, None
        more = torch.zeros(mask.shape, device=mask.device) if bias is None else bias
        return joined, torch.cat([self._bias_or_zeros(), more], dim=1)

    def _bias_or_zeros(self) -> torch.Tensor:
        return self.bias if self.bias is not None else torch.zeros(self.mask.shape, device=self.mask.device)

    def select(self, keep: list[int]) -> KVBatch:
        """Only rows `keep` (in that order), then drop leading columns that are padding in every row."""
        self._refuse_row_changes()
        index = torch.tensor(keep, device=self.mask.device)
        self.mask, self.shift = self.mask.index_select(0, index), self.shift.index_select(0, index)
        first = int(self.mask.any(0).nonzero()[0]) if self.mask.numel() else 0
        self.mask = self.mask[:, first:]
        if self.bias is not None:
            self.bias = self.bias.index_select(0, index)[:, first:]
        for layer in self.cache.layers:
            layer.keys = layer.keys.index_select(0, index)[:, :, first:]
            layer.values = layer.values.index_select(0, index)[:, :, first:]
        return self


def _left_pad(states: torch.Tensor, width: int) -> torch.Tensor:
    """[B, H, T, D] -> [B, H, width, D] with zeros on the left of the sequence axis."""
    return F.pad(states, (0, 0, width - states.shape[-2], 0))


def _left_pad_columns(columns: torch.Tensor, width: int) -> torch.Tensor:
    """[B, T] -> [B, width], zeros on the left (masks and key biases)."""
    return F.pad(columns, (width - columns.shape[1], 0), value=0)
