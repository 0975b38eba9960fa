"""`vlbridge eval CKPT` and `vlbridge eval --endpoint` against `vlbridge serve` on the same checkpoint give
the same answers and scores (the server lays prompts out as the checkpoint was trained)."""

from __future__ import annotations

import json
import socket
import threading
import time

import pytest
import uvicorn

from vlbridge.cli import main
from vlbridge.serve.config import ServerConfig
from vlbridge.serve.server import build_app
from vlbridge.testing import tiny_model


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    model, tokenizer, _ = tiny_model("llama", "resnet", image_position="after")
    checkpoint = tmp_path_factory.mktemp("served") / "tiny"
    model.save_pretrained(checkpoint, tokenizer)
    port = free_port()
    app = build_app(ServerConfig(checkpoint=str(checkpoint), port=port, device="cpu"))
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "server did not start"
        time.sleep(0.05)
    yield checkpoint, f"http://127.0.0.1:{port}/v1"
    server.should_exit = True
    thread.join(timeout=30)


def test_endpoint_scores_equal_checkpoint_scores(served, tmp_path):
    checkpoint, url = served
    common = ["--suite", "shapes", "--limit", "8", "--no-progress", "shapes_caption.max_new_tokens=8"]
    assert main(["eval", str(checkpoint), *common, "--output", str(tmp_path / "local")]) == 0
    # The server places images as the checkpoint was trained, whatever order the parts arrive in.
    remote = ["eval", "--endpoint", url, "--model", "tiny", "--batch-size", "4", "--image-position", "before"]
    assert main([*remote, *common, "--output", str(tmp_path / "remote")]) == 0
    local, served_run = (json.loads((tmp_path / d / "results.json").read_text()) for d in ("local", "remote"))
    assert served_run["model"]["backend"] == "endpoint"
    for task in ("shapes_vqa", "shapes_caption"):
        assert served_run["tasks"][task]["metrics"] == local["tasks"][task]["metrics"], task
    answers = [
        [
            (s["task"], s["id"], s["prediction"])
            for s in map(json.loads, (tmp_path / d / "samples.jsonl").open())
        ]
        for d in ("local", "remote")
    ]
    assert answers[0] == answers[1]
    assert len({p for _, _, p in answers[0]}) > 1
