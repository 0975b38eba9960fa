"""Per-row sampling: nucleus filtering keeps the right tokens, seeds make rows reproducible."""

from __future__ import annotations

import torch

from vlbridge.serve.sampling import SamplingParams, pick_token, row_generator, top_p_filter


def test_top_p_keeps_the_smallest_set_reaching_the_mass():
    probs = torch.tensor([0.05, 0.5, 0.3, 0.15])
    kept = top_p_filter(probs, 0.7)
    assert torch.allclose(kept, torch.tensor([0.0, 0.5, 0.3, 0.0]) / 0.8)
    assert torch.equal(top_p_filter(probs, 0.5) > 0, torch.tensor([False, True, False, False]))


def test_same_seed_and_choice_same_tokens_other_choice_other_stream():
    logits = torch.zeros(50)
    params = SamplingParams(max_tokens=1, temperature=1.0)

    def draw(seed, choice):
        g = row_generator(seed, choice, torch.device("cpu"))
        return [pick_token(logits, params, g) for _ in range(20)]

    assert draw(7, 0) == draw(7, 0)
    assert draw(7, 0) != draw(7, 1)
    assert draw(7, 0) != draw(8, 0)


def test_greedy_and_top_p_zero_take_the_argmax():
    logits = torch.tensor([0.1, 3.0, 2.9])
    g = row_generator(None, 0, torch.device("cpu"))
    assert pick_token(logits, SamplingParams(1, temperature=0.0), g) == 1
    assert pick_token(logits, SamplingParams(1, temperature=1.0, top_p=0.0), g) == 1
