"""BatchLoader: micro-batches built in DataLoader workers equal the in-process `EncodedSamples` batches, in
order, with exact drop counts and exact resumption; length grouping measured on the real padded batches."""

from __future__ import annotations

import json
import random

import pytest
import torch
from PIL import Image

from vlbridge.data.formats import LlavaJsonConfig, load_source
from vlbridge.processing import DropCounter
from vlbridge.testing import tiny_processor
from vlbridge.training.batches import EncodedSamples
from vlbridge.training.loader import BatchLoader
from vlbridge.training.sampler import BatchOrder, make_order

WORDS = "red blue green circle square triangle left right of the small large shape image".split()


@pytest.fixture(scope="module")
def processor():
    return tiny_processor()


def write_llava(folder, n: int = 30, *, seed: int = 0, too_long: bool = True) -> str:
    """`n` LLaVA records over 4 images of different sizes, some text-only; `too_long`: every 7th is too
    long to keep (its image would be cut) and every 9th has an answer to truncate."""
    rng = random.Random(seed)
    (folder / "images").mkdir(parents=True)
    for k, size in enumerate([(40, 30), (32, 32), (64, 48), (20, 50)]):
        Image.new("RGB", size, (60 * k, 200 - 40 * k, 90)).save(folder / "images" / f"{k}.png")
    records = []
    for i in range(n):
        words = " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 40)))
        question = ("circle " * 300 if too_long and i % 7 == 3 else "") + "<image>\nWhat is it?"
        record = {"id": f"r{i}", "conversations": [{"from": "human", "value": question}]}
        record["conversations"].append(
            {"from": "gpt", "value": words * (8 if too_long and i % 9 == 4 else 1)}
        )
        if i % 5 == 2:  # text only
            record["conversations"][0]["value"] = words
        else:
            record["image"] = f"images/{i % 4}.png"
        records.append(record)
    path = folder / "data.json"
    path.write_text(json.dumps(records, indent=1))
    return str(path)


def assert_same_batches(got: list, expected: list) -> None:
    assert len(got) == len(expected)
    for k, (a, b) in enumerate(zip(got, expected, strict=True)):
        assert (a is None) == (b is None), k
        if a is None:
            continue
        assert a.keys() == b.keys()
        for key in a:
            if torch.is_tensor(b[key]):
                assert torch.equal(a[key], b[key]), (k, key)
            else:
                assert a[key] == b[key], (k, key)


def test_workers_give_the_in_process_batches_in_order(processor, tmp_path) -> None:
    samples = load_source(LlavaJsonConfig(path=write_llava(tmp_path)))
    order = BatchOrder(len(samples), 4, seed=3)
    steps = 18  # past two epochs of 30 samples
    reference_drops = DropCounter()
    reference = EncodedSamples(samples, processor, reference_drops, cache=False)
    expected = [reference.batch(order.batch(k)) for k in range(steps)]
    assert reference_drops.counts.get("image_truncated")

    runs = {}
    for workers in (0, 2):
        drops = DropCounter()
        runs[workers] = list(
            BatchLoader(samples, processor, order, 0, steps, num_workers=workers, drops=drops)
        )
        assert_same_batches(runs[workers], expected)
        assert drops.counts == reference_drops.counts, workers

    # resuming at micro-step 7 gives what the uninterrupted run gave from there, drops included
    drops = DropCounter()
    resumed = list(BatchLoader(samples, processor, order, 7, steps, num_workers=2, drops=drops))
    assert_same_batches(resumed, expected[7:])
    tail_drops = DropCounter()
    tail = EncodedSamples(samples, processor, tail_drops, cache=False)
    for k in range(7, steps):
        tail.batch(order.batch(k))
    assert drops.counts == tail_drops.counts


class Scripted:
    """An order that is a fixed list of batches."""

    def __init__(self, batches: list[list[int]]) -> None:
        self.batches = batches

    def batch(self, k: int) -> list[int]:
        return self.batches[k]


def test_a_batch_whose_samples_all_drop_is_none(processor, tmp_path) -> None:
    samples = load_source(LlavaJsonConfig(path=write_llava(tmp_path)))
    order = Scripted([[0, 1], [3, 10, 24], [2]])  # 3, 10, 24: image samples too long to keep
    for workers in (0, 2):
        drops = DropCounter()
        batches = list(BatchLoader(samples, processor, order, 0, 3, num_workers=workers, drops=drops))
        assert batches[1] is None and batches[0]["input_ids"].shape[0] == 2 and batches[2] is not None
        assert drops.counts == {"image_truncated": 3}


def test_a_worker_error_names_the_sample(processor, tmp_path) -> None:
    samples = load_source(LlavaJsonConfig(path=write_llava(tmp_path)))
    (tmp_path / "images" / "1.png").unlink()
    with pytest.raises(Exception, match=r"sample r1: image file not found: .*images/1\.png"):
        list(BatchLoader(samples, processor, Scripted([[0], [1]]), 0, 2, num_workers=1))


def test_length_grouping_cuts_real_padding(processor, tmp_path) -> None:
    """Padding tokens of the padded batches themselves, random vs length-grouped (8 micro-batches a group)."""
    samples = load_source(LlavaJsonConfig(path=write_llava(tmp_path, 64, seed=1, too_long=False)))
    steps, padded = 16, {}
    for name in ("random", "length_grouped"):
        order = make_order(name, samples, 4, seed=0, group=8)
        batches = [b for b in BatchLoader(samples, processor, order, 0, steps) if b is not None]
        padded[name] = sum(int((b["attention_mask"] == 0).sum()) for b in batches)
    assert padded["length_grouped"] < 0.5 * padded["random"], padded
