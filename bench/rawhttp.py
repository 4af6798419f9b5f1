"""A small HTTP/1.1 keep-alive client for the load generator's measured requests.

Why not aiohttp, which the rest of bench/ uses: on this 2-core machine the load
generator shares the CPU with the server it measures, and aiohttp's client costs
~170 µs of CPU per request (its request and response objects, headers multidict,
timeouts, tracing hooks, cookie handling — all Python). This client writes a
pre-formatted request and parses the answer with ``httptools`` (the C parser uvicorn
serves Bastion with, a dependency already), ~30 µs per request: measured with
``bench/http_floor.py --client``, docs/performance.md.

What it does not do, because the load generator does not need it: TLS, redirects,
cookies, compression, proxies, ``Expect: 100-continue``, pipelining, HEAD requests,
``1xx`` answers, bodies delimited by the server closing the connection (uvicorn and
nginx send neither). A connection carries one request at a time; idle connections are
reused last-in first-out. As aiohttp does, a request that fails on a *reused*
connection before any byte of an answer arrived (the server closed it while idle) is
sent once more on a new one; the timeout covers connecting, sending and the answer.
Errors are Python's own (``ConnectionError`` and its subclasses, ``TimeoutError``,
``OSError``), so the load generator's error counts name them, not aiohttp's classes.
"""

from __future__ import annotations

import asyncio
from typing import cast
from urllib.parse import urlsplit

import httptools


class _Connection(asyncio.Protocol):
    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.waiter: asyncio.Future[tuple[int, bytes]] | None = None
        self.chunks: list[bytes] = []
        self.closed = False
        self.keep_alive = True
        self.answering = False  # a byte of the current request's answer has arrived

    # -- asyncio.Protocol ------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass

    def data_received(self, data: bytes) -> None:
        self.answering = True
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._fail(ConnectionError(f"malformed HTTP response: {exc}"))

    def eof_received(self) -> bool:
        self._fail(ConnectionError("server closed the connection"))
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._fail(exc if exc is not None else ConnectionError("connection lost"))

    # -- httptools callbacks ---------------------------------------------------------------------

    def on_body(self, body: bytes) -> None:
        self.chunks.append(body)

    def on_message_complete(self) -> None:
        self.keep_alive = self.parser.should_keep_alive()
        waiter, self.waiter = self.waiter, None
        body = b"".join(self.chunks)
        self.chunks = []
        if waiter is not None and not waiter.done():
            waiter.set_result((self.parser.get_status_code(), body))

    # -- helpers ---------------------------------------------------------------------------------

    def _fail(self, exc: BaseException) -> None:
        self.closed = True
        waiter, self.waiter = self.waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_exception(exc)
        if self.transport is not None:
            self.transport.abort()

    def send(self, data: bytes) -> asyncio.Future[tuple[int, bytes]]:
        if self.closed or self.transport is None:
            raise ConnectionError("connection closed")
        assert self.waiter is None
        self.answering = False
        self.waiter = asyncio.get_running_loop().create_future()
        self.transport.write(data)
        return self.waiter


class HttpClient:
    """Requests to one ``http://host:port`` origin over a pool of keep-alive connections."""

    def __init__(self, base_url: str) -> None:
        parts = urlsplit(base_url)
        if parts.scheme != "http" or parts.hostname is None:
            raise ValueError(f"rawhttp speaks plain http only, not {base_url!r}")
        self.host = parts.hostname
        self.port = parts.port or 80
        self.prefix = parts.path.rstrip("/")
        self._host_line = f"Host: {parts.netloc}\r\n".encode()
        self._idle: list[_Connection] = []

    async def request(
        self, method: str, target: str, headers: bytes = b"", body: bytes | None = None, timeout: float = 60.0
    ) -> tuple[int, bytes]:
        """(status, body) of ``method target``. ``target`` is the encoded path and query;
        ``headers`` are preformatted ``Name: value\\r\\n`` lines. Raises ``TimeoutError`` or
        ``ConnectionError``/``OSError`` (the connection is then dropped)."""
        head = f"{method} {self.prefix}{target} HTTP/1.1\r\n".encode() + self._host_line + headers
        if body is not None:
            data = head + b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body
        else:
            data = head + b"\r\n"
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        conn: _Connection | None = None
        while self._idle and conn is None:
            idle = self._idle.pop()
            conn = None if idle.closed else idle
        if conn is not None:
            try:
                return await self._exchange(conn, data, deadline, timeout)
            except ConnectionError:
                if conn.answering:
                    raise
                # Closed by the server while idle, before it read this request: once more.
        try:
            _, conn = await asyncio.wait_for(
                loop.create_connection(_Connection, self.host, self.port), max(0.0, deadline - loop.time())
            )
        except TimeoutError:
            raise TimeoutError(f"no connection in {timeout} s") from None
        return await self._exchange(conn, data, deadline, timeout)

    async def _exchange(
        self, conn: _Connection, data: bytes, deadline: float, timeout: float
    ) -> tuple[int, bytes]:
        future = conn.send(data)
        timer = asyncio.get_running_loop().call_at(deadline, conn._fail, TimeoutError(f"no answer in {timeout} s"))
        try:
            answer = await future
        except BaseException:
            conn._fail(ConnectionError("request abandoned"))
            raise
        finally:
            timer.cancel()
        if conn.keep_alive and not conn.closed:
            self._idle.append(conn)
        else:
            conn._fail(ConnectionError("closed after the answer"))
        return answer

    def close(self) -> None:
        for conn in self._idle:
            conn._fail(ConnectionError("client closed"))
        self._idle.clear()
