"""Streaming datasets: read in `datasets`' shuffled order, split across ranks, resumed at the exact sample
(with and without a shuffle buffer, across epochs), and batched by StreamLoader in workers."""

from __future__ import annotations

import io
import json
from itertools import islice

import pytest
import torch
from PIL import Image

from vlbridge.data.formats import hf_row_converter
from vlbridge.data.io import load_image
from vlbridge.data.streaming import HFStreamConfig, StreamingSamples, open_stream
from vlbridge.processing import DropCounter
from vlbridge.testing import tiny_processor
from vlbridge.training.loader import StreamLoader

datasets = pytest.importorskip("datasets")
N = 20


def png(i: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (24 + i, 16), (10 * i, 100, 200 - 5 * i)).save(buffer, format="PNG")
    return buffer.getvalue()


def rows() -> list[dict]:
    """Rows 0, 3, 6, ... have an image; row 6's question is too long to keep with it."""
    out = []
    for i in range(N):
        question = ("circle " * 300 if i == 6 else "") + ("What color?" if i % 3 else "<image>\nWhat color?")
        out.append(
            {
                "id": f"s{i}",
                "image": None if i % 3 else {"bytes": png(i), "path": None},
                "messages": [
                    {"role": "user", "content": question},
                    {"role": "assistant", "content": "red " * (1 + i % 4)},
                ],
            }
        )
    return out


@pytest.fixture(scope="module")
def iterable():
    dataset = datasets.Dataset.from_list(rows()).cast_column("image", datasets.Image())
    return dataset.to_iterable_dataset(num_shards=4)


def stream(iterable, buffer: int, rank: int = 0, world: int = 1) -> StreamingSamples:
    convert = hf_row_converter("messages", "image")
    return StreamingSamples(iterable, convert, seed=11, buffer_size=buffer, rank=rank, world=world)


def ids(samples) -> list[str]:
    return [s["id"] for s in samples]


@pytest.mark.parametrize("buffer", [0, 1, 8])
def test_resume_continues_at_the_exact_sample(iterable, buffer) -> None:
    reader = stream(iterable, buffer)
    uninterrupted = ids(islice(reader, 3 * N))  # three epochs
    for stop in (5, N, N + 7, 2 * N + 13):
        first = stream(iterable, buffer)
        read = ids(islice(first, stop))
        state = json.loads(json.dumps(first.state_dict()))  # as a checkpoint would hold it
        resumed = stream(iterable, buffer)
        resumed.load_state_dict(state)
        assert read + ids(islice(resumed, 3 * N - stop)) == uninterrupted, stop
    for epoch in range(3):
        assert sorted(uninterrupted[epoch * N : (epoch + 1) * N]) == sorted(f"s{i}" for i in range(N))
    if buffer:  # reshuffled each epoch
        assert len({tuple(uninterrupted[e * N : (e + 1) * N]) for e in range(3)}) > 1
    else:
        assert uninterrupted[:N] == [f"s{i}" for i in range(N)]


def test_ranks_split_every_epoch(iterable) -> None:
    per_rank = [ids(islice(stream(iterable, 8, rank, 2), N // 2)) for rank in range(2)]
    assert not set(per_rank[0]) & set(per_rank[1])
    assert sorted(per_rank[0] + per_rank[1]) == sorted(f"s{i}" for i in range(N))


def test_images_stay_bytes_until_opened(iterable) -> None:
    sample = next(iter(stream(iterable, 0)))
    (image,) = sample["images"]
    assert isinstance(image, dict) and image["bytes"] == png(0)
    assert load_image(image).size == (24, 16)


def test_stream_loader_workers_resume_and_drops(iterable) -> None:
    processor = tiny_processor()
    steps, batch_size = 9, 4  # 36 samples: past the first epoch
    read = ids(islice(stream(iterable, 8), steps * batch_size))
    runs = {}
    for workers in (0, 2):
        drops = DropCounter()
        runs[workers] = list(
            StreamLoader(stream(iterable, 8), processor, batch_size, steps, num_workers=workers, drops=drops)
        )
        assert drops.counts == {"image_truncated": read.count("s6")}  # once or twice in 36 samples
    for a, b in zip(runs[0], runs[2], strict=True):
        assert all(torch.equal(a[k], b[k]) for k in ("input_ids", "labels", "attention_mask"))
        assert (a["pixel_values"] is None) == (b["pixel_values"] is None)

    first = StreamLoader(stream(iterable, 8), processor, batch_size, 4, num_workers=2)
    head = list(first)  # workers read ahead, but the state is the one after batch 4
    assert first.state_dict()["consumed"] == 4 * batch_size
    resumed_stream = stream(iterable, 8)
    resumed_stream.load_state_dict(first.state_dict())
    tail = list(StreamLoader(resumed_stream, processor, batch_size, steps - 4, num_workers=2))
    for a, b in zip(head + tail, runs[0], strict=True):
        assert torch.equal(a["input_ids"], b["input_ids"])


def test_open_stream_reads_json_files(tmp_path) -> None:
    paths = []
    for part in range(2):
        path = tmp_path / f"part{part}.jsonl"
        chunk = rows()[part * 10 : (part + 1) * 10]
        path.write_text("\n".join(json.dumps({"id": r["id"], "messages": r["messages"]}) for r in chunk))
        paths.append(str(path))
    cfg = HFStreamConfig(path="json", data_files=paths, image_column="none", shuffle_buffer=4)
    per_rank = [ids(islice(open_stream(cfg, seed=0, rank=r, world=2), N // 2)) for r in range(2)]
    assert sorted(per_rank[0] + per_rank[1]) == sorted(f"s{i}" for i in range(N))
    limited = open_stream(cfg.model_copy(update={"limit": 6}), seed=0, rank=1, world=2)
    got = ids(islice(limited, 9))  # epochs of 3 samples on each of the 2 ranks
    assert len(set(got)) >= 3 and all(len(set(got[e * 3 : e * 3 + 3])) == 3 for e in range(3))
