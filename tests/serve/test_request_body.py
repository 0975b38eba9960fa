"""Request bodies: data URLs are lifted out before the JSON parse and put back exactly where they were;
oversized images and text are refused from byte counts alone."""

from __future__ import annotations

import base64
import json

import pytest

from vlbridge.serve.errors import APIError
from vlbridge.serve.protocol import ChatCompletionRequest
from vlbridge.serve.request_body import Limits, check_prefix, parse_body

LIMITS = Limits(max_image_bytes=1000, max_text_bytes=10_000)
PNG = "data:image/png;base64," + base64.b64encode(bytes(range(200))).decode()


def image(url: str) -> dict:
    return {"type": "image_url", "image_url": {"url": url}}


def body(*parts, **extra) -> dict:
    return {"messages": [{"role": "user", "content": list(parts)}], **extra}


@pytest.mark.parametrize(
    "request_body",
    [
        body(image(PNG), {"type": "text", "text": "What is it?"}),
        body(image(PNG), image(PNG.replace("png", "jpeg")), {"type": "text", "text": "two"}),
        body({"type": "text", "text": "data:text/plain,not an image, but a text that looks like a data URL"}),
        body({"type": "text", "text": 'quoted "data:x,y" inside a text'}),
        body({"type": "text", "text": "ends with a backslash \\"}, image(PNG)),
        body(image(PNG), {"type": "text", "text": "data:" * 100}),  # many candidates: lifting stops
        {"messages": [{"role": "user", "content": "data:a,b"}], "user": "data:c,d"},
    ],
    ids=["one image", "two images", "text like a data URL", "quoted", "backslash", "many", "plain strings"],
)
def test_lifting_changes_nothing_the_request_holds(request_body):
    for raw in (json.dumps(request_body), json.dumps(request_body, ensure_ascii=False).replace("/", "\\/")):
        parsed = parse_body(raw.encode(), LIMITS)
        assert parsed == ChatCompletionRequest.model_validate(json.loads(raw))


def test_an_image_over_the_limit_is_refused_from_its_base64_length():
    big = "data:image/png;base64," + base64.b64encode(bytes(1100)).decode()
    with pytest.raises(APIError, match=r"about 1,10\d bytes, over this server.s limit of 1,000") as err:
        parse_body(json.dumps(body(image(big))).encode(), LIMITS)
    assert err.value.status == 413


def test_text_over_the_limit_is_refused_before_parsing_but_images_do_not_count():
    with pytest.raises(APIError, match="holds 10,0.. bytes besides its inline images") as err:
        parse_body(json.dumps(body({"type": "text", "text": "x" * 10_000})).encode(), LIMITS)
    assert err.value.status == 413
    many_images = body(*[image(PNG)] * 40, {"type": "text", "text": "x"})  # 14 KB, almost all base64
    assert len(json.dumps(many_images)) > LIMITS.max_text_bytes
    assert len(parse_body(json.dumps(many_images).encode(), LIMITS).messages[0].content) == 41


def test_not_json_is_still_a_clear_400():
    with pytest.raises(APIError, match="not valid JSON") as err:
        parse_body(b'{"messages": [{"role": "user", "content": "data:x,' + b"y" * 10, LIMITS)
    assert err.value.status == 400


def test_a_body_still_arriving_is_refused_once_its_prefix_proves_it_too_large():
    raw = json.dumps(body(image(PNG), {"type": "text", "text": "x" * 20_000})).encode()
    check_prefix(raw[:9_000], LIMITS)  # under the text limit so far
    with pytest.raises(APIError, match="holds at least 10,") as err:
        check_prefix(raw[:10_500], LIMITS)
    assert err.value.status == 413
    growing = "data:image/png;base64," + base64.b64encode(bytes(5000)).decode()
    opened = json.dumps(body(image(growing))).encode()[:-20]  # the data URL is not closed yet
    with pytest.raises(APIError, match="holds at least 4,9.. bytes, over this server's limit of 1,000"):
        check_prefix(opened, LIMITS)
    unclosed = json.dumps(body(image(PNG + "A" * 800))).encode()[:-30]
    check_prefix(unclosed, LIMITS)  # an image still arriving (under its limit) counts as image, not text
