"""URL previews (``/preview_url``), off by default, built not to be an SSRF tool.

A preview makes the server fetch a URL a user chose, so:

* only ``http``/``https`` on ports 80/443 (or ``url_preview.allowed_ports``);
* the host name is resolved *first*, every resolved address is checked against the
  blocked networks (loopback, private, link-local, unique-local, multicast,
  reserved, carrier-grade NAT, the cloud metadata address, and the operator's
  ``url_preview.blocked_networks``; ``url_preview.allowed_networks`` are explicit
  exceptions), and the connection is made to the checked
  address — the resolver given to aiohttp is the check, so DNS rebinding between
  check and connect is impossible;
* redirects are followed by hand, each hop checked again, at most 5;
* at most ``url_preview.max_bytes`` are read, within ``url_preview.timeout_s``.

Only ``text/html`` is parsed (for Open Graph ``og:*`` tags and ``<title>``);
images are not fetched.
"""

from __future__ import annotations

import asyncio
import html.parser
import ipaddress
import socket
from collections import OrderedDict
from typing import Any
from urllib.parse import urljoin, urlsplit

from bastion.errors import Forbidden, MatrixError

DEFAULT_BLOCKED = (
    "0.0.0.0/8", "10.0.0.0/8", "100.64.0.0/10", "127.0.0.0/8", "169.254.0.0/16", "172.16.0.0/12",
    "192.0.0.0/24", "192.0.2.0/24", "192.168.0.0/16", "198.18.0.0/15", "198.51.100.0/24", "203.0.113.0/24",
    "224.0.0.0/4", "240.0.0.0/4", "255.255.255.255/32",
    "::/128", "::1/128", "::ffff:0:0/96", "64:ff9b::/96", "100::/64", "2001:db8::/32", "fc00::/7", "fe80::/10", "ff00::/8",
)
MAX_REDIRECTS = 5


class PreviewError(MatrixError):
    status = 502
    errcode = "M_UNKNOWN"


Networks = list[ipaddress.IPv4Network | ipaddress.IPv6Network]


def _blocked(address: str, networks: Networks, allowed: Networks) -> bool:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return True
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    if any(ip in net for net in allowed):
        return False  # an operator's explicit exception (e.g. an internal wiki)
    return any(ip in net for net in networks) or ip.is_private or ip.is_loopback or ip.is_link_local or ip.is_multicast or ip.is_reserved or ip.is_unspecified


class _OpenGraph(html.parser.HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.tags: dict[str, str] = {}
        self._in_title = False
        self.title = ""

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "meta":
            data = dict(attrs)
            key = data.get("property") or data.get("name")
            value = data.get("content")
            if key and value is not None and (key.startswith("og:") or key in ("description",)):
                self.tags.setdefault(key, value[:2000])
        elif tag == "title":
            self._in_title = True

    def handle_endtag(self, tag: str) -> None:
        if tag == "title":
            self._in_title = False

    def handle_data(self, data: str) -> None:
        if self._in_title and len(self.title) < 500:
            self.title += data


class UrlPreviewService:
    def __init__(
        self,
        *,
        enabled: bool,
        blocked_networks: list[str],
        allowed_networks: list[str],
        allowed_ports: list[int],
        max_bytes: int,
        timeout_s: float,
    ) -> None:
        self.enabled = enabled
        self._networks: Networks = [ipaddress.ip_network(n, strict=False) for n in (*DEFAULT_BLOCKED, *blocked_networks)]
        self._allowed: Networks = [ipaddress.ip_network(n, strict=False) for n in allowed_networks]
        self._ports = set(allowed_ports)
        self._max_bytes = max_bytes
        self._timeout = timeout_s
        self._cache: OrderedDict[str, dict[str, Any]] = OrderedDict()

    def check_address(self, address: str) -> None:
        if _blocked(address, self._networks, self._allowed):
            raise Forbidden("This URL points to an address previews may not reach")

    async def resolve(self, host: str, port: int) -> list[str]:
        """Resolve and check: every address must be allowed, else the whole host is refused."""
        loop = asyncio.get_running_loop()
        try:
            infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except OSError:
            raise PreviewError("Could not resolve the host") from None
        addresses = sorted({str(info[4][0]) for info in infos})
        if not addresses:
            raise PreviewError("Could not resolve the host")
        for address in addresses:
            self.check_address(address)
        return addresses

    def _check_url(self, url: str) -> tuple[str, int]:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise MatrixError("Only http and https URLs can be previewed", errcode="M_INVALID_PARAM", status=400)
        port = parts.port or (443 if parts.scheme == "https" else 80)
        if port not in self._ports:
            raise Forbidden("URL previews are limited to standard web ports")
        return parts.hostname, port

    async def preview(self, url: str) -> dict[str, Any]:
        if not self.enabled:
            raise MatrixError("URL previews are disabled on this server", errcode="M_UNRECOGNIZED", status=404)
        if len(url) > 2048:
            raise MatrixError("URL too long", errcode="M_INVALID_PARAM", status=400)
        cached = self._cache.get(url)
        if cached is not None:
            return cached
        import aiohttp

        try:
            result = await asyncio.wait_for(self._fetch(url), self._timeout)
        except TimeoutError:
            raise PreviewError("The page took too long to answer") from None
        except (aiohttp.ClientError, OSError, UnicodeError, ValueError) as exc:
            raise PreviewError(f"Could not fetch the page: {exc.__class__.__name__}") from None
        self._cache[url] = result
        if len(self._cache) > 1000:
            self._cache.popitem(last=False)
        return result

    async def _fetch(self, url: str) -> dict[str, Any]:
        import aiohttp

        service = self

        class CheckedResolver(aiohttp.abc.AbstractResolver):
            async def resolve(self, host: str, port: int = 0, family: int = socket.AF_INET) -> list[Any]:
                addresses = await service.resolve(host, port)
                return [
                    {"hostname": host, "host": a, "port": port, "family": socket.AF_INET6 if ":" in a else socket.AF_INET,
                     "proto": 0, "flags": socket.AI_NUMERICHOST}
                    for a in addresses
                ]

            async def close(self) -> None:
                return None

        connector = aiohttp.TCPConnector(resolver=CheckedResolver(), use_dns_cache=False, limit=4)
        async with aiohttp.ClientSession(connector=connector, trust_env=False) as session:
            current = url
            for _ in range(MAX_REDIRECTS + 1):
                host, _port = self._check_url(current)
                try:
                    ipaddress.ip_address(host)
                    self.check_address(host)  # a literal IP never goes through the resolver
                except ValueError:
                    pass
                async with session.get(
                    current, allow_redirects=False, headers={"User-Agent": "Bastion URL preview"}
                ) as resp:
                    if resp.status in (301, 302, 303, 307, 308) and "Location" in resp.headers:
                        current = urljoin(current, resp.headers["Location"])
                        continue
                    if resp.status != 200:
                        raise PreviewError(f"The page answered {resp.status}")
                    content_type = resp.headers.get("Content-Type", "").split(";")[0].strip().lower()
                    body = await resp.content.read(self._max_bytes + 1)
                    if len(body) > self._max_bytes:
                        body = body[: self._max_bytes]
                    if content_type not in ("text/html", "application/xhtml+xml"):
                        return {"og:url": current, "matrix:content_type": content_type}
                    parser = _OpenGraph()
                    parser.feed(body.decode(resp.charset or "utf-8", errors="replace"))
                    out: dict[str, Any] = {k: v for k, v in parser.tags.items() if k.startswith("og:") and k != "og:image"}
                    if "og:title" not in out and parser.title.strip():
                        out["og:title"] = parser.title.strip()
                    if "og:description" not in out and "description" in parser.tags:
                        out["og:description"] = parser.tags["description"]
                    out.setdefault("og:url", current)
                    return out
            raise PreviewError("Too many redirects")
