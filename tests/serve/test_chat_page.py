"""`vlbridge serve` from the command line, and its chat page in a real headless Chromium: pick an
image, ask, and watch the answer stream in; it equals the API's greedy answer to the same question."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from serve_kit import image_message

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def cli_server(checkpoint, tmp_path_factory):
    """`python -m vlbridge.cli serve CHECKPOINT --port P --api-key K` as a child process."""
    port = _free_port()
    log = tmp_path_factory.mktemp("cli-server") / "server.log"
    command = [sys.executable, "-m", "vlbridge.cli", "serve", str(checkpoint), "--port", str(port)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "VLBRIDGE_API_KEY": "page-key"}
    with log.open("w") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        assert process.poll() is None, log.read_text()
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                break
        except httpx.TransportError:
            pass
        assert time.monotonic() < deadline, log.read_text()
        time.sleep(0.2)
    yield url
    process.terminate()
    process.wait(timeout=30)


def _chromium_or_reason() -> str | None:
    if not Path(CHROMIUM).exists():
        return f"{CHROMIUM} is missing: apt-get install -y chromium"
    try:
        import playwright  # noqa: F401
    except ImportError:
        return "the playwright package is missing: pip install -e '.[dev]'"
    return None


def test_cli_server_answers_with_the_key_from_the_environment(cli_server):
    headers = {"Authorization": "Bearer page-key"}
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}
    url = f"{cli_server}/v1/chat/completions"
    assert httpx.post(url, json=body, headers=headers, timeout=60).status_code == 200
    assert httpx.post(url, json=body, timeout=60).status_code == 401


def test_chat_page_streams_an_answer_about_a_picked_image(cli_server, red_image, tmp_path):
    reason = _chromium_or_reason()  # scripts/test.sh installs Chromium; a missing one is a failure
    assert reason is None, reason
    from playwright.sync_api import sync_playwright

    image_path = tmp_path / "red.png"
    red_image.save(image_path)
    question = "What color is the circle?"
    expected = httpx.post(
        f"{cli_server}/v1/chat/completions",
        json={"messages": [image_message(question, red_image)], "temperature": 0},
        headers={"Authorization": "Bearer page-key"},
        timeout=60,
    ).json()["choices"][0]["message"]["content"]

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page()
            errors: list[str] = []
            page.on("pageerror", lambda err: errors.append(str(err)))
            page.goto(cli_server + "/")
            page.fill("#api-key", "page-key")
            page.dispatch_event("#api-key", "change")
            page.wait_for_function("document.getElementById('model').textContent === 'model: tiny-vl'")
            page.set_input_files("#image", str(image_path))
            page.wait_for_selector("#preview:not([hidden])")
            page.fill("#temperature", "0")
            page.fill("#prompt", question)
            page.click("#send")
            page.wait_for_selector(".turn.assistant.done", timeout=60_000)
            answer = page.locator(".turn.assistant .text")
            assert answer.text_content() == expected
            assert int(answer.get_attribute("data-chunks")) >= 2  # it arrived in pieces
            assert page.locator(".turn.user img").count() == 1  # the picked image is shown with the question
            assert page.locator(".turn.error").count() == 0 and not errors
        finally:
            browser.close()
