"""The endpoint backend speaks the OpenAI chat completions protocol (checked against a stub on loopback)."""

from __future__ import annotations

import base64
import io
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from PIL import Image

from vlbridge.cli import main
from vlbridge.eval.backends import EndpointBackend, EndpointError, Request
from vlbridge.eval.loaders import load_examples
from vlbridge.eval.runner import run_task
from vlbridge.eval.tasks import load_task


class Stub:
    """A chat completions server on 127.0.0.1 that records requests and replays scripted statuses."""

    def __init__(self) -> None:
        self.requests: list[dict] = []
        self.statuses: list[int] = []  # popped per request; empty -> 200
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 - http.server's naming
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                stub.requests.append(
                    {"path": self.path, "auth": self.headers.get("Authorization"), "body": body}
                )
                status = stub.statuses.pop(0) if stub.statuses else 200
                if status == 200:
                    text = next(p["text"] for p in body["messages"][-1]["content"] if p["type"] == "text")
                    payload = {
                        "choices": [
                            {"index": 0, "message": {"role": "assistant", "content": f" {len(text)}\n"}}
                        ]
                    }
                else:
                    payload = {
                        "error": {"message": f"scripted {status}", "type": "x", "param": None, "code": None}
                    }
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


@pytest.fixture
def stub():
    server = Stub()
    yield server
    server.server.shutdown()


def decode(url: str) -> Image.Image:
    header, data = url.split(",", 1)
    assert header == "data:image/png;base64"
    return Image.open(io.BytesIO(base64.b64decode(data))).convert("RGB")


@pytest.mark.parametrize("position", ["after", "before"])
def test_protocol(stub, position):
    task = load_task("shapes_vqa", {"data": {"n": 3}, "max_new_tokens": 5})
    backend = EndpointBackend(stub.url, "tiny", api_key="secret", image_position=position, concurrency=2)
    result = run_task(task, backend, batch_size=2, progress=False)
    examples = load_examples(task.data)
    assert len(stub.requests) == 3
    by_question = {
        r["body"]["messages"][0]["content"][0 if position == "after" else 1]["text"]: r for r in stub.requests
    }
    for example, answer in zip(examples, result.raw, strict=True):
        sent = by_question[example.fields["question"]]
        assert sent["path"] == "/v1/chat/completions" and sent["auth"] == "Bearer secret"
        body = sent["body"]
        assert (body["model"], body["temperature"], body["max_tokens"]) == ("tiny", 0, 5)
        (message,) = body["messages"]
        kinds = [p["type"] for p in message["content"]]
        assert kinds == (["text", "image_url"] if position == "after" else ["image_url", "text"])
        image = next(p for p in message["content"] if p["type"] == "image_url")["image_url"]["url"]
        assert decode(image).tobytes() == example.load_images()[0].tobytes()  # lossless
        assert answer == str(len(example.fields["question"]))  # the stub's reply, stripped


def test_retries_then_reports_server_errors(stub):
    backend = EndpointBackend(stub.url + "/chat/completions", "tiny", retries=2)
    task = load_task("shapes_vqa", {"data": {"n": 1}})
    stub.statuses = [503, 502]
    assert run_task(task, backend, progress=False).raw[0].isdigit()
    assert len(stub.requests) == 3
    stub.statuses = [401]
    with pytest.raises(EndpointError, match="answered 401: scripted 401"):
        run_task(task, EndpointBackend(stub.url, "tiny"), progress=False)


def test_cli_endpoint_errors(stub, capsys):
    stub.statuses = [404]
    argv = [
        "eval",
        "--endpoint",
        stub.url,
        "--model",
        "nope",
        "--task",
        "shapes_vqa",
        "--limit",
        "1",
        "--no-progress",
    ]
    assert main(argv) == 2
    assert "answered 404" in capsys.readouterr().err
    closed = "http://127.0.0.1:9/v1"
    with pytest.raises(EndpointError, match="cannot reach"):
        EndpointBackend(closed, "m", retries=0).generate(
            [Request([{"role": "user", "content": "hi"}], [])], 4
        )
