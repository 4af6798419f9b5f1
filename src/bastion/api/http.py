"""The HTTP layer: a small ASGI application that routes Matrix requests to handlers.

uvicorn serves HTTP; this module turns ASGI calls into handler calls. It is kept
thin on purpose and written for Matrix rather than taken from a web framework:

* paths are matched on the *raw* path, segment by segment, and each parameter is
  percent-decoded on its own — a state key or event ID may contain ``/`` encoded as
  ``%2F``, which a router that matches decoded paths gets wrong;
* every error is a Matrix error body (``errcode``/``error``), including unknown
  endpoints (404 ``M_UNRECOGNIZED``), wrong methods (405), malformed JSON, bodies
  over the configured limit (413 ``M_TOO_LARGE``) and unexpected failures (500,
  logged with a reference, never a stack trace to the client);
* CORS headers on every response and ``OPTIONS`` on every path, as the spec asks.

Handlers are ``async def handler(req: Request) -> Response | dict``.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import re
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, NoReturn, TypeVar
from urllib.parse import parse_qs, unquote

import orjson

from bastion import metrics
from bastion.errors import (
    BadJson,
    InvalidParam,
    MatrixError,
    MissingParam,
    MissingToken,
    NotJson,
    TooLarge,
    Unrecognized,
)
from bastion.security.crypto import IntegrityError
from bastion.services.requester import Requester, current_client

T = TypeVar("T")
log = logging.getLogger("bastion.http")

CORS_HEADERS = [
    (b"access-control-allow-origin", b"*"),
    (b"access-control-allow-methods", b"GET, POST, PUT, DELETE, OPTIONS"),
    (b"access-control-allow-headers", b"X-Requested-With, Content-Type, Authorization"),
]
JSON_HEADERS = [(b"content-type", b"application/json"), (b"cache-control", b"no-cache, no-store, must-revalidate"), *CORS_HEADERS]
SECURITY_HEADERS = [(b"x-content-type-options", b"nosniff"), (b"x-frame-options", b"DENY")]
# The largest integer SQLite and PostgreSQL (BIGINT) columns hold.
MAX_QUERY_INT = 2**63 - 1

CLIENT_V3 = "/_matrix/client/{version:v3}"
CLIENT_V1 = "/_matrix/client/v1"


@dataclass
class Response:
    body: bytes
    status: int = 200
    headers: Sequence[tuple[bytes, bytes]] = ()


@dataclass
class StreamResponse:
    """A response whose body is produced chunk by chunk (media downloads)."""

    chunks: AsyncIterator[bytes]
    headers: Sequence[tuple[bytes, bytes]]
    status: int = 200
    length: int | None = None


def json_response(data: Any, status: int = 200) -> Response:
    return Response(orjson.dumps(data), status)


Handler = Callable[["Request"], Awaitable[Response | StreamResponse | dict[str, Any]]]


class Request:
    """One HTTP request as handlers see it."""

    __slots__ = ("_body", "_query", "client_ip", "headers", "hs", "method", "params", "path", "receive", "requester", "scope")

    def __init__(self, scope: dict[str, Any], receive: Callable[..., Any], params: dict[str, str], hs: Any, client_ip: str | None) -> None:
        self.scope = scope
        self.receive = receive
        self.method: str = scope["method"]
        self.path: str = scope["path"]
        self.params = params
        self.hs = hs
        self.client_ip = client_ip
        self.headers: dict[bytes, bytes] = {k.lower(): v for k, v in scope.get("headers", ())}
        self._query: dict[str, list[str]] | None = None
        self._body: bytes | None = None
        self.requester: Any = None

    # -- query ------------------------------------------------------------------------------

    @property
    def query(self) -> dict[str, list[str]]:
        if self._query is None:
            raw = self.scope.get("query_string", b"")
            try:
                self._query = parse_query(raw) if raw else {}
            except (UnicodeDecodeError, ValueError):
                raise InvalidParam("The query string is not valid UTF-8") from None
            for key, values in self._query.items():
                if "\x00" in key or any("\x00" in v for v in values):
                    raise InvalidParam("The query string contains a NUL character")
        return self._query

    def query_str(self, name: str, default: str | None = None) -> str | None:
        values = self.query.get(name)
        return values[-1] if values else default

    def query_list(self, name: str) -> list[str]:
        return self.query.get(name, [])

    def query_int(
        self, name: str, default: int | None = None, *, minimum: int | None = None, maximum: int = MAX_QUERY_INT
    ) -> int | None:
        """An integer query parameter; one above ``maximum`` is read as ``maximum`` (by
        default the largest value a database integer column holds, so no caller can pass
        the database a number it cannot compare)."""
        value = self.query_str(name)
        if value is None or value == "":
            return default
        try:
            number = int(value)
        except ValueError:
            raise InvalidParam(f"query parameter '{name}' must be an integer") from None
        if minimum is not None and number < minimum:
            raise InvalidParam(f"query parameter '{name}' must be at least {minimum}")
        if number > maximum:
            number = maximum
        return number

    def query_bool(self, name: str, default: bool = False) -> bool:
        value = self.query_str(name)
        if value is None:
            return default
        if value in ("true", "1"):
            return True
        if value in ("false", "0", ""):
            return False
        raise InvalidParam(f"query parameter '{name}' must be 'true' or 'false'")

    def header(self, name: bytes) -> str | None:
        value = self.headers.get(name)
        return value.decode("latin-1") if value is not None else None

    # -- body -------------------------------------------------------------------------------

    async def body(self) -> bytes:
        if self._body is not None:
            return self._body
        limit: int = self.hs.settings.limits.max_request_body_bytes
        await self._refuse_declared_over(limit, "Request body")
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await self.receive()
            if message["type"] == "http.disconnect":
                raise _ClientGone()
            chunk = message.get("body", b"")
            size += len(chunk)
            more = message.get("more_body", False)
            if size > limit:
                await self._refuse_over(limit, "Request body", size, more)
            chunks.append(chunk)
            if not more:
                break
        self._body = b"".join(chunks)
        return self._body

    async def stream(self, limit: int) -> AsyncIterator[bytes]:
        """The request body, chunk by chunk, refusing more than ``limit`` bytes (413)."""
        await self._refuse_declared_over(limit, "The upload")
        size = 0
        while True:
            message = await self.receive()
            if message["type"] == "http.disconnect":
                raise _ClientGone()
            chunk = message.get("body", b"")
            size += len(chunk)
            more = message.get("more_body", False)
            if size > limit:
                await self._refuse_over(limit, "The upload", size, more)
            if chunk:
                yield chunk
            if not more:
                return

    async def _refuse_declared_over(self, limit: int, what: str) -> None:
        """413 when Content-Length already says more than ``limit``."""
        length = self.headers.get(b"content-length")
        if length is None:
            return
        try:
            declared = int(length)
        except ValueError:
            raise MatrixError("Invalid Content-Length", errcode="M_UNKNOWN", status=400) from None
        if declared > limit:
            await self._refuse_over(limit, what, 0, True, declared=declared)

    async def _refuse_over(
        self, limit: int, what: str, read: int, more: bool, *, declared: int | None = None
    ) -> NoReturn:
        """Raise 413 for a body over ``limit``, after reading the rest of it if that is cheap.

        Answering while the client is still sending breaks keep-alive: nginx marks
        the client connection for closing once the response ends while it is still
        reading the request body — after it has already answered with keep-alive — so
        a client that reuses the connection for its next request gets a bare
        disconnect. Reading (and dropping) a moderate excess first avoids that; past
        ``_DRAIN_MAX`` bytes — or when the client waits for ``100 Continue``, which
        reading would send — the answer says ``Connection: close`` instead (RFC 9110
        §10.1.1), so a client talking to uvicorn directly opens a new connection.
        """
        error = TooLarge(f"{what} is larger than {limit} bytes")
        budget = limit + _DRAIN_MAX
        waits_for_continue = read == 0 and self.headers.get(b"expect", b"").lower() == b"100-continue"
        if declared is not None and (declared > budget or waits_for_continue):
            more_to_read = True
        else:
            while more and read <= budget:
                message = await self.receive()
                if message["type"] == "http.disconnect":
                    raise _ClientGone()
                read += len(message.get("body", b""))
                more = message.get("more_body", False)
            more_to_read = more
        if more_to_read:
            error.close_connection = True
        raise error

    async def cancel_on_disconnect(self, work: Awaitable[T]) -> T:
        """Run ``work``, abandoning it if the client hangs up first.

        For long-polls: without this a client that disconnects (a phone changing
        networks) leaves its request waiting until the timeout, holding memory, and a
        client that reconnects repeatedly piles such waits up. Only for requests whose
        body has been read (or that have none): this consumes the ASGI receive channel.

        ``work`` runs in the request's own task; one watcher task cancels that task
        when the disconnect arrives (cheaper per long-poll than a second task for the
        work and ``asyncio.wait`` over both).
        """
        request_task = asyncio.current_task()
        assert request_task is not None
        gone = False

        async def watch() -> None:
            nonlocal gone
            while (await self.receive())["type"] != "http.disconnect":
                pass
            gone = True
            request_task.cancel()

        watcher = asyncio.get_running_loop().create_task(watch())
        try:
            return await work
        except asyncio.CancelledError:
            if not gone:
                raise
            request_task.uncancel()
            raise _ClientGone() from None
        finally:
            watcher.cancel()

    async def json(self, *, allow_empty: bool = False) -> dict[str, Any]:
        raw = await self.body()
        if not raw.strip():
            if allow_empty:
                return {}
            raise NotJson("The request body must be a JSON object")
        try:
            value = orjson.loads(raw)
        except orjson.JSONDecodeError:
            raise NotJson("The request body is not valid JSON") from None
        if not isinstance(value, dict):
            raise BadJson("The request body must be a JSON object")
        if _too_deep(value):
            raise BadJson(f"The request body is nested more than {MAX_JSON_DEPTH} levels deep")
        return value

    @property
    def access_token(self) -> str | None:
        header = self.headers.get(b"authorization")
        if header is None:
            return None
        try:
            scheme, _, token = header.decode("latin-1").partition(" ")
        except Exception:  # pragma: no cover
            return None
        if scheme.lower() != "bearer" or not token.strip():
            return None
        return token.strip()

    async def authenticate(self) -> Requester:
        """The requester behind the access token (M_MISSING_TOKEN, M_UNKNOWN_TOKEN).

        With several workers it first sees every write committed before this request
        (read-your-writes) — a revocation of this very token included — so the token
        check comes after the replication barrier.
        """
        token = self.access_token
        if token is None:
            raise MissingToken("Missing access token")
        await self.hs.replicator.barrier()  # returns at once with one process
        return await self.hs.auth.authenticate(token, self.client_ip, self.header(b"user-agent"))


MAX_JSON_DEPTH = 100


def _too_deep(value: Any) -> bool:
    """Whether JSON nests deeper than MAX_JSON_DEPTH (orjson re-encodes at most 255)."""
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if depth > MAX_JSON_DEPTH:
            return True
        if isinstance(item, dict):
            stack.extend((v, depth + 1) for v in item.values() if isinstance(v, dict | list))
        elif isinstance(item, list):
            stack.extend((v, depth + 1) for v in item if isinstance(v, dict | list))
    return False


def parse_query(raw: bytes) -> dict[str, list[str]]:
    """``parse_qs(raw, keep_blank_values=True, errors="strict")``, with a fast path for
    the usual query string (nothing percent-encoded, no ``+``) of a /sync long-poll."""
    text = raw.decode("utf-8")
    if "%" in text or "+" in text:
        return parse_qs(text, keep_blank_values=True, errors="strict")
    out: dict[str, list[str]] = {}
    for part in text.split("&"):
        if part:
            name, _, value = part.partition("=")
            out.setdefault(name, []).append(value)
    return out


class _ClientGone(Exception):
    pass


# How far past its limit a refused request body is still read (and dropped) so the
# connection stays usable; beyond this the 413 closes the connection.
_DRAIN_MAX = 16 * 1024 * 1024


@dataclass
class Route:
    method: str
    regex: re.Pattern[str]
    names: list[str]
    handler: Handler
    auth: bool
    admin_only_network: bool
    template: str
    pattern: str  # ``regex`` without its anchors (for the combined matcher)


_PARAM_RE = re.compile(r"\{([A-Za-z_]+)(?::([^}]+))?(\?)?\}")


def path_pattern(template: str) -> tuple[str, list[str]]:
    """``/rooms/{roomId}/state/{eventType}/{stateKey?}`` -> (regular expression over the
    raw path, without anchors; parameter names in order).

    ``{name:v3}`` pins a version segment (also accepting the legacy ``r0``);
    ``{name?}`` marks an optional trailing segment (an empty state key).
    """
    names: list[str] = []
    pattern = ""
    pos = 0
    for match in _PARAM_RE.finditer(template):
        literal = template[pos : match.start()]
        name, fixed, optional = match.group(1), match.group(2), match.group(3)
        if fixed is not None:
            alternatives = "r0|v3" if fixed == "v3" else re.escape(fixed)
            pattern += re.escape(literal) + f"(?:{alternatives})"
        elif optional:
            if not literal.endswith("/"):
                raise ValueError("optional segments must follow a '/'")
            pattern += re.escape(literal[:-1]) + "(?:/([^/]*))?"
            names.append(name)
        else:
            pattern += re.escape(literal) + "([^/]+)"
            names.append(name)
        pos = match.end()
    pattern += re.escape(template[pos:])
    return pattern, names


class RouteTable:
    """The routes, tried in the order they were added.

    Matching runs one combined regular expression per method (an alternation of every
    route's pattern, each wrapped in a group) instead of a Python loop over ~120
    patterns: the regex engine tries the alternatives in order, so the first route
    that matches wins, as before.
    """

    def __init__(self) -> None:
        self.routes: list[Route] = []
        self._by_method: dict[str, tuple[re.Pattern[str], dict[int, Route]]] | None = None

    def add(self, method: str, template: str, handler: Handler, *, auth: bool = True, admin_network: bool = False) -> None:
        pattern, names = path_pattern(template)
        regex = re.compile("^" + pattern + "$")
        self.routes.append(Route(method, regex, names, handler, auth, admin_network, template, pattern))
        self._by_method = None

    def compile(self) -> None:
        """Build the per-method expressions now (~10 ms for ~130 routes) rather than in
        the first request after a start."""
        self._compiled()

    def _compiled(self) -> dict[str, tuple[re.Pattern[str], dict[int, Route]]]:
        if self._by_method is None:
            by_method: dict[str, tuple[re.Pattern[str], dict[int, Route]]] = {}
            for method in dict.fromkeys(r.method for r in self.routes):
                parts: list[str] = []
                outer: dict[int, Route] = {}
                group = 1
                for route in self.routes:
                    if route.method != method:
                        continue
                    parts.append(f"({route.pattern})")
                    outer[group] = route
                    group += 1 + len(route.names)
                by_method[method] = (re.compile("|".join(parts)), outer)
            self._by_method = by_method
        return self._by_method

    def match(self, method: str, path: str) -> tuple[Route | None, dict[str, str], bool]:
        """(route, params, path_known). path_known is True if another method matches."""
        compiled = self._compiled()
        entry = compiled.get(method)
        m = entry[0].fullmatch(path) if entry is not None else None
        if m is None:
            known = any(p.fullmatch(path) is not None for other, (p, _) in compiled.items() if other != method)
            return None, {}, known
        assert entry is not None and m.lastindex is not None
        route = entry[1][m.lastindex]
        params = {}
        for offset, name in enumerate(route.names, start=m.lastindex + 1):
            raw = m.group(offset)
            value = unquote(raw, errors="strict") if raw is not None else ""
            if "\x00" in value:
                raise InvalidParam(f"path parameter '{name}' contains a NUL character")
            params[name] = value
        return route, params, True


def _parse_networks(values: Sequence[str]) -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
    return [ipaddress.ip_network(v, strict=False) for v in values]


class MatrixApp:
    """The ASGI application: lifespan, routing, auth, errors, CORS."""

    def __init__(self, routes: RouteTable, hs_factory: Callable[[], Awaitable[Any]], settings: Any) -> None:
        self._routes = routes
        self._hs_factory = hs_factory
        self.settings = settings
        self.hs: Any = None
        self._trusted = _parse_networks(settings.trusted_proxies)
        self._admin_networks = _parse_networks(settings.admin_api.allowed_networks)
        self._access_log = settings.logging.access_log

    async def __call__(self, scope: dict[str, Any], receive: Callable[..., Any], send: Callable[..., Any]) -> None:
        kind = scope["type"]
        if kind == "http":
            await self._http(scope, receive, send)
        elif kind == "lifespan":
            await self._lifespan(receive, send)

    async def _lifespan(self, receive: Callable[..., Any], send: Callable[..., Any]) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                try:
                    self._routes.compile()
                    self.hs = await self._hs_factory()
                except Exception as exc:
                    log.error("start-up failed: %s", exc)
                    await send({"type": "lifespan.startup.failed", "message": str(exc)})
                    return
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                if self.hs is not None:
                    await self.hs.close()
                await send({"type": "lifespan.shutdown.complete"})
                return

    def client_ip(self, scope: dict[str, Any]) -> str | None:
        client = scope.get("client")
        peer = client[0] if client else None
        if peer is None or not self._trusted:
            return peer
        try:
            if not any(ipaddress.ip_address(peer) in net for net in self._trusted):
                return peer
        except ValueError:
            return peer
        for name, value in scope.get("headers", ()):
            if name.lower() == b"x-forwarded-for":
                hops = [h.strip() for h in value.decode("latin-1").split(",") if h.strip()]
                for hop in reversed(hops):
                    try:
                        if not any(ipaddress.ip_address(hop) in net for net in self._trusted):
                            return hop
                    except ValueError:
                        return peer
        return peer

    def _in_admin_network(self, ip: str | None) -> bool:
        if ip is None:
            return False
        try:
            addr = ipaddress.ip_address(ip)
        except ValueError:
            return False
        return any(addr in net for net in self._admin_networks)

    async def _http(self, scope: dict[str, Any], receive: Callable[..., Any], send: Callable[..., Any]) -> None:
        method = scope["method"]
        if method == "OPTIONS":
            await _send(send, 204, b"", [])
            return
        raw_path = scope.get("raw_path") or scope["path"].encode()
        try:
            path = raw_path.decode("ascii")
        except UnicodeDecodeError:
            path = raw_path.decode("latin-1")
        response: Response | StreamResponse | dict[str, Any]
        started = time.perf_counter()
        endpoint = "unmatched"
        try:
            route, params, known = self._routes.match(method, path)
            if route is not None:
                endpoint = route.template
            if route is None:
                if known:
                    raise Unrecognized("Method not allowed for this endpoint", status=405)
                raise Unrecognized("Unrecognized request")
            ip = self.client_ip(scope)
            if route.admin_only_network and not self._in_admin_network(ip):
                raise Unrecognized("Unrecognized request")
            req = Request(scope, receive, params, self.hs, ip)
            current_client.set((ip, req.header(b"user-agent")))
            if route.auth:
                req.requester = await req.authenticate()
            response = await route.handler(req)
        except MatrixError as exc:
            response = Response(orjson.dumps(exc.to_dict()), exc.status)
            if exc.close_connection:
                response.headers = [(b"connection", b"close")]
            if exc.status == 429:
                retry = exc.extra.get("retry_after_ms")
                if isinstance(retry, int):
                    response.headers = [(b"retry-after", str(max(1, retry // 1000)).encode())]
        except _ClientGone:
            return
        except UnicodeDecodeError:
            response = Response(orjson.dumps({"errcode": "M_INVALID_PARAM", "error": "Invalid percent-encoding in the path"}), 400)
        except IntegrityError as exc:
            # Stored ciphertext failed authentication: tampering, a row moved, or a destroyed key.
            ref = secrets.token_hex(6)
            log.error("integrity check failed handling %s %s (ref %s): %s", method, scope.get("path"), ref, exc)
            response = Response(orjson.dumps({
                "errcode": "M_UNKNOWN",
                "error": f"Stored data failed its integrity check and was not served (ref {ref})",
            }), 500)
        except Exception:
            ref = secrets.token_hex(6)
            log.exception("unhandled error handling %s %s (ref %s)", method, scope.get("path"), ref)
            response = Response(orjson.dumps({"errcode": "M_UNKNOWN", "error": f"Internal server error (ref {ref})"}), 500)
        if isinstance(response, StreamResponse):
            _observe(method, endpoint, response.status, started)
            await _send_stream(send, response)
            return
        if isinstance(response, dict):
            response = Response(orjson.dumps(response))
        _observe(method, endpoint, response.status, started)
        if self._access_log:
            log.info("%s %s %d", method, scope.get("path"), response.status)
        await _send(send, response.status, response.body, response.headers)


# (method, route template, status) -> the labelled counter and histogram. Bounded: routes
# are templates (never raw paths) and statuses a handful, so this stays small; it saves
# prometheus_client's label lookup (str conversion, a lock, a dict) twice per request.
_REQUEST_METRICS: dict[tuple[str, str, int], tuple[Any, Any]] = {}


def _observe(method: str, endpoint: str, status: int, started: float) -> None:
    key = (method, endpoint, status)
    children = _REQUEST_METRICS.get(key)
    if children is None:
        children = (
            metrics.REQUESTS.labels(method, endpoint, str(status)),
            metrics.REQUEST_SECONDS.labels(method, endpoint),
        )
        _REQUEST_METRICS[key] = children
    children[0].inc()
    children[1].observe(time.perf_counter() - started)


async def _send_stream(send: Callable[..., Any], response: StreamResponse) -> None:
    headers = [*CORS_HEADERS, *SECURITY_HEADERS, *response.headers]
    if response.length is not None:
        headers.append((b"content-length", str(response.length).encode()))
    await send({"type": "http.response.start", "status": response.status, "headers": headers})
    try:
        async for chunk in response.chunks:
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
    except Exception as exc:
        # The status line has gone out: the only honest answer left is to abort the
        # transfer. Returning without the final body message makes uvicorn close the
        # connection, so the client sees a body cut short of Content-Length, never a
        # complete-looking one.
        if isinstance(exc, IntegrityError):
            log.error("aborted a streamed response: stored data failed its integrity check: %s", exc)
        else:
            log.exception("aborted a streamed response after an error")
        return
    finally:
        close = getattr(response.chunks, "aclose", None)
        if close is not None:
            await close()
    await send({"type": "http.response.body", "body": b""})


async def _send(send: Callable[..., Any], status: int, body: bytes, extra: Sequence[tuple[bytes, bytes]]) -> None:
    headers = list(JSON_HEADERS) if not extra or all(k != b"content-type" for k, _ in extra) else list(CORS_HEADERS)
    headers.extend(SECURITY_HEADERS)
    headers.extend(extra)
    headers.append((b"content-length", str(len(body)).encode()))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


# -- request-body helpers used by handlers ---------------------------------------------------


def body_str(body: dict[str, Any], key: str, *, required: bool = False, max_len: int = 65536) -> str | None:
    value = body.get(key)
    if value is None:
        if required:
            raise MissingParam(f"'{key}' is required")
        return None
    if not isinstance(value, str):
        raise BadJson(f"'{key}' must be a string")
    if len(value) > max_len:
        raise BadJson(f"'{key}' is too long")
    if "\x00" in value:
        raise BadJson(f"'{key}' contains a NUL character")
    return value
