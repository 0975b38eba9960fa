"""KVBatch: rows joining (merge) and leaving (select) keep their cache entries, mask and position shift."""

from __future__ import annotations

import torch
from transformers import DynamicCache

from vlbridge.serve.kvcache import KVBatch


def batch(lengths: list[int], shifts: list[int], fill: float) -> KVBatch:
    """Rows left-padded to the longest; every real key/value entry holds `fill` + the row index."""
    width = max(lengths)
    mask = torch.tensor([[0] * (width - n) + [1] * n for n in lengths])
    rows = fill + torch.arange(len(lengths), dtype=torch.float)
    states = rows[:, None, None, None] * mask[:, None, :, None]
    cache = DynamicCache()
    cache.update(states.expand(-1, 2, -1, 4).clone(), states.expand(-1, 2, -1, 4).clone(), 0)
    return KVBatch(cache, mask, torch.tensor(shifts))


def test_step_positions_run_ahead_of_the_real_tokens_by_each_rows_shift():
    kv = batch([3, 5], [16, 0], fill=1.0)
    mask, positions = kv.step_inputs()
    assert mask.shape == (2, 6) and positions.tolist() == [[3 + 16], [5]]


def test_merge_and_select_carry_the_shift_with_the_row():
    kv = batch([3, 5], [16, 0], fill=1.0).merge(batch([7], [4], fill=10.0))
    assert kv.mask.sum(-1).tolist() == [3, 5, 7] and kv.shift.tolist() == [16, 0, 4]
    kv = kv.select([2, 0])  # the middle row finished; order changes
    assert kv.shift.tolist() == [4, 16] and kv.mask.sum(-1).tolist() == [7, 3]
    keys = kv.cache.layers[0].keys
    assert keys[0, 0, :, 0].tolist() == [10.0] * 7 and keys[1, 0, -3:, 0].tolist() == [1.0] * 3
    assert kv.step_inputs()[1].tolist() == [[7 + 4], [3 + 16]]


def test_the_key_bias_follows_its_row_and_new_tokens_get_none():
    kv = batch([3, 5], [0, 0], fill=1.0)
    kv.bias = torch.tensor([[0.0, 0.0, 0.0, 0.7, 0.0], [0.0, 1.1, 0.0, 0.0, 0.0]])
    kv = kv.merge(batch([2], [0], fill=10.0))  # a row without reduced images joins
    assert kv.bias.tolist()[2] == [0.0] * 5
    kv = kv.select([2, 0])  # the 5-token row leaves: two columns of padding go
    kv.step_inputs()
    assert torch.allclose(kv.bias, torch.tensor([[0.0, 0, 0, 0], [0, 0.7, 0, 0]]))
