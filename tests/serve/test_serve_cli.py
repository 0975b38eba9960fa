"""`vlbridge serve` refuses bad settings with one line naming the problem, before it listens."""

from __future__ import annotations

import socket

import pytest

from vlbridge.cli import main


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--allowed-domains", "example.com"], "--allowed-domains only applies with --allow-remote-images"),
        (["--reducer", "nosuch"], "unknown reducer 'nosuch'"),
        (["--port", "70000"], "port"),
        (["--max-model-len", "100000"], "max_position_embeddings (512)"),
        (["--max-batch-size", "0"], "max_batch_size"),
    ],
)
def test_serve_user_errors(checkpoint, capsys, args, message):
    assert main(["serve", str(checkpoint), *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and "Traceback" not in err


def test_serve_without_a_checkpoint(tmp_path, capsys):
    assert main(["serve", str(tmp_path / "nowhere")]) == 2
    assert "no vlbridge model under" in capsys.readouterr().err


def test_serve_on_a_port_in_use_says_so(checkpoint, capsys):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert main(["serve", str(checkpoint), "--port", str(port)]) == 2
    err = capsys.readouterr().err
    assert f"could not listen on 127.0.0.1:{port}" in err and "Traceback" not in err
