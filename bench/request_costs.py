#!/usr/bin/env python3
"""Server CPU per request kind, measured in-process: where a message's cost goes.

Builds Bastion's ASGI application on a fresh data directory (``bastion init``:
SQLite, encryption at rest on, presence off as in the benchmarks), runs its lifespan
in this process and calls it directly — no HTTP, no sockets, no load generator — so
the figures are the application's own work (routing, auth, handlers, persistence on
its threads, serialisation, metrics). uvicorn's per-request cost comes on top;
``http_floor.py`` measures that.

Scenario: ``--users`` users, each in ``--rooms`` rooms that all of them joined (the
core scenario has 10 members per room, 2 rooms per user). Measured, as process CPU
time (every thread) divided by the count:

* ``send, one at a time``: ``PUT /send`` awaited one after another (each its own commit);
* ``send, N at once``: ``--users`` sends from different users started together (the
  persister commits them as one batch, as under load);
* ``/sync with 1 new event`` / ``with K new events``: every member's incremental
  ``/sync?timeout=0`` after one (K) message(s);
* ``/sync, nothing new``: the same with nothing new;
* ``long-poll woken``: every member's ``/sync?timeout=30000`` started, waiting, then
  one message sent that wakes them all: per response, with 1/N of the send in it
  (subtract ``send, one at a time`` / N for the long-poll's own cost); also the wall
  time from the send to the last answer and to the send's own answer (with
  ``--users 1000 --rooms 1 --phases longpoll``: a big room's fan-out).

``/sync`` uses ``loadgen.py``'s stored filter (``--filter none``: no filter). Message
bodies have 3 words unless ``--words N`` (common English words); ``--encryption off``
switches encryption at rest off (the search index is then SQLite's FTS5).

``--profile KIND`` prints cProfile's top functions (by own time) for that phase.

    bench/request_costs.py [--users 10] [--rooms 2] [--iterations 200] [--k 5] [--profile sync1]
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import io
import json
import pstats
import random
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote

import orjson
import yaml

BENCH_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH_DIR))

from benchlib import CHEAP_PASSWORD_HASHING  # noqa: E402
from loadgen import VOCABULARY, sync_filter  # noqa: E402


class App:
    """Calls an ASGI application directly."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def call(self, method: str, path: str, *, body: Any = None, token: str | None = None,
                   query: str = "") -> tuple[int, Any]:
        headers = [(b"host", b"localhost")]
        if token:
            headers.append((b"authorization", b"Bearer " + token.encode()))
        data = b""
        if body is not None:
            data = orjson.dumps(body)
            headers += [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]
        scope = {
            "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method,
            "scheme": "http", "path": unquote(path), "raw_path": path.encode(), "query_string": query.encode(),
            "headers": headers, "client": ("127.0.0.1", 40000), "server": ("127.0.0.1", 8008), "root_path": "",
        }
        delivered = False
        never = asyncio.get_running_loop().create_future()

        async def receive() -> dict[str, Any]:
            nonlocal delivered
            if not delivered:
                delivered = True
                return {"type": "http.request", "body": data, "more_body": False}
            return await never  # the client never hangs up

        status = 0
        chunks: list[bytes] = []

        async def send(message: dict[str, Any]) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            else:
                chunks.append(message.get("body", b""))

        await self.app(scope, receive, send)
        never.cancel()
        raw = b"".join(chunks)
        return status, (orjson.loads(raw) if raw else None)

    async def ok(self, method: str, path: str, **kwargs: Any) -> Any:
        status, answer = await self.call(method, path, **kwargs)
        if status != 200:
            raise RuntimeError(f"{method} {path}: {status} {answer}")
        return answer


async def lifespan(app: Any) -> Callable[[], Awaitable[None]]:
    inbox: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
    outbox: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
    task = asyncio.create_task(app({"type": "lifespan", "asgi": {"version": "3.0"}}, inbox.get, outbox.put))
    await inbox.put({"type": "lifespan.startup"})
    started = await outbox.get()
    if started["type"] != "lifespan.startup.complete":
        raise RuntimeError(started)

    async def stop() -> None:
        await inbox.put({"type": "lifespan.shutdown"})
        await outbox.get()
        await task

    return stop


def thread_cpu() -> dict[str, float]:
    """CPU seconds of each of this process's Python threads, by thread name (pool
    threads' numeric suffixes dropped)."""
    result: dict[str, float] = {}
    for thread in threading.enumerate():
        if thread.ident is None:
            continue
        try:
            cpu = time.clock_gettime(time.pthread_getcpuclockid(thread.ident))
        except (OSError, ProcessLookupError):
            continue
        name = thread.name.rsplit("_", 1)[0] if thread.name[-1:].isdigit() else thread.name
        result[name] = result.get(name, 0.0) + cpu
    return result


class Phase:
    def __init__(self, name: str, profile: bool) -> None:
        self.name = name
        self.profiler = cProfile.Profile() if profile else None
        self.cpu = 0.0
        self.loop_cpu = 0.0
        self.count = 0
        self._t0 = 0.0
        self._l0 = 0.0
        self.threads: dict[str, float] = {}
        self.walls: list[float] = []  # long-poll phase: send to last answer, seconds
        self.send_walls: list[float] = []  # long-poll phase: the send's own answer, seconds
        self._th0: dict[str, float] = {}

    def __enter__(self) -> Phase:
        if self.profiler:
            self.profiler.enable()
        self._th0 = thread_cpu()
        self._t0 = time.process_time()
        self._l0 = time.thread_time()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.cpu += time.process_time() - self._t0
        self.loop_cpu += time.thread_time() - self._l0
        for name, cpu in thread_cpu().items():
            self.threads[name] = self.threads.get(name, 0.0) + cpu - self._th0.get(name, 0.0)
        if self.profiler:
            self.profiler.disable()

    def us_per_call(self) -> float:
        return round(1e6 * self.cpu / max(self.count, 1), 1)

    def loop_us_per_call(self) -> float:
        return round(1e6 * self.loop_cpu / max(self.count, 1), 1)


async def run(a: argparse.Namespace, work: Path) -> dict[str, Any]:
    config_path = work / "bastion.yaml"
    subprocess.run([sys.executable, "-m", "bastion", "init", "--config", str(config_path), "--server-name",
                    "localhost", "--data-dir", str(work / "data"), "--port", "8008"], check=True, capture_output=True)
    config = yaml.safe_load(config_path.read_text())
    config.setdefault("presence", {})["enabled"] = False
    config.setdefault("limits", {})["sync_pacing_ms"] = 0
    config["encryption"]["enabled"] = a.encryption == "on"
    config["password_hashing"] = dict(CHEAP_PASSWORD_HASHING)  # only the set-up logs in
    config_path.write_text(yaml.safe_dump(config))

    from bastion.app import create_app
    from bastion.settings import load_settings

    settings = load_settings(config_path)
    asgi = create_app(settings)
    stop = await lifespan(asgi)
    app = App(asgi)
    hs = asgi.hs
    try:
        password = "bench password 12345"
        tokens: list[str] = []
        users: list[str] = []
        for i in range(a.users):
            user = await hs.accounts.create_account(f"u{i}", password)
            login = await app.ok("POST", "/_matrix/client/v3/login", body={
                "type": "m.login.password", "identifier": {"type": "m.id.user", "user": f"u{i}"}, "password": password})
            users.append(user)
            tokens.append(login["access_token"])
        rooms = []
        for _ in range(a.rooms):
            created = await app.ok("POST", "/_matrix/client/v3/createRoom", token=tokens[0],
                                   body={"preset": "public_chat"})
            room = created["room_id"]
            for t in tokens[1:]:
                await app.ok("POST", f"/_matrix/client/v3/join/{quote(room)}", token=t, body={})
            rooms.append(room)
        filter_param = ""
        if a.filter == "loadgen":
            filter_ids = [
                (await app.ok("POST", f"/_matrix/client/v3/user/{quote(u)}/filter", token=t, body=sync_filter(100)))[
                    "filter_id"]
                for u, t in zip(users, tokens, strict=True)
            ]
            filter_param = "&filter=" + filter_ids[0]  # the same ID on every account (one per user)
            if len(set(filter_ids)) != 1:
                raise RuntimeError("filter IDs differ between users")
        since: list[str] = []
        for t in tokens:
            since.append((await app.ok("GET", "/_matrix/client/v3/sync", token=t,
                                       query="timeout=0" + filter_param))["next_batch"])

        txn = 0
        rng = random.Random(7)

        def body_text() -> str:
            if a.words <= 0:
                return f"message {txn} " + "x" * 60  # 3 words, as before --words
            return " ".join(rng.choice(VOCABULARY) for _ in range(a.words))

        async def send(sender: int, room: str) -> None:
            nonlocal txn
            txn += 1
            await app.ok("PUT", f"/_matrix/client/v3/rooms/{quote(room)}/send/m.room.message/t{txn}",
                         token=tokens[sender], body={"msgtype": "m.text", "body": body_text()})

        async def sync_all(phase: Phase, expect: int) -> None:
            with phase:
                for i, t in enumerate(tokens):
                    answer = await app.ok("GET", "/_matrix/client/v3/sync", token=t,
                                          query=f"since={quote(since[i])}&timeout=0" + filter_param)
                    since[i] = answer["next_batch"]
                    phase.count += 1
                    if expect:
                        got = sum(len(r["timeline"]["events"]) for r in answer["rooms"]["join"].values())
                        if got != expect:
                            raise RuntimeError(f"expected {expect} events, got {got}")

        async def long_polls(phase: Phase) -> None:
            """Every member long-polls; one message wakes them all (the benchmark's delivery)."""
            with phase:
                polls = [
                    asyncio.create_task(app.ok("GET", "/_matrix/client/v3/sync", token=t,
                                               query=f"since={quote(since[i])}&timeout=30000" + filter_param))
                    for i, t in enumerate(tokens)
                ]
                for _ in range(5):  # let every long-poll reach its wait
                    await asyncio.sleep(0)
                t0 = time.perf_counter()
                await send(0, rooms[0])
                phase.send_walls.append(time.perf_counter() - t0)
                answers = await asyncio.gather(*polls)
                phase.walls.append(time.perf_counter() - t0)
                for i, answer in enumerate(answers):
                    since[i] = answer["next_batch"]
                    phase.count += 1

        profile = a.profile
        phases = {
            "send1": Phase("send, one at a time", profile == "send1"),
            "sendN": Phase(f"send, {a.users} at once", profile == "sendN"),
            "sync1": Phase("/sync with 1 new event", profile == "sync1"),
            "syncK": Phase(f"/sync with {a.k} new events", profile == "syncK"),
            "sync0": Phase("/sync, nothing new", profile == "sync0"),
            "longpoll": Phase("long-poll woken (+ 1/N send)", profile == "longpoll"),
        }
        longpoll_only = a.phases == ["longpoll"]  # the one phase --phases can name today
        for it in range(a.iterations):
            room = rooms[it % len(rooms)]
            if longpoll_only:
                await long_polls(phases["longpoll"])
                continue
            with phases["send1"]:
                await send(it % a.users, room)
                phases["send1"].count += 1
            await sync_all(phases["sync1"], 1)
            await sync_all(phases["sync0"], 0)
            if it % a.k == 0:
                with phases["sendN"]:
                    await asyncio.gather(*(send(u, room) for u in range(a.users)))
                    phases["sendN"].count += a.users
                await sync_all(Phase("drain", False), a.users)
                with phases["send1"]:
                    for _ in range(a.k):
                        await send(it % a.users, room)
                        phases["send1"].count += 1
                await sync_all(phases["syncK"], a.k)
            await long_polls(phases["longpoll"])
        result = {name: {"what": p.name, "calls": p.count, "us_per_call": p.us_per_call(),
                         "loop_us_per_call": p.loop_us_per_call(),
                         "threads_us_per_call": {k: round(1e6 * v / max(p.count, 1), 1)
                                                 for k, v in sorted(p.threads.items()) if v > 0},
                         **({"wall_ms_median": round(1e3 * sorted(p.walls)[len(p.walls) // 2], 1),
                             "send_wall_ms_median": round(1e3 * sorted(p.send_walls)[len(p.send_walls) // 2], 1)}
                            if p.walls else {})}
                  for name, p in phases.items() if p.count}
        if profile:
            p = phases[profile]
            assert p.profiler is not None
            stream = io.StringIO()
            stats = pstats.Stats(p.profiler, stream=stream).sort_stats("tottime")
            stats.print_stats(a.top)
            for name in a.callers:
                stats.print_callers(name)
            result["profile"] = stream.getvalue()
        return result
    finally:
        await stop()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--users", type=int, default=10)
    p.add_argument("--rooms", type=int, default=2)
    p.add_argument("--iterations", type=int, default=200)
    p.add_argument("--k", type=int, default=5, help="events per /sync in the K phase")
    p.add_argument("--filter", choices=["loadgen", "none"], default="loadgen",
                   help="/sync with loadgen.py's stored filter (as in the benchmarks), or none")
    p.add_argument("--words", type=int, default=0,
                   help="words per message body, drawn from a common-word list (0: the old 3-word body)")
    p.add_argument("--encryption", choices=["on", "off"], default="on", help="encryption at rest")
    p.add_argument("--profile", choices=["send1", "sendN", "sync1", "syncK", "sync0", "longpoll"])
    p.add_argument("--phases", choices=["longpoll"], action="append",
                   help="run only these phases (longpoll alone: a big room's fan-out, e.g. --users 1000 --rooms 1)")
    p.add_argument("--top", type=int, default=40)
    p.add_argument("--callers", action="append", default=[], help="with --profile: who calls functions matching this")
    p.add_argument("--json-out", type=Path)
    a = p.parse_args()
    try:
        import uvloop
        runner = uvloop.run
    except ImportError:  # pragma: no cover
        runner = asyncio.run
    with tempfile.TemporaryDirectory(prefix="bastion-costs-") as tmp:
        result = runner(run(a, Path(tmp)))
    profile = result.pop("profile", None)
    for row in result.values():
        print(f"{row['what']:<28} {row['us_per_call']:>9.1f} µs, event loop's thread {row['loop_us_per_call']:>7.1f} µs"
              f"  ({row['calls']} calls)")
        print(f"{'':<28} by thread (µs): {row['threads_us_per_call']}")
        if "wall_ms_median" in row:
            print(f"{'':<28} send to the last answer: {row['wall_ms_median']} ms, to the send's own answer:"
                  f" {row['send_wall_ms_median']} ms (medians)")
    if profile:
        print(profile)
    if a.json_out:
        a.json_out.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
