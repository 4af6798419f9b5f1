"""bench/rawhttp.py, the load generator's HTTP client, against real sockets: a server
written out byte by byte, so each case (keep-alive, chunked bodies, ``Connection:
close``, a server that hangs up, one that never answers) is exactly what it says."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

from rawhttp import HttpClient

Handler = Callable[[bytes, asyncio.StreamWriter], Awaitable[bool]]  # -> keep the connection


async def read_request(reader: asyncio.StreamReader) -> bytes | None:
    """One request (head and Content-Length body), or None at end of stream."""
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError:
        return None
    length = 0
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":", 1)[1])
    return head + (await reader.readexactly(length) if length else b"")


async def serve(handler: Handler) -> tuple[asyncio.Server, str, list[bytes], list[int]]:
    """A server on a free port; returns it, its base URL, the requests it read and, per
    request, the number of the connection it came on."""
    requests: list[bytes] = []
    connection_of: list[int] = []
    connections = 0

    async def on_connect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1
        number = connections
        while (request := await read_request(reader)) is not None:
            requests.append(request)
            connection_of.append(number)
            if not await handler(request, writer):
                break
        writer.close()

    server = await asyncio.start_server(on_connect, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    return server, f"http://127.0.0.1:{port}", requests, connection_of


def response(body: bytes, status: str = "200 OK", extra: bytes = b"") -> bytes:
    return f"HTTP/1.1 {status}\r\nContent-Length: {len(body)}\r\n".encode() + extra + b"\r\n" + body


@asynccontextmanager
async def client_of(handler: Handler) -> AsyncIterator[tuple[HttpClient, list[bytes], list[int]]]:
    """A client of a fresh server; the server's request log and connection numbers."""
    server, base, requests, connection_of = await serve(handler)
    client = HttpClient(base)
    try:
        yield client, requests, connection_of
    finally:
        client.close()
        server.close()


def test_requests_reuse_one_keep_alive_connection_and_carry_headers_and_body() -> None:
    async def scenario() -> None:
        async def echo(request: bytes, writer: asyncio.StreamWriter) -> bool:
            writer.write(response(b'{"n":%d}' % len(request)))
            return True

        async with client_of(echo) as (client, requests, connection_of):
            status, body = await client.request("GET", "/a?x=1", b"Authorization: Bearer t\r\n")
            assert status == 200 and body.startswith(b'{"n":')
            status, _ = await client.request("PUT", "/b", b"Content-Type: application/json\r\n", b'{"k":1}')
            assert status == 200
            assert requests[0].startswith(b"GET /a?x=1 HTTP/1.1\r\n")
            assert b"\r\nAuthorization: Bearer t\r\n" in requests[0]
            assert requests[1].startswith(b"PUT /b HTTP/1.1\r\n") and requests[1].endswith(b'\r\n\r\n{"k":1}')
            assert b"\r\nContent-Length: 7\r\n" in requests[1]
            assert connection_of == [1, 1]  # the second request reused the first connection

    asyncio.run(scenario())


def test_concurrent_requests_get_their_own_connections_and_answers() -> None:
    async def scenario() -> None:
        async def slow_echo(request: bytes, writer: asyncio.StreamWriter) -> bool:
            path = request.split(b" ")[1]
            await asyncio.sleep(0.05 if path == b"/slow" else 0)
            writer.write(response(path))
            return True

        async with client_of(slow_echo) as (client, _, connection_of):
            answers = await asyncio.gather(client.request("GET", "/slow"), client.request("GET", "/fast"))
            assert answers == [(200, b"/slow"), (200, b"/fast")]
            assert sorted(connection_of) == [1, 2]

    asyncio.run(scenario())


def test_a_chunked_answer_is_joined_and_an_error_status_is_returned() -> None:
    async def chunked(request: bytes, writer: asyncio.StreamWriter) -> bool:
        writer.write(
            b"HTTP/1.1 429 Too Many Requests\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"5\r\n{\"a\":\r\n3\r\n12}\r\n0\r\n\r\n"
        )
        return True

    async def scenario() -> None:
        async with client_of(chunked) as (client, _, _):
            assert await client.request("GET", "/") == (429, b'{"a":12}')

    asyncio.run(scenario())


def test_connection_close_and_a_server_hanging_up_idle_are_not_reused() -> None:
    async def scenario() -> None:
        async def close_after(request: bytes, writer: asyncio.StreamWriter) -> bool:
            if b"/close" in request:
                writer.write(response(b"bye", extra=b"Connection: close\r\n"))
                return False
            writer.write(response(b"ok"))
            return not request.startswith(b"GET /hangup")  # answer, then hang up while idle

        async with client_of(close_after) as (client, _, connection_of):
            assert await client.request("GET", "/close") == (200, b"bye")
            assert await client.request("GET", "/hangup") == (200, b"ok")
            await asyncio.sleep(0.05)  # the server's close reaches the idle connection
            assert await client.request("GET", "/next") == (200, b"ok")
            assert connection_of == [1, 2, 3]

    asyncio.run(scenario())


def test_no_answer_in_time_raises_timeout_and_drops_the_connection() -> None:
    async def scenario() -> None:
        async def never(request: bytes, writer: asyncio.StreamWriter) -> bool:
            if b"/never" in request:
                await asyncio.sleep(10)
            writer.write(response(b"ok"))
            return True

        async with client_of(never) as (client, _, connection_of):
            with pytest.raises(TimeoutError):
                await client.request("GET", "/never", timeout=0.1)
            assert await client.request("GET", "/after") == (200, b"ok")
            assert connection_of == [1, 2]  # the timed-out connection was not reused

    asyncio.run(scenario())


def test_a_server_that_hangs_up_mid_request_raises_connection_error() -> None:
    async def scenario() -> None:
        async def hang_up(request: bytes, writer: asyncio.StreamWriter) -> bool:
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\npartial")
            return False

        async with client_of(hang_up) as (client, _, _):
            with pytest.raises(ConnectionError):
                await client.request("GET", "/")

    asyncio.run(scenario())


def test_a_reused_connection_the_server_dropped_unanswered_is_retried_once_on_a_new_one() -> None:
    async def scenario() -> None:
        dropped: list[bytes] = []

        async def drop_second(request: bytes, writer: asyncio.StreamWriter) -> bool:
            if b"/second" in request and not dropped:
                dropped.append(request)
                return False  # closed without an answer, as a server timing out an idle connection
            writer.write(response(b"ok"))
            return True

        async with client_of(drop_second) as (client, requests, connection_of):
            assert await client.request("GET", "/first") == (200, b"ok")
            assert await client.request("PUT", "/second", b"", b"{}") == (200, b"ok")
            assert connection_of == [1, 1, 2]  # read and dropped on the first, answered on a new one
            assert requests[1] == requests[2]

    asyncio.run(scenario())


def test_a_cancelled_request_closes_its_connection() -> None:
    async def scenario() -> None:
        async def slow(request: bytes, writer: asyncio.StreamWriter) -> bool:
            await asyncio.sleep(0.3 if b"/slow" in request else 0)
            writer.write(response(b"ok"))
            return True

        async with client_of(slow) as (client, _, connection_of):
            task = asyncio.create_task(client.request("GET", "/slow"))
            await asyncio.sleep(0.05)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            assert await client.request("GET", "/next") == (200, b"ok")
            assert connection_of == [1, 2]  # the answer due on the first never reaches the next request

    asyncio.run(scenario())


def test_an_answer_without_a_body() -> None:
    async def no_content(request: bytes, writer: asyncio.StreamWriter) -> bool:
        writer.write(b"HTTP/1.1 204 No Content\r\n\r\n")
        return True

    async def scenario() -> None:
        async with client_of(no_content) as (client, _, connection_of):
            assert await client.request("GET", "/") == (204, b"")
            assert await client.request("GET", "/") == (204, b"")
            assert connection_of == [1, 1]

    asyncio.run(scenario())


def test_only_plain_http_is_accepted() -> None:
    with pytest.raises(ValueError):
        HttpClient("https://example.org")
