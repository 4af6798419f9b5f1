"""The HTTP floor: server CPU per request of an ASGI app that does nothing.

Bastion serves HTTP with uvicorn (httptools parser, uvloop event loop). This starts
uvicorn, same stack, with an app that answers every request with a fixed small JSON
body (no routing, no auth, no work), drives it over 50 keep-alive connections, and
reports the requests per second and the server's CPU per request. That is the least
any request can cost on this stack; what a /sync or a send costs in Bastion above it
is the application's work (docs/performance.md, "What the #7 throughput target
needs"). With ``--client aiohttp`` (the default, as in every figure recorded before
2026-12-07) the client is the limit and the server wakes up for every few requests;
``--client rawhttp`` drives it ~3x harder and gives the floor at saturation.

It also reports the *client's* CPU per request, for either HTTP client the load
generator can use (``bench/rawhttp.py``), on uvloop as the load generator runs them,
each answer's JSON decoded as the load generator does.

    .venv/bin/python bench/http_floor.py [--connections 50] [--duration 10] [--client rawhttp]
"""

from __future__ import annotations

import argparse
import asyncio
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
from benchlib import free_port
from loadgen import loads, process_cpu_seconds, run_async
from rawhttp import HttpClient

APP = '''
BODY = b'{"next_batch":"s1_2_3_4_5_6_7","rooms":{},"to_device":{"events":[]}}'
HEADERS = [(b"content-type", b"application/json"), (b"content-length", str(len(BODY)).encode())]

async def app(scope, receive, send):
    if scope["type"] != "http":
        return
    await send({"type": "http.response.start", "status": 200, "headers": HEADERS})
    await send({"type": "http.response.body", "body": BODY})
'''


async def drive(
    base: str, target: str, client: str, connections: int, duration: float, pid: int
) -> tuple[int, float, float, float]:
    """(requests, seconds, server CPU seconds, client CPU seconds) of the measured run."""
    count = 0
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=connections)) as session:
        raw = HttpClient(base)

        async def get_aiohttp() -> bytes:
            async with session.get(base + target) as resp:
                return await resp.read()

        async def get_raw() -> bytes:
            return (await raw.request("GET", target))[1]

        get = get_raw if client == "rawhttp" else get_aiohttp

        async def one(stop: float) -> None:
            nonlocal count
            while time.monotonic() < stop:
                loads(await get())
                count += 1

        await asyncio.gather(*(one(time.monotonic() + 1.0) for _ in range(connections)))  # warm-up
        count = 0
        cpu0, t0, own0 = process_cpu_seconds(pid), time.monotonic(), time.process_time()
        await asyncio.gather(*(one(t0 + duration) for _ in range(connections)))
        own = time.process_time() - own0
        raw.close()
        return count, time.monotonic() - t0, process_cpu_seconds(pid) - cpu0, own


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--connections", type=int, default=50)
    p.add_argument("--duration", type=float, default=10.0)
    p.add_argument("--client", choices=["aiohttp", "rawhttp"], default="aiohttp")
    a = p.parse_args()
    port = free_port()
    with tempfile.TemporaryDirectory() as tmp:
        Path(tmp, "floor_app.py").write_text(APP)
        server = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", "floor_app:app", "--port", str(port), "--loop", "uvloop",
             "--http", "httptools", "--log-level", "warning", "--no-access-log"],
            cwd=tmp,
        )
        try:
            time.sleep(1.5)
            target = "/_matrix/client/v3/sync?since=s1_2_3_4_5_6_7&timeout=30000"
            count, seconds, cpu, own = run_async(
                drive(f"http://127.0.0.1:{port}", target, a.client, a.connections, a.duration, server.pid)
            )
        finally:
            server.terminate()
            server.wait()
    print(f"{count / seconds:,.0f} requests/s; server {cpu / seconds:.2f} cores, "
          f"{cpu / count * 1e6:.0f} us of server CPU per request; client ({a.client}) "
          f"{own / seconds:.2f} cores, {own / count * 1e6:.0f} us per request ({a.connections} connections, {seconds:.1f} s)")


if __name__ == "__main__":
    main()
