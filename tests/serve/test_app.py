"""Every kind of bad input gets a 4xx in OpenAI's error shape naming the problem, and the server keeps
serving; authentication; routes FastAPI answers itself (404, 405) use the same shape."""

from __future__ import annotations

import base64

import httpx
import openai
import pytest
from PIL import Image
from serve_kit import data_url, image_message, png_bytes

GOOD = {"model": "tiny-vl", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}


def _red(size=(32, 32)) -> Image.Image:
    return Image.new("RGB", size, (200, 30, 30))


def _truncated_png() -> str:
    data = png_bytes(Image.effect_noise((64, 64), 60).convert("RGB"))
    return data_url(data[: len(data) // 2])


def _user(*parts) -> list[dict]:
    return [{"role": "user", "content": list(parts)}]


def _image_part(url: str) -> dict:
    return {"type": "image_url", "image_url": {"url": url}}


# (name, request body (dict) or raw bytes, status, words the message must contain, `param` expected)
BAD_BODIES = [
    ("malformed JSON", b'{"messages": [', 400, ["not valid JSON"], None),
    ("empty body", b"", 400, ["empty"], None),
    ("JSON that is not an object", b"[1, 2]", 400, ["JSON object"], None),
    ("missing messages", {"model": "tiny-vl"}, 400, ["messages", "required"], "messages"),
    ("empty messages", {"messages": []}, 400, ["messages", "at least 1"], "messages"),
    ("unknown role", {"messages": [{"role": "robot", "content": "hi"}]}, 400, ["role", "robot"], None),
    ("message without content", {"messages": [{"role": "user"}]}, 400, ["content"], "messages.0"),
    (
        "unknown content part",
        {"messages": _user({"type": "audio", "audio": "x"})},
        400,
        ["audio", "text", "image_url"],
        None,
    ),
    (
        "invalid base64",
        {"messages": _user(_image_part("data:image/png;base64,@@not-base64@@"))},
        400,
        ["not valid base64"],
        "messages.0.content.0.image_url",
    ),
    (
        "data that is not an image",
        {"messages": _user(_image_part(data_url(b"this is plain text, not an image")))},
        400,
        ["not an image"],
        "messages.0.content.0.image_url",
    ),
    (
        "truncated image",
        {"messages": _user(_image_part(_truncated_png()))},
        400,
        ["truncated"],
        "messages.0.content.0.image_url",
    ),
    (
        "image over the pixel limit",
        {"messages": _user(_image_part(data_url(_red((300, 300)))))},
        400,
        ["too large", "90,000 pixels", "65,536"],
        "messages.0.content.0.image_url",
    ),
    (
        "too many images",
        {"messages": [image_message("hi", *[_red()] * 4)]},
        400,
        ["too many images", "4", "at most 3"],
        "messages",
    ),
    (
        "image in an assistant message",
        {"messages": [{"role": "assistant", "content": [_image_part(data_url(_red()))]}]},
        400,
        ["only accepted in user messages"],
        None,
    ),
    (
        "reserved image marker in text",
        {"messages": [{"role": "user", "content": "look: <image>"}]},
        400,
        ["<image>", "image_url"],
        "messages.0.content",
    ),
    (
        "file URL",
        {"messages": _user(_image_part("file:///etc/passwd"))},
        400,
        ["file://", "never"],
        "messages.0.content.0.image_url",
    ),
    (
        "remote URL while remote images are off",
        {"messages": _user(_image_part("https://example.com/cat.png"))},
        400,
        ["remote image URLs are disabled", "--allow-remote-images"],
        "messages.0.content.0.image_url",
    ),
    (
        "prompt over the context length",
        {"messages": [{"role": "user", "content": "count " * 1000}]},
        400,
        ["context length is 512"],  # the LLM's max_position_embeddings: the default context
        "messages",
    ),
    (
        "text that cannot fit, refused before parsing",
        {"messages": [{"role": "user", "content": "count " * 100_000}]},
        413,
        ["holds at least", "bytes besides its inline images", "shorten the conversation"],
        None,
    ),
    (
        "max_tokens past the context length",
        {**GOOD, "max_tokens": 1000},
        400,
        ["max_tokens=1000", "context length of 512"],
        "max_tokens",
    ),
    ("temperature above 2", {**GOOD, "temperature": 2.5}, 400, ["temperature", "2"], "temperature"),
    ("negative temperature", {**GOOD, "temperature": -0.1}, 400, ["temperature"], "temperature"),
    ("top_p above 1", {**GOOD, "top_p": 1.5}, 400, ["top_p"], "top_p"),
    ("max_tokens 0", {**GOOD, "max_tokens": 0}, 400, ["max_tokens"], "max_tokens"),
    ("n 0", {**GOOD, "n": 0}, 400, ["n:"], "n"),
    ("n over the server limit", {**GOOD, "n": 9}, 400, ["n=9", "limit of 8"], "n"),
    ("top_logprobs 21", {**GOOD, "logprobs": True, "top_logprobs": 21}, 400, ["top_logprobs"], None),
    ("top_logprobs without logprobs", {**GOOD, "top_logprobs": 2}, 400, ["needs logprobs"], None),
    ("five stop strings", {**GOOD, "stop": list("abcde")}, 400, ["at most 4 stop"], "stop"),
    ("temperature as text", {**GOOD, "temperature": "hot"}, 400, ["temperature", "hot"], "temperature"),
    ("unknown model", {**GOOD, "model": "gpt-9"}, 404, ["gpt-9", "tiny-vl"], "model"),
]


@pytest.mark.parametrize(
    ("body", "status", "words", "param"), [b[1:] for b in BAD_BODIES], ids=[b[0] for b in BAD_BODIES]
)
def test_bad_input_gets_a_clear_4xx_and_the_server_keeps_serving(server, body, status, words, param):
    url, headers = f"{server.url}/v1/chat/completions", server.headers()
    if isinstance(body, bytes):
        response = httpx.post(url, content=body, headers={**headers, "Content-Type": "application/json"})
    else:
        response = httpx.post(url, json=body, headers=headers, timeout=30)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error"
    for word in words:
        assert word in error["message"], (word, error["message"])
    if param is not None:
        assert error["param"] == param
    again = server.post(GOOD)
    assert again.status_code == 200 and again.json()["choices"][0]["finish_reason"] in ("stop", "length")


def test_bad_input_through_the_openai_client_raises_its_typed_errors(server):
    client = server.client()
    with pytest.raises(openai.BadRequestError, match="not valid base64"):
        client.chat.completions.create(
            model="tiny-vl", messages=_user(_image_part("data:image/png;base64,%%%"))
        )
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(openai.BadRequestError, match="too large"):  # stream=True fails before any chunk
        client.chat.completions.create(
            model="tiny-vl", messages=_user(_image_part(data_url(_red((400, 400))))), stream=True
        )


def test_decompression_bomb_is_refused_from_its_header(server):
    """A PNG whose header claims 100,000 x 100,000 pixels is refused before any pixel is decoded."""
    import struct
    import zlib

    png = bytearray(png_bytes(_red((1, 1))))
    ihdr = png.index(b"IHDR")
    png[ihdr + 4 : ihdr + 12] = struct.pack(">II", 100_000, 100_000)
    png[ihdr + 17 : ihdr + 21] = struct.pack(">I", zlib.crc32(bytes(png[ihdr : ihdr + 17])))
    response = server.post({"messages": _user(_image_part(data_url(bytes(png))))})
    assert response.status_code == 400
    message = response.json()["error"]["message"]
    assert "image too large" in message and "10000000000 pixels" in message.replace(",", "")


@pytest.mark.parametrize(
    ("headers", "message"),
    [
        ({}, "missing API key"),
        ({"Authorization": "Bearer wrong"}, "invalid API key"),
        ({"Authorization": "test-key"}, "invalid API key"),
    ],
    ids=["missing", "wrong", "no bearer scheme"],
)
def test_wrong_or_missing_api_key_is_401(server, headers, message):
    for method, path in [("POST", "/v1/chat/completions"), ("GET", "/v1/models"), ("GET", "/stats")]:
        response = httpx.request(method, f"{server.url}{path}", json=GOOD, headers=headers)
        assert response.status_code == 401
        assert message in response.json()["error"]["message"]
    assert httpx.get(f"{server.url}/health").status_code == 200  # health needs no key


def test_openai_client_with_a_wrong_key_gets_authentication_error(server):
    from openai import OpenAI

    client = OpenAI(base_url=f"{server.url}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        client.models.list()


def test_unknown_route_and_wrong_method_use_the_error_shape(server):
    missing = httpx.get(f"{server.url}/v1/completions", headers=server.headers())
    assert missing.status_code == 404 and "no such endpoint" in missing.json()["error"]["message"]
    wrong = httpx.get(f"{server.url}/v1/chat/completions", headers=server.headers())
    assert wrong.status_code == 405 and wrong.json()["error"]["code"] == "method_not_allowed"


def test_request_body_over_the_size_limit_is_413(checkpoint):
    from serve_kit import LiveServer, server_config

    with LiveServer(server_config(checkpoint, max_request_bytes=4096)) as live:
        big = {
            "messages": _user(_image_part("data:image/png;base64," + base64.b64encode(bytes(8000)).decode()))
        }
        response = live.post(big)
        assert response.status_code == 413 and "4,096 bytes" in response.json()["error"]["message"]
        assert live.post(GOOD).status_code == 200
