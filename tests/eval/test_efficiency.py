"""Measurement primitives: CPU peak memory follows the live tensors of the measured block; the decode clock
stamps every generated token."""

from __future__ import annotations

import sys

import pytest
import torch
from PIL import Image
from transformers import LogitsProcessorList

from vlbridge.eval.efficiency import TokenClock, peak_memory
from vlbridge.testing import tiny_model
from vlbridge.tokenization import generation_kwargs

CPU = torch.device("cpu")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the CPU peak reads Linux's /proc")
def test_cpu_peak_memory_matches_the_largest_live_set():
    mb = 2**20
    with peak_memory(CPU) as small:
        a = torch.ones(16 * mb // 4)  # 16 MiB live
        del a
    with peak_memory(CPU) as large:
        a = torch.ones(64 * mb // 4)
        b = torch.ones(64 * mb // 4)  # 128 MiB live at the peak
        del a, b
    # A block that frees what an earlier one allocated must not inherit its peak (the mark is reset).
    with peak_memory(CPU) as again_small:
        c = torch.ones(16 * mb // 4)
        del c
    assert 15 * mb <= small["bytes"] <= 24 * mb
    assert 127 * mb <= large["bytes"] <= 140 * mb
    assert 15 * mb <= again_small["bytes"] <= 24 * mb


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the CPU peak reads Linux's /proc")
def test_cpu_peak_memory_counts_heap_memory_freed_before_the_block():
    mb = 2**20
    chunk = mb // 2 // 4  # 0.5 MiB tensors: below the mmap threshold, so they live on glibc's heap
    garbage, pins = [], []
    for _ in range(200):
        garbage.append(torch.ones(chunk))
        pins.append(torch.ones(4096))  # live neighbours: the freed chunks cannot merge and be trimmed
    del garbage  # 100 MiB of free heap chunks that the block below could reuse unseen
    with peak_memory(CPU) as peak:
        kept = [torch.ones(chunk) for _ in range(100)]  # 50 MiB live
        del kept
    del pins
    assert 45 * mb <= peak["bytes"] <= 60 * mb


def test_token_clock_stamps_one_step_per_generated_token():
    model, tokenizer, processor = tiny_model("llama", "clip_vision_model")
    image = Image.new("RGB", (32, 32), "red")
    batch = processor([[{"role": "user", "content": "<image>\nhello"}]], [[image]])
    clock = TokenClock(CPU)
    kwargs = generation_kwargs(tokenizer) | {"max_new_tokens": 5, "min_new_tokens": 5, "do_sample": False}
    new = model.generate(**batch, **kwargs, logits_processor=LogitsProcessorList([clock]))
    assert new.shape[1] == len(clock.stamps) == 5
    assert clock.stamps == sorted(clock.stamps) and clock.decode_seconds() > 0
    with pytest.raises(ValueError, match="two generated tokens"):
        TokenClock(CPU).decode_seconds()
