"""Image loading: data URLs, and the remote-URL guard (allow-list, every resolved address checked,
every redirect hop checked, size cap, timeout). The fetch itself runs against a local HTTP server with
an injected address policy; the server only ever uses the default policy, which refuses loopback."""

from __future__ import annotations

import http.server
import ipaddress
import sys
import threading
import time

import httpx
import pytest
from PIL import Image
from serve_kit import LiveServer, data_url, image_message, png_bytes, server_config

from vlbridge.serve.config import MediaConfig
from vlbridge.serve.errors import APIError
from vlbridge.serve.media import ImageLoader, domain_allowed, public_address_problem

IMAGE = Image.new("RGB", (20, 10), (10, 200, 30))


def _ip(text: str):
    return ipaddress.ip_address(text)


@pytest.mark.parametrize(
    ("address", "problem"),
    [
        ("127.0.0.1", "loopback"),
        ("127.5.5.5", "loopback"),
        ("::1", "loopback"),
        ("10.1.2.3", "private"),
        ("172.16.0.1", "private"),
        ("192.168.1.1", "private"),
        ("169.254.169.254", "link-local"),  # cloud metadata
        ("fe80::1", "link-local"),
        ("fd00:ec2::254", "private"),  # AWS metadata over IPv6
        ("100.100.100.200", "non-public"),  # carrier-grade NAT range (Alibaba metadata)
        ("0.0.0.0", "unspecified"),
        ("::ffff:127.0.0.1", "loopback"),  # IPv4-mapped IPv6
        ("224.0.0.1", "multicast"),
        ("8.8.8.8", None),
        ("2606:4700:4700::1111", None),
    ],
)
def test_public_address_policy(address, problem):
    found = public_address_problem(_ip(address))
    assert (found is None) if problem is None else (problem in found)


def test_domain_allow_list_matches_domains_and_subdomains_only():
    allowed = ["example.com"]
    assert domain_allowed("example.com", allowed) and domain_allowed("img.EXAMPLE.com.", allowed)
    assert not domain_allowed("evilexample.com", allowed)
    assert not domain_allowed("example.com.evil.net", allowed)
    assert domain_allowed("anything.org", [])  # no list: any (public) host


def test_data_url_round_trip_and_whitespace():
    url = data_url(IMAGE)
    loaded = ImageLoader(MediaConfig()).load(url[:40] + "\n" + url[40:], "p")
    assert loaded.size == (20, 10) and loaded.getpixel((3, 3)) == (10, 200, 30)


@pytest.mark.parametrize(
    ("url", "code"),
    [
        ("data:image/png,rawbytes", "invalid_image_url"),
        ("data:image/png;base64,", "invalid_image"),
        ("ftp://example.com/a.png", "invalid_image_url"),
        ("FILE:///etc/passwd", "invalid_image_url"),
        ("/etc/passwd", "invalid_image_url"),
    ],
)
def test_refused_urls(url, code):
    with pytest.raises(APIError) as err:
        ImageLoader(MediaConfig(allow_remote=True)).load(url, "p")
    assert err.value.status == 400 and err.value.code == code


def test_inline_size_cap():
    with pytest.raises(APIError, match="over this server's limit of 2,048 bytes"):
        ImageLoader(MediaConfig(max_bytes=2048)).load(data_url(bytes(4000)), "p")


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1/x.png",
        "http://10.0.0.7/x.png",
        "http://169.254.169.254/latest/meta-data/",
        "http://[::1]:8080/x.png",
        "http://localhost/x.png",  # a hostname that resolves to loopback
        "http://2130706433/x.png",  # 127.0.0.1 written as one number
        "https://[::ffff:10.0.0.1]/x.png",
    ],
)
def test_remote_urls_to_internal_addresses_are_refused_by_the_default_policy(url):
    with pytest.raises(APIError) as err:
        ImageLoader(MediaConfig(allow_remote=True)).load(url, "p")
    assert err.value.code == "image_url_forbidden", err.value.message
    assert "only public internet hosts" in err.value.message


def test_every_resolved_address_is_checked():
    """One public and one private address for the same name: refused (DNS can answer either)."""
    loader = ImageLoader(
        MediaConfig(allow_remote=True), resolve=lambda host, port: [_ip("93.184.216.34"), _ip("10.0.0.1")]
    )
    with pytest.raises(APIError, match="10.0.0.1, a private address"):
        loader.load("http://images.example/cat.png", "p")


def test_allow_list_is_checked_before_resolving():
    def resolve(host, port):
        raise AssertionError("must not resolve a host outside the allow-list")

    loader = ImageLoader(MediaConfig(allow_remote=True, allowed_domains=["example.com"]), resolve=resolve)
    with pytest.raises(APIError) as err:
        loader.load("https://evil.net/cat.png", "p")
    assert err.value.code == "image_domain_not_allowed"


# -- the fetch itself, against a local HTTP server ------------------------------------------------------
class _Handler(http.server.BaseHTTPRequestHandler):
    routes: dict = {}
    seen_hosts: list = []

    def do_GET(self):  # noqa: N802 (http.server's naming)
        self.seen_hosts.append(self.headers["Host"])
        status, headers, body, delay = self.routes[self.path]
        time.sleep(delay)
        self.send_response(status)
        for key, value in headers.items():
            self.send_header(key, value)
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


class _Server(http.server.ThreadingHTTPServer):
    def handle_error(self, request, client_address):
        """Clients here hang up on purpose (timeouts, size caps); a late write to them is no error, and
        printing it would land in whichever test captures stderr next."""
        if not isinstance(sys.exc_info()[1], (BrokenPipeError, ConnectionResetError)):
            super().handle_error(request, client_address)


@pytest.fixture(scope="module")
def image_host():
    httpd = _Server(("127.0.0.1", 0), _Handler)
    port = httpd.server_address[1]
    png = png_bytes(IMAGE)
    _Handler.routes.update(
        {
            "/cat.png": (200, {"Content-Length": str(len(png))}, png, 0),
            "/big.png": (200, {}, bytes(50_000), 0),
            "/slow.png": (200, {"Content-Length": str(len(png))}, png, 1.5),
            "/hop": (302, {"Location": "/cat.png", "Content-Length": "0"}, b"", 0),
            "/to-internal": (
                302,
                {"Location": f"http://127.0.0.2:{port}/cat.png", "Content-Length": "0"},
                b"",
                0,
            ),
            "/loop": (302, {"Location": "/loop", "Content-Length": "0"}, b"", 0),
            "/missing": (404, {"Content-Length": "0"}, b"", 0),
        }
    )
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield port
    httpd.shutdown()


def _only_127_0_0_1(ip):
    """Test policy: the local image host (127.0.0.1) counts as public; every other address is refused."""
    return None if str(ip) == "127.0.0.1" else "test-forbidden"


def _loader(**media) -> ImageLoader:
    config = MediaConfig(allow_remote=True, **media)
    return ImageLoader(config, address_policy=_only_127_0_0_1, resolve=lambda host, port: [_ip("127.0.0.1")])


def test_fetch_connects_to_the_checked_address_with_the_original_host(image_host):
    _Handler.seen_hosts.clear()
    image = _loader().load(f"http://images.example:{image_host}/cat.png", "p")
    assert image.size == (20, 10) and image.getpixel((0, 0)) == (10, 200, 30)
    assert _Handler.seen_hosts == [f"images.example:{image_host}"]


def test_fetch_follows_a_redirect_and_checks_its_target(image_host):
    assert _loader().load(f"http://images.example:{image_host}/hop", "p").size == (20, 10)
    loader = ImageLoader(MediaConfig(allow_remote=True), address_policy=_only_127_0_0_1)
    with pytest.raises(APIError, match="127.0.0.2, a test-forbidden address"):
        loader.load(f"http://127.0.0.1:{image_host}/to-internal", "p")


@pytest.mark.parametrize(
    ("path", "media", "match"),
    [
        ("/big.png", {"max_bytes": 10_000}, "over this server's limit of 10,000 bytes"),
        ("/slow.png", {"timeout_s": 0.5}, "the timeout is 0.5 s"),
        ("/loop", {"max_redirects": 2}, "more than 2 redirects"),
        ("/missing", {}, "HTTP 404"),
    ],
)
def test_fetch_limits(image_host, path, media, match):
    with pytest.raises(APIError, match=match) as err:
        _loader(**media).load(f"http://images.example:{image_host}{path}", "p")
    assert err.value.status == 400


def test_allowed_domain_is_fetched(image_host):
    loader = _loader(allowed_domains=["example"])
    assert loader.load(f"http://images.example:{image_host}/cat.png", "p").size == (20, 10)


# -- end to end: a server with remote images switched on -------------------------------------------------
@pytest.fixture(scope="module")
def remote_server(checkpoint):
    with LiveServer(server_config(checkpoint, media={"allow_remote": True})) as live:
        yield live


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1:{port}/cat.png",
        "http://10.0.0.1/cat.png",
        "http://169.254.169.254/latest/meta-data/iam",
        "http://[::1]:{port}/cat.png",
        "http://localhost:{port}/cat.png",
    ],
)
def test_server_with_remote_images_refuses_internal_addresses(remote_server, image_host, url):
    body = {"messages": [image_message("hi", url.format(port=image_host))], "max_tokens": 1}
    response = remote_server.post(body)
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "image_url_forbidden"
    assert remote_server.post({"messages": [image_message("hi", IMAGE)], "max_tokens": 1}).status_code == 200


def test_local_image_host_sees_no_request_from_a_refusing_server(remote_server, image_host):
    _Handler.seen_hosts.clear()
    remote_server.post({"messages": [image_message("hi", f"http://127.0.0.1:{image_host}/cat.png")]})
    assert _Handler.seen_hosts == []
    assert httpx.get(f"http://127.0.0.1:{image_host}/cat.png").status_code == 200  # the host was up
