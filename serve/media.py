"""Images named in chat requests: data URLs always; remote http(s) URLs only when the server allows them.

Remote fetching is where a server can be turned against its own network (SSRF), so every hop of a
fetch is checked: the host against the optional domain allow-list, then *every* address it resolves
to against `public_address_problem` (loopback, private, link-local/metadata, ... are refused), and the
connection goes to the checked address itself (no second DNS lookup an attacker could answer
differently). Bytes are capped while streaming, each hop has a timeout, and the pixel count is
checked from the image header before anything is decoded (decompression bombs).
"""

from __future__ import annotations

import binascii
import io
import ipaddress
import socket
import time
from collections.abc import Callable
from urllib.parse import urljoin, urlsplit

import httpx
from PIL import Image

from .config import MediaConfig
from .errors import bad_request

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
# ip -> why it must not be fetched from, or None when it may.
AddressPolicy = Callable[[IPAddress], str | None]
Resolver = Callable[[str, int], list[IPAddress]]

_REDIRECTS = {301, 302, 303, 307, 308}


def public_address_problem(ip: IPAddress) -> str | None:
    """Why `ip` is not a public internet address (and so must not be fetched from), or None."""
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    checks = (
        ("loopback", ip.is_loopback),
        ("unspecified", ip.is_unspecified),
        ("link-local (where cloud metadata services live)", ip.is_link_local),
        ("multicast", ip.is_multicast),
        ("private", ip.is_private),
        ("reserved", ip.is_reserved),
        ("non-public", not ip.is_global),
    )
    return next((name for name, hit in checks if hit), None)


def resolve_host(host: str, port: int) -> list[IPAddress]:
    """Every address `host` resolves to (an IP literal resolves to itself)."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(ipaddress.ip_address(info[4][0].split("%")[0]) for info in infos))


def domain_allowed(host: str, allowed: list[str]) -> bool:
    """True when no allow-list is set, or `host` is a listed domain or a subdomain of one."""
    host = host.lower().rstrip(".")
    return not allowed or any(host == d or host.endswith("." + d) for d in allowed)


def decode_base64(text: str) -> bytes:
    """Strict base64 (whitespace allowed between lines), decoded 1 MiB at a time: between chunks other
    threads get the GIL, so a 20 MiB image does not hold up the event loop and the engine for 40 ms."""
    if any(c in text for c in " \t\r\n"):
        text = "".join(text.split())
    if len(text) % 4:
        raise binascii.Error(f"{len(text)} base64 characters, not a multiple of 4 (missing padding?)")
    step = 4 * 256 * 1024
    chunks = (text[i : i + step] for i in range(0, len(text), step))
    return b"".join(binascii.a2b_base64(chunk, strict_mode=True) for chunk in chunks)


def decode_image(data: bytes, max_pixels: int, param: str) -> Image.Image:
    """RGB image from encoded bytes; refuses non-images, truncated files and oversized pixel counts."""
    try:
        image = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as err:
        raise _too_many_pixels(str(err), max_pixels, param) from err
    except (OSError, SyntaxError, ValueError) as err:
        raise bad_request(
            f"{param}: the data is not an image in a format this server reads (PNG, JPEG, GIF, WebP, ...)",
            param,
            "invalid_image",
        ) from err
    width, height = image.size
    if width * height > max_pixels:
        raise _too_many_pixels(f"{width}x{height} = {width * height:,} pixels", max_pixels, param)
    try:
        image.load()
        return image.convert("RGB")
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        raise bad_request(
            f"{param}: the image is truncated or corrupt ({err}); send the complete file",
            param,
            "invalid_image",
        ) from err


def _too_many_pixels(what: str, max_pixels: int, param: str):
    return bad_request(
        f"{param}: image too large ({what}); this server accepts at most {max_pixels:,} pixels, "
        "resize it first",
        param,
        "image_too_large",
    )


class ImageLoader:
    """Loads request images under a MediaConfig. `address_policy` and `resolve` exist so the fetch
    itself can be tested against a local server; the server always uses the defaults."""

    def __init__(
        self,
        config: MediaConfig,
        *,
        address_policy: AddressPolicy = public_address_problem,
        resolve: Resolver = resolve_host,
    ) -> None:
        self.config = config
        self.address_policy = address_policy
        self.resolve = resolve

    def load(self, url: str, param: str) -> Image.Image:
        """The image at `url` (a data URL, or http(s) when allowed), as RGB."""
        scheme = url.split(":", 1)[0].lower() if ":" in url else ""
        if scheme == "data":
            data = self._data_url(url, param)
        elif scheme in ("http", "https"):
            data = self._fetch(url, param)
        else:
            raise bad_request(
                f"{param}: unsupported image URL scheme {scheme + ':' if scheme else '(none)'}; send the "
                "image inline as a data URL (data:image/png;base64,...). file:// and local paths are "
                "never read",
                param,
                "invalid_image_url",
            )
        return decode_image(data, self.config.max_pixels, param)

    # -- data URLs -------------------------------------------------------------------------------------
    def _data_url(self, url: str, param: str) -> bytes:
        header, sep, payload = url.partition(",")
        if not sep or not header.lower().endswith(";base64"):
            raise bad_request(
                f"{param}: a data URL must be base64-encoded: data:image/png;base64,<data>",
                param,
                "invalid_image_url",
            )
        if len(payload) * 3 // 4 > self.config.max_bytes:  # whitespace counts here: strip it, then decide
            payload = "".join(payload.split())
            if len(payload) * 3 // 4 > self.config.max_bytes:
                raise self._too_big(param)
        try:
            data = decode_base64(payload)
        except (binascii.Error, ValueError) as err:
            raise bad_request(
                f"{param}: the data URL is not valid base64 ({err})", param, "invalid_base64"
            ) from err
        if not data:
            raise bad_request(f"{param}: the data URL holds no data", param, "invalid_image")
        return data

    def _too_big(self, param: str):
        return bad_request(
            f"{param}: image data over this server's limit of {self.config.max_bytes:,} bytes",
            param,
            "image_too_large",
        )

    # -- remote URLs -----------------------------------------------------------------------------------
    def _fetch(self, url: str, param: str) -> bytes:
        if not self.config.allow_remote:
            raise bad_request(
                f"{param}: remote image URLs are disabled on this server; send the image inline as a "
                "data URL (data:image/png;base64,...), or start the server with --allow-remote-images",
                param,
                "remote_images_disabled",
            )
        deadline = time.monotonic() + self.config.timeout_s
        for _ in range(self.config.max_redirects + 1):
            response = self._get_checked(url, param, deadline)
            if isinstance(response, bytes):
                return response
            url = response  # a redirect target, checked like the first URL on the next hop
        raise bad_request(
            f"{param}: more than {self.config.max_redirects} redirects", param, "image_fetch_failed"
        )

    def _target(self, url: str, param: str) -> tuple[str, str, int, IPAddress]:
        """(scheme, host, port, address) of a URL that passed the domain and address checks."""
        parts = urlsplit(url)
        scheme, host = parts.scheme.lower(), parts.hostname
        if scheme not in ("http", "https") or not host:
            raise bad_request(
                f"{param}: {url!r} is not an http(s) URL with a host", param, "invalid_image_url"
            )
        if not domain_allowed(host, self.config.allowed_domains):
            raise bad_request(
                f"{param}: host {host!r} is not in this server's image domain allow-list "
                f"({', '.join(self.config.allowed_domains)})",
                param,
                "image_domain_not_allowed",
            )
        try:
            port = parts.port or (443 if scheme == "https" else 80)
            addresses = self.resolve(host, port)
        except (OSError, ValueError) as err:
            raise bad_request(
                f"{param}: cannot resolve host {host!r} ({err})", param, "image_fetch_failed"
            ) from err
        if not addresses:
            raise bad_request(f"{param}: host {host!r} has no addresses", param, "image_fetch_failed")
        for ip in addresses:
            problem = self.address_policy(ip)
            if problem:
                raise bad_request(
                    f"{param}: refusing to fetch from {host!r}: it resolves to {ip}, a {problem} address; "
                    "only public internet hosts are fetched",
                    param,
                    "image_url_forbidden",
                )
        return scheme, host, port, addresses[0]

    def _get_checked(self, url: str, param: str, deadline: float) -> bytes | str:
        """One hop: the body, or the absolute URL a redirect points to."""
        scheme, host, port, ip = self._target(url, param)
        parts = urlsplit(url)
        literal = f"[{ip}]" if ip.version == 6 else str(ip)
        query = f"?{parts.query}" if parts.query else ""
        pinned = f"{scheme}://{literal}:{port}{parts.path or '/'}{query}"
        headers = {"Host": parts.netloc.rsplit("@", 1)[-1], "Accept": "image/*"}
        extensions = {"sni_hostname": host} if scheme == "https" else {}
        timeout = httpx.Timeout(max(0.01, min(self.config.timeout_s, deadline - time.monotonic())))
        try:
            with (
                httpx.Client(timeout=timeout, follow_redirects=False, trust_env=False) as client,
                client.stream("GET", pinned, headers=headers, extensions=extensions) as response,
            ):
                if response.status_code in _REDIRECTS and "location" in response.headers:
                    return urljoin(url, response.headers["location"])
                if response.status_code >= 400:
                    raise bad_request(
                        f"{param}: fetching the image failed: HTTP {response.status_code}",
                        param,
                        "image_fetch_failed",
                    )
                return self._read_capped(response, param, deadline)
        except httpx.HTTPError as err:
            raise bad_request(
                f"{param}: fetching the image failed ({type(err).__name__}: {err or 'timed out'}); "
                f"the timeout is {self.config.timeout_s:g} s",
                param,
                "image_fetch_failed",
            ) from err

    def _read_capped(self, response: httpx.Response, param: str, deadline: float) -> bytes:
        declared = response.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > self.config.max_bytes:
            raise self._too_big(param)
        body = bytearray()
        for chunk in response.iter_bytes():
            body += chunk
            if len(body) > self.config.max_bytes:
                raise self._too_big(param)
            if time.monotonic() > deadline:
                raise bad_request(
                    f"{param}: fetching the image took longer than {self.config.timeout_s:g} s",
                    param,
                    "image_fetch_failed",
                )
        return bytes(body)
