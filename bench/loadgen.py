#!/usr/bin/env python3
"""Open-loop load generator for Matrix homeservers, over the Client-Server API only.

Scenario: ``--users`` accounts (registered with the Synapse-compatible shared-secret
admin API) spread over ``--rooms`` private rooms of ``--room-size`` members each.
Every user long-polls ``/sync``; an open-loop scheduler sends ``--rate`` messages a
second in total, round-robin over the rooms and, within a room, over its members.

Open loop: message *k* is due at ``t0 + k / rate`` whatever happened to earlier
messages. A send that cannot be issued within ``--late-ms`` of its due time is
counted as *late*. Every latency is measured from the due time, so a client that
falls behind makes the server look slower, never faster.

Each message body carries the run id, its index *k* and its due time (integer
microseconds: event content must be canonical JSON, which has no floats). Delivery
latency is the time a receiving member (never the sender) sees the message in a
``/sync`` response minus its due time: one message in a room of 10 is 9 deliveries.
Deliveries still missing after the drain period count as errors.

Timestamps are ``time.monotonic()``, which on Linux is one clock for every process
on the machine, so worker processes (``--processes``) can time each other's
messages. The load generator must run on the same machine as itself, which it does.

Only messages due inside the measured window (after ``--warmup``) are counted.
Server CPU (utime + stime of ``--server-pid`` and its descendants) is read from
``/proc`` at the start and end of that window; RSS is VmRSS at the end and the peak
VmHWM. The load generator's own CPU over the same window is reported too, so a
saturated client shows up in the report.

Run ``loadgen.py --help`` for the options; ``bench/README.md`` for the whole story.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import hmac
import itertools
import json
import math
import multiprocessing
import os
import random
import resource
import secrets
import signal
import sys
import time
import traceback
from array import array
from collections import Counter
from collections.abc import Callable, Coroutine, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from multiprocessing.connection import Connection
from multiprocessing.connection import wait as wait_for_connections
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import quote

import aiohttp
from rawhttp import HttpClient
from yarl import URL

try:
    import orjson

    def dumps(value: Any) -> bytes:
        return orjson.dumps(value)

    loads: Callable[[bytes], Any] = orjson.loads
except ImportError:  # pragma: no cover - orjson is optional, only faster

    def dumps(value: Any) -> bytes:
        return json.dumps(value, separators=(",", ":")).encode()

    loads = json.loads

try:
    import uvloop

    LOOP_FACTORY: Callable[[], asyncio.AbstractEventLoop] | None = uvloop.new_event_loop
except ImportError:  # pragma: no cover - uvloop is optional, only faster
    LOOP_FACTORY = None

T = TypeVar("T")

STATE_FORMAT = 1
CLIENT_V3 = "/_matrix/client/v3"


# -- options ----------------------------------------------------------------------------------


# Common English words (and a few of an office's), for --body-words: real messages
# repeat words, and the blind search index writes one row per distinct word.
VOCABULARY = (
    "the", "be", "to", "of", "and", "a", "in", "that", "have", "it", "for", "not", "on", "with",
    "he", "as", "you", "do", "at", "this", "but", "his", "by", "from", "they", "we", "say", "her",
    "she", "or", "an", "will", "my", "one", "all", "would", "there", "their", "what", "so", "up",
    "out", "if", "about", "who", "get", "which", "go", "me", "when", "make", "can", "like", "time",
    "no", "just", "him", "know", "take", "people", "into", "year", "your", "good", "some", "could",
    "them", "see", "other", "than", "then", "now", "look", "only", "come", "its", "over", "think",
    "also", "back", "after", "use", "two", "how", "our", "work", "first", "well", "way", "even",
    "new", "want", "because", "any", "these", "give", "day", "most", "us", "deploy", "server",
    "release", "meeting", "review", "ticket", "patch", "build", "fix", "test", "customer", "report",
)


@dataclass(frozen=True)
class Options:
    base_url: str
    shared_secret: str | None
    server_pids: tuple[int, ...]
    aux_pids: tuple[int, ...]
    users: int
    rooms: int
    room_size: int
    rate: float
    duration: float
    warmup: float
    drain: float
    processes: int
    json_out: Path | None
    state_file: Path | None
    setup_only: bool
    user_prefix: str
    timeline_limit: int
    sync_timeout_ms: int
    late_ms: float
    p99_ms: float
    send_timeout: float
    setup_concurrency: int
    seed: int
    quiet: bool
    body_words: int = 0
    http_client: str = "rawhttp"


def parse_args(argv: Sequence[str] | None = None) -> Options:
    p = argparse.ArgumentParser(
        description="Open-loop Matrix load generator: long-polling /sync users, fixed-rate sender.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument(
        "--base-url", required=True, help="homeserver base URL, e.g. http://127.0.0.1:8008"
    )
    p.add_argument(
        "--shared-secret",
        help="registration shared secret (needed unless --state-file already exists)",
    )
    p.add_argument(
        "--server-pid",
        type=int,
        action="append",
        default=[],
        help="server process id, for CPU and RSS from /proc (repeatable: several workers are summed)",
    )
    p.add_argument(
        "--aux-pid",
        type=int,
        action="append",
        default=[],
        help="helper process (nginx, redis, database backend) whose CPU and RSS are reported"
        " separately from the server's (repeatable, summed)",
    )
    p.add_argument("--users", type=int, default=100)
    p.add_argument("--rooms", type=int, default=20)
    p.add_argument("--room-size", type=int, default=10, help="members per room")
    p.add_argument(
        "--rate", type=float, default=10.0, help="messages per second, all rooms together"
    )
    p.add_argument("--duration", type=float, default=15.0, help="measured window, seconds")
    p.add_argument(
        "--warmup", type=float, default=3.0, help="seconds of load before the measured window"
    )
    p.add_argument(
        "--drain", type=float, default=3.0, help="seconds to keep syncing after the last send"
    )
    p.add_argument(
        "--processes", type=int, default=1, help="worker processes to split the users over"
    )
    p.add_argument("--json-out", type=Path, help="write the full report here as JSON")
    p.add_argument(
        "--state-file",
        type=Path,
        help="reuse the users and rooms recorded in this file; create them and write it if it does not exist",
    )
    p.add_argument(
        "--setup-only",
        action="store_true",
        help="create users and rooms (and --state-file), then exit",
    )
    p.add_argument(
        "--user-prefix", default=None, help="localpart prefix (default: random per setup)"
    )
    p.add_argument(
        "--timeline-limit", type=int, default=100, help="timeline limit in the /sync filter"
    )
    p.add_argument("--sync-timeout-ms", type=int, default=30_000, help="/sync long-poll timeout")
    p.add_argument(
        "--late-ms",
        type=float,
        default=10.0,
        help="a send issued this much after its due time is late",
    )
    p.add_argument(
        "--p99-ms", type=float, default=100.0, help="delivery p99 bound for the pass/fail verdict"
    )
    p.add_argument(
        "--send-timeout", type=float, default=10.0, help="seconds before a send counts as failed"
    )
    p.add_argument(
        "--setup-concurrency", type=int, default=8, help="parallel requests during setup"
    )
    p.add_argument(
        "--body-words",
        type=int,
        default=0,
        help="common English words added to each message body (0: only the 3-word tag); "
        "the blind search index with encryption at rest costs per word",
    )
    p.add_argument(
        "--http-client",
        choices=["rawhttp", "aiohttp"],
        default="rawhttp",
        help="client for the measured sends and /sync long-polls: rawhttp (bench/rawhttp.py, "
        "~30 µs of CPU per request) or aiohttp (~140 µs; the client of every run before 2026-12-07 11:00)",
    )
    p.add_argument("--seed", type=int, default=1, help="seed for the room membership layout")
    p.add_argument("--quiet", action="store_true", help="no progress messages on stderr")
    a = p.parse_args(argv)
    if a.users < 2 or a.room_size < 2 or a.rooms < 1:
        p.error("need at least 2 users, rooms of at least 2 members and at least 1 room")
    if a.room_size > a.users:
        p.error("--room-size cannot exceed --users")
    if a.rate <= 0 or a.duration <= 0 or a.warmup < 0 or a.drain < 0:
        p.error("--rate and --duration must be positive, --warmup and --drain not negative")
    if not 1 <= a.processes <= a.users:
        p.error("--processes must be between 1 and --users")
    return Options(
        base_url=a.base_url.rstrip("/"),
        shared_secret=a.shared_secret,
        server_pids=tuple(a.server_pid),
        aux_pids=tuple(a.aux_pid),
        users=a.users,
        rooms=a.rooms,
        room_size=a.room_size,
        rate=a.rate,
        duration=a.duration,
        warmup=a.warmup,
        drain=a.drain,
        processes=a.processes,
        json_out=a.json_out,
        state_file=a.state_file,
        setup_only=a.setup_only,
        user_prefix=a.user_prefix or f"bench{secrets.token_hex(3)}_",
        timeline_limit=a.timeline_limit,
        sync_timeout_ms=a.sync_timeout_ms,
        late_ms=a.late_ms,
        p99_ms=a.p99_ms,
        send_timeout=a.send_timeout,
        setup_concurrency=a.setup_concurrency,
        seed=a.seed,
        body_words=max(0, a.body_words),
        quiet=a.quiet,
        http_client=a.http_client,
    )


def log(opts: Options, message: str) -> None:
    if not opts.quiet:
        print(f"[loadgen {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def run_async(coro: Coroutine[Any, Any, T]) -> T:
    with asyncio.Runner(loop_factory=LOOP_FACTORY) as runner:
        return runner.run(coro)


# -- the world: accounts and rooms ------------------------------------------------------------


@dataclass
class Account:
    user_id: str
    access_token: str
    filter_id: str


@dataclass
class Room:
    room_id: str
    members: list[int]  # indices into World.accounts; members[0] created the room


@dataclass
class World:
    base_url: str
    users: int
    rooms_count: int
    room_size: int
    accounts: list[Account]
    rooms: list[Room]
    # True for worlds built by other scripts (bench/large_scenario.py): rooms of any size,
    # users in any number of rooms. --users/--rooms/--room-size are then not checked.
    custom: bool = False

    def to_json(self) -> dict[str, Any]:
        return {"format": STATE_FORMAT, **asdict(self)}

    def sender_of(self, k: int) -> tuple[Room, int]:
        """Message k goes to room k mod rooms, from that room's members in turn:
        (the room, the sender's position in its member list)."""
        room = self.rooms[k % self.rooms_count]
        return room, (k // self.rooms_count) % len(room.members)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> World:
        if data.get("format") != STATE_FORMAT:
            raise ValueError("unknown state file format")
        return cls(
            base_url=data["base_url"],
            users=data["users"],
            rooms_count=data["rooms_count"],
            room_size=data["room_size"],
            accounts=[Account(**a) for a in data["accounts"]],
            rooms=[Room(**r) for r in data["rooms"]],
            custom=bool(data.get("custom", False)),
        )


def room_layout(users: int, rooms: int, room_size: int, seed: int) -> list[list[int]]:
    """Members of each room: distinct users, memberships spread as evenly as possible.

    Each room takes the users with the fewest memberships so far (ties broken by a
    seeded shuffle), so with 100 users and 20 rooms of 10 everyone is in exactly two
    rooms, and two rooms rarely share many members.
    """
    rng = random.Random(seed)
    counts = [0] * users
    layout: list[list[int]] = []
    for _ in range(rooms):
        order = list(range(users))
        rng.shuffle(order)
        order.sort(key=lambda u: counts[u])
        members = order[:room_size]
        for u in members:
            counts[u] += 1
        layout.append(members)
    return layout


class ApiError(Exception):
    def __init__(self, method: str, path: str, status: int, body: bytes) -> None:
        super().__init__(f"{method} {path} -> {status}: {body[:300].decode(errors='replace')}")
        self.status = status


class SetupClient:
    """Plain request helper for setup: retries 429s (servers with rate limits left on)."""

    def __init__(self, session: aiohttp.ClientSession, base_url: str) -> None:
        self.session = session
        self.base_url = base_url

    async def call(self, method: str, path: str, token: str | None = None, body: Any = None) -> Any:
        headers = {"Content-Type": "application/json"}
        if token is not None:
            headers["Authorization"] = f"Bearer {token}"
        data = dumps(body) if body is not None else None
        for _attempt in range(20):
            async with self.session.request(
                method, self.base_url + path, data=data, headers=headers
            ) as resp:
                raw = await resp.read()
                if resp.status == 429:
                    try:
                        wait_ms = float(loads(raw).get("retry_after_ms", 1000))
                    except (ValueError, AttributeError):
                        wait_ms = 1000.0
                    await asyncio.sleep(min(wait_ms, 10_000) / 1000)
                    continue
                if resp.status != 200:
                    raise ApiError(method, path, resp.status, raw)
                return loads(raw)
        raise ApiError(method, path, 429, b"still rate limited after 20 attempts")


async def register(client: SetupClient, secret: str, localpart: str) -> tuple[str, str]:
    """Shared-secret registration (``/_synapse/admin/v1/register``); returns (user_id, token)."""
    result = await register_account(client, secret, localpart, secrets.token_urlsafe(18))
    return result["user_id"], result["access_token"]


async def register_account(client: SetupClient, secret: str, localpart: str, password: str) -> dict[str, Any]:
    """Shared-secret registration with a chosen password; the server's whole answer."""
    path = "/_synapse/admin/v1/register"
    nonce = (await client.call("GET", path))["nonce"]
    mac = hmac.new(secret.encode(), digestmod=hashlib.sha1)
    mac.update(b"\x00".join([nonce.encode(), localpart.encode(), password.encode(), b"notadmin"]))
    body = {
        "nonce": nonce,
        "username": localpart,
        "password": password,
        "admin": False,
        "mac": mac.hexdigest(),
    }
    result: dict[str, Any] = await client.call("POST", path, body=body)
    return result


def sync_filter(timeline_limit: int) -> dict[str, Any]:
    """Only m.room.message timeline events; no state, presence, account data or receipts."""
    nothing: dict[str, list[str]] = {"types": []}
    return {
        "presence": nothing,
        "account_data": nothing,
        "room": {
            "timeline": {"limit": timeline_limit, "types": ["m.room.message"]},
            "state": nothing,
            "ephemeral": nothing,
            "account_data": nothing,
        },
    }


async def gather_limited(limit: int, coros: Iterable[Coroutine[Any, Any, T]]) -> list[T]:
    sem = asyncio.Semaphore(limit)

    async def one(coro: Coroutine[Any, Any, T]) -> T:
        async with sem:
            return await coro

    return await asyncio.gather(*(one(c) for c in coros))


async def build_world(opts: Options) -> World:
    if not opts.shared_secret:
        raise SystemExit("--shared-secret is required to create users")
    timeout = aiohttp.ClientTimeout(total=120)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        client = SetupClient(session, opts.base_url)
        t = time.monotonic()
        secret = opts.shared_secret
        registered = await gather_limited(
            opts.setup_concurrency,
            (register(client, secret, f"{opts.user_prefix}{i}") for i in range(opts.users)),
        )
        log(opts, f"registered {opts.users} users in {time.monotonic() - t:.1f}s")

        flt = sync_filter(opts.timeline_limit)

        async def upload_filter(user_id: str, token: str) -> str:
            path = f"{CLIENT_V3}/user/{quote(user_id, safe='')}/filter"
            return str((await client.call("POST", path, token, flt))["filter_id"])

        filter_ids = await gather_limited(
            opts.setup_concurrency, (upload_filter(u, tok) for u, tok in registered)
        )
        accounts = [Account(u, tok, f) for (u, tok), f in zip(registered, filter_ids, strict=True)]

        t = time.monotonic()
        layout = room_layout(opts.users, opts.rooms, opts.room_size, opts.seed)

        async def make_room(index: int, members: list[int]) -> Room:
            creator = accounts[members[0]]
            body = {"preset": "private_chat", "name": f"bench room {index}"}
            room_id = (
                await client.call("POST", f"{CLIENT_V3}/createRoom", creator.access_token, body)
            )["room_id"]
            quoted = quote(room_id, safe="")
            for m in members[1:]:
                invite = {"user_id": accounts[m].user_id}
                await client.call(
                    "POST", f"{CLIENT_V3}/rooms/{quoted}/invite", creator.access_token, invite
                )
            for m in members[1:]:
                await client.call(
                    "POST", f"{CLIENT_V3}/join/{quoted}", accounts[m].access_token, {}
                )
            return Room(room_id, members)

        rooms = await gather_limited(
            max(1, opts.setup_concurrency // 2), (make_room(i, m) for i, m in enumerate(layout))
        )
        log(opts, f"created {opts.rooms} rooms of {opts.room_size} in {time.monotonic() - t:.1f}s")
    return World(opts.base_url, opts.users, opts.rooms, opts.room_size, accounts, rooms)


def obtain_world(opts: Options) -> World:
    if opts.state_file is not None and opts.state_file.exists():
        world = World.from_json(json.loads(opts.state_file.read_text()))
        shape = (world.base_url, world.users, world.rooms_count, world.room_size)
        wanted = (opts.base_url, opts.users, opts.rooms, opts.room_size)
        if world.custom and world.base_url == opts.base_url:
            pass  # a layout built elsewhere: the state file decides users and rooms
        elif shape != wanted:
            raise SystemExit(
                f"{opts.state_file} holds {shape}, not what was asked "
                f"{wanted}; delete it or change the options"
            )
        log(
            opts,
            f"reusing {world.users} users and {world.rooms_count} rooms from {opts.state_file}",
        )
        return world
    world = run_async(build_world(opts))
    if opts.state_file is not None:
        opts.state_file.parent.mkdir(parents=True, exist_ok=True)
        opts.state_file.write_text(json.dumps(world.to_json()))
    return world


# -- /proc readings -------------------------------------------------------------------------


def _process_tree(pid: int | Iterable[int]) -> list[int]:
    """``pid`` (or each of several) and all their live descendants, each process once."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as fh:
                stat = fh.read()
        except OSError:
            continue
        fields = stat[stat.rindex(b")") + 2 :].split()
        children.setdefault(int(fields[1]), []).append(int(entry))
    tree: list[int] = []
    seen: set[int] = set()
    todo = [pid] if isinstance(pid, int) else list(pid)
    while todo:
        p = todo.pop()
        if p in seen:
            continue
        seen.add(p)
        tree.append(p)
        todo.extend(children.get(p, ()))
    return tree


def process_cpu_seconds(pid: int | Iterable[int]) -> float:
    """utime + stime of ``pid`` (or several) and all live descendants, in seconds."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0
    for p in _process_tree(pid):
        try:
            with open(f"/proc/{p}/stat", "rb") as fh:
                stat = fh.read()
        except OSError:
            continue
        fields = stat[stat.rindex(b")") + 2 :].split()
        total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15 of stat)
    return total / tick


def machine_busy_seconds() -> float:
    """CPU seconds all cores spent not idle since boot (from /proc/stat)."""
    with open("/proc/stat") as fh:
        values = [int(v) for v in fh.readline().split()[1:9]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = values
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def process_memory_kib(pid: int | Iterable[int]) -> dict[str, int]:
    """VmRSS and VmHWM (peak RSS) in KiB, summed over the process tree."""
    out = {"VmRSS": 0, "VmHWM": 0}
    for p in _process_tree(pid):
        try:
            with open(f"/proc/{p}/status") as fh:
                for line in fh:
                    key, _, value = line.partition(":")
                    if key in out:
                        out[key] += int(value.split()[0])
        except OSError:
            continue
    return out


# -- worker: the users' clients ---------------------------------------------------------------


@dataclass
class WorkerPlan:
    index: int
    count: int
    run_id: str
    base_url: str
    world: dict[str, Any]
    rate: float
    sync_timeout_ms: int
    late_ms: float
    send_timeout: float
    body_words: int = 0
    http_client: str = "rawhttp"

    def owns(self, user: int) -> bool:
        return user % self.count == self.index


@dataclass
class WorkerResult:
    index: int
    users: int
    cpu_seconds: float = 0.0
    send_scheduled: int = 0
    send_ok_keys: list[int] = field(default_factory=list)
    send_errors: Counter[str] = field(default_factory=Counter)
    send_latency: array[float] = field(default_factory=lambda: array("d"))
    send_lateness: array[float] = field(default_factory=lambda: array("d"))
    late: int = 0
    masks: dict[int, int] = field(default_factory=dict)
    delivery_latency: array[float] = field(default_factory=lambda: array("d"))
    # Members of the room of each delivery above (same order): latency by room size.
    delivery_room_size: array[int] = field(default_factory=lambda: array("I"))
    duplicates: int = 0
    limited_timelines: int = 0
    sync_requests: int = 0
    sync_errors: Counter[str] = field(default_factory=Counter)


class Worker:
    def __init__(self, plan: WorkerPlan, conn: Connection) -> None:
        self.plan = plan
        self.conn = conn
        self.world = World.from_json(plan.world)
        self.base = plan.base_url
        self.mine = [u for u in range(self.world.users) if plan.owns(u)]
        self.result = WorkerResult(plan.index, len(self.mine))
        # Member position of each user in each room, for the per-message delivery bitmask.
        self.position: dict[tuple[int, str], int] = {}
        self.room_size = {room.room_id: len(room.members) for room in self.world.rooms}
        for room in self.world.rooms:
            for pos, u in enumerate(room.members):
                self.position[(u, room.room_id)] = pos
        self.headers = [{"Authorization": f"Bearer {a.access_token}"} for a in self.world.accounts]
        self.send_headers = [
            {"Authorization": f"Bearer {a.access_token}", "Content-Type": "application/json"}
            for a in self.world.accounts
        ]
        # The same, preformatted for rawhttp.
        self.raw_headers = [f"Authorization: Bearer {a.access_token}\r\n".encode() for a in self.world.accounts]
        self.raw_send_headers = [h + b"Content-Type: application/json\r\n" for h in self.raw_headers]
        self.raw = HttpClient(self.base) if plan.http_client == "rawhttp" else None
        self.measure_from_us: float = math.inf  # integer microseconds once the run starts
        # --body-words: a fixed pool of bodies (built once: no per-send cost on the client).
        rng = random.Random(plan.index)
        self.texts = [
            " ".join(rng.choice(VOCABULARY) for _ in range(plan.body_words)) for _ in range(1000)
        ] if plan.body_words else []
        self.stopping = False

    async def recv(self) -> tuple[Any, ...]:
        loop = asyncio.get_running_loop()
        msg: tuple[Any, ...] = await loop.run_in_executor(None, self.conn.recv)
        return msg

    def sync_target(self, user: int, since: str | None, timeout_ms: int) -> str:
        """Path and query (encoded) of the user's /sync with the stored filter."""
        account = self.world.accounts[user]
        target = f"{CLIENT_V3}/sync?timeout={timeout_ms}&filter={quote(account.filter_id, safe='')}"
        if since is not None:
            target += "&since=" + quote(since, safe="")
        return target

    async def fetch(
        self,
        session: aiohttp.ClientSession,
        method: str,
        target: str,
        user: int,
        timeout: float,
        body: bytes | None = None,
    ) -> tuple[int, bytes]:
        """(status, body) of one measured request, with the configured HTTP client."""
        if self.raw is not None:
            headers = self.raw_headers[user] if body is None else self.raw_send_headers[user]
            return await self.raw.request(method, target, headers, body, timeout)
        async with session.request(
            method,
            URL(self.base + target, encoded=True),
            data=body,
            headers=self.headers[user] if body is None else self.send_headers[user],
            timeout=aiohttp.ClientTimeout(total=timeout),
        ) as resp:
            return resp.status, await resp.read()

    async def initial_sync(self, session: aiohttp.ClientSession, user: int) -> str:
        """Check the user's rooms, then make the initial sync whose token the long-poll starts from."""
        client = SetupClient(session, self.base)
        token = self.world.accounts[user].access_token
        joined = set((await client.call("GET", f"{CLIENT_V3}/joined_rooms", token))["joined_rooms"])
        want = {r.room_id for r in self.world.rooms if user in r.members}
        if not want <= joined:
            raise RuntimeError(
                f"{self.world.accounts[user].user_id} is not joined to {sorted(want - joined)}"
            )
        async with session.get(
            URL(self.base + self.sync_target(user, None, 0), encoded=True), headers=self.headers[user]
        ) as resp:
            raw = await resp.read()
            if resp.status != 200:
                raise ApiError("GET", "/sync (initial)", resp.status, raw)
        return str(loads(raw)["next_batch"])

    async def sync_loop(self, session: aiohttp.ClientSession, user: int, since: str) -> None:
        me = self.world.accounts[user].user_id
        run_id = self.plan.run_id
        res = self.result
        timeout = self.plan.sync_timeout_ms / 1000 + 30
        while not self.stopping:
            try:
                target = self.sync_target(user, since, self.plan.sync_timeout_ms)
                status, raw = await self.fetch(session, "GET", target, user, timeout)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                res.sync_errors[type(exc).__name__] += 1
                await asyncio.sleep(0.1)
                continue
            seen_at = time.monotonic()
            res.sync_requests += 1
            if status != 200:
                res.sync_errors[f"HTTP {status}"] += 1
                await asyncio.sleep(0.1)
                continue
            body = loads(raw)
            since = body["next_batch"]
            for room_id, room in body.get("rooms", {}).get("join", {}).items():
                timeline = room.get("timeline")
                if not timeline:
                    continue
                if timeline.get("limited"):
                    res.limited_timelines += 1
                events = timeline.get("events", ())
                bit = 0
                for event in events:
                    tag = event.get("content", {}).get("bench")
                    if (
                        not isinstance(tag, dict)
                        or tag.get("run") != run_id
                        or event.get("sender") == me
                    ):
                        continue
                    due_us = tag["t"]
                    if due_us < self.measure_from_us:
                        continue
                    if not bit:
                        bit = 1 << self.position[(user, room_id)]
                    k = tag["k"]
                    mask = res.masks.get(k, 0)
                    if mask & bit:
                        res.duplicates += 1
                        continue
                    res.masks[k] = mask | bit
                    res.delivery_latency.append(seen_at - due_us / 1_000_000)
                    res.delivery_room_size.append(self.room_size[room_id])

    async def send_one(
        self,
        session: aiohttp.ClientSession,
        k: int,
        due_us: int,
        room_id: str,
        user: int,
        measured: bool,
    ) -> None:
        plan = self.plan
        body = f"bench {plan.run_id} #{k}"
        if plan.body_words:
            body += " " + self.texts[k % len(self.texts)]
        content = {
            "msgtype": "m.text",
            "body": body,
            "bench": {"run": plan.run_id, "k": k, "t": due_us},
        }
        target = f"{CLIENT_V3}/rooms/{quote(room_id, safe='')}/send/m.room.message/{plan.run_id}.{k}"
        error: str | None = None
        try:
            status, raw = await self.fetch(session, "PUT", target, user, plan.send_timeout, dumps(content))
            if status != 200:
                error = f"HTTP {status}"
                try:
                    errcode = loads(raw).get("errcode")
                    if errcode:
                        error += f" {errcode}"
                except (ValueError, AttributeError):
                    pass
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            error = type(exc).__name__
        if not measured:
            return
        res = self.result
        if error is None:
            res.send_ok_keys.append(k)
            res.send_latency.append(time.monotonic() - due_us / 1_000_000)
        else:
            res.send_errors[error] += 1

    def my_sends(self) -> Iterator[tuple[int, str, int]]:
        """(k, room id, sender) of every message this worker sends, in order of k.

        Message k goes to room k mod rooms, from that room's members in turn. With rooms
        of one size the schedule repeats every rooms x size messages, so one cycle of
        this worker's slots is precomputed; custom worlds walk k directly.
        """
        world = self.world
        sizes = {len(room.members) for room in world.rooms}
        if len(sizes) == 1:
            cycle = world.rooms_count * sizes.pop()
            slots: list[tuple[int, str, int]] = []
            for o in range(cycle):
                room, pos = world.sender_of(o)
                if self.plan.owns(room.members[pos]):
                    slots.append((o, room.room_id, room.members[pos]))
            if not slots:
                return
            for c in itertools.count():
                for o, room_id, user in slots:
                    yield c * cycle + o, room_id, user
        if not any(self.plan.owns(u) for room in world.rooms for u in room.members):
            return
        for k in itertools.count():
            room, pos = world.sender_of(k)
            if self.plan.owns(room.members[pos]):
                yield k, room.room_id, room.members[pos]

    async def sender(
        self, session: aiohttp.ClientSession, t0: float, measure_from: float, end: float
    ) -> None:
        """Issue this worker's share of the global schedule: message k is due at t0 + k/rate."""
        period = 1.0 / self.plan.rate
        late_s = self.plan.late_ms / 1000
        res = self.result
        measure_from_us = to_us(measure_from)
        tasks: set[asyncio.Task[None]] = set()
        for k, room_id, user in self.my_sends():
            due_us = to_us(t0 + k * period)  # the due time, as the message carries it
            due = due_us / 1_000_000
            if due >= end:
                break
            delay = due - time.monotonic()
            if delay > 0.0005:
                await asyncio.sleep(delay)
            measured = due_us >= measure_from_us
            if measured:
                res.send_scheduled += 1
                lateness = time.monotonic() - due
                res.send_lateness.append(lateness)
                if lateness > late_s:
                    res.late += 1
            task = asyncio.create_task(self.send_one(session, k, due_us, room_id, user, measured))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        if tasks:
            await asyncio.wait(tasks)

    async def run(self) -> None:
        connector = aiohttp.TCPConnector(limit=0, ttl_dns_cache=None, enable_cleanup_closed=False)
        async with aiohttp.ClientSession(
            connector=connector, auto_decompress=False, skip_auto_headers=("User-Agent",)
        ) as session:
            sinces = await gather_limited(16, (self.initial_sync(session, u) for u in self.mine))
            sync_tasks = [
                asyncio.create_task(self.sync_loop(session, u, s))
                for u, s in zip(self.mine, sinces, strict=True)
            ]
            self.conn.send(("ready", self.plan.index))
            _, t0, measure_from, end = await self.recv()
            self.measure_from_us = to_us(measure_from)
            cpu_start: float | None = None

            async def sample_cpu() -> None:
                nonlocal cpu_start
                await asyncio.sleep(max(0.0, measure_from - time.monotonic()))
                cpu_start = _own_cpu()
                await asyncio.sleep(max(0.0, end - time.monotonic()))
                assert cpu_start is not None
                self.result.cpu_seconds = _own_cpu() - cpu_start

            sampler = asyncio.create_task(sample_cpu())
            await self.sender(session, t0, measure_from, end)
            await sampler
            self.conn.send(("sent", self.plan.index))
            _, stop_at = await self.recv()
            await asyncio.sleep(max(0.0, stop_at - time.monotonic()))
            self.stopping = True
            for task in sync_tasks:
                task.cancel()
            await asyncio.gather(*sync_tasks, return_exceptions=True)
            if self.raw is not None:
                self.raw.close()


def to_us(t: float) -> int:
    """Monotonic seconds to the integer microseconds that message bodies carry."""
    return round(t * 1_000_000)


def _own_cpu() -> float:
    t = os.times()
    return t.user + t.system


def worker_main(plan: WorkerPlan, conn: Connection) -> None:
    try:
        worker = Worker(plan, conn)
        profile_dir = os.environ.get("LOADGEN_PROFILE_DIR")
        if profile_dir:  # developer aid: where does the client spend its CPU?
            import cProfile

            with cProfile.Profile() as prof:
                run_async(worker.run())
            prof.dump_stats(os.path.join(profile_dir, f"worker-{plan.index}.pstats"))
        else:
            run_async(worker.run())
        conn.send(("result", worker.result))
    except BaseException:
        conn.send(("error", traceback.format_exc()))
    finally:
        conn.close()


# -- coordinator --------------------------------------------------------------------------


def percentile_ms(sorted_values: Sequence[float], pct: float) -> float | None:
    """Nearest-rank percentile of seconds, in milliseconds."""
    if not sorted_values:
        return None
    rank = max(1, math.ceil(pct / 100 * len(sorted_values)))
    return round(sorted_values[rank - 1] * 1000, 2)


def latency_summary(values: Iterable[float]) -> dict[str, float | None]:
    ordered = sorted(values)
    return {
        "p50": percentile_ms(ordered, 50),
        "p99": percentile_ms(ordered, 99),
        "max": round(ordered[-1] * 1000, 2) if ordered else None,
    }


class Coordinator:
    def __init__(self, opts: Options, world: World) -> None:
        self.opts = opts
        self.world = world
        self.run_id = secrets.token_hex(4)

    def _expect(self, conns: list[Connection], kind: str, timeout: float) -> dict[int, Any]:
        """Wait for one ``kind`` message from every worker; fail fast on a worker error."""
        got: dict[int, Any] = {}
        pending = set(range(len(conns)))
        deadline = time.monotonic() + timeout
        while pending:
            left = deadline - time.monotonic()
            if left <= 0:
                raise RuntimeError(
                    f"workers {sorted(pending)} did not report '{kind}' within {timeout:.0f}s"
                )
            for conn in wait_for_connections([conns[i] for i in pending], left):
                assert isinstance(conn, Connection)
                i = conns.index(conn)
                try:
                    msg = conn.recv()
                except EOFError:
                    raise RuntimeError(f"worker {i} exited unexpectedly") from None
                if msg[0] == "error":
                    raise RuntimeError(f"worker {i} failed:\n{msg[1]}")
                if msg[0] != kind:
                    raise RuntimeError(f"worker {i} sent '{msg[0]}', expected '{kind}'")
                got[i] = msg[1]
                pending.discard(i)
        return got

    def run(self) -> dict[str, Any]:
        opts = self.opts
        ctx = multiprocessing.get_context("spawn")
        conns: list[Connection] = []
        procs: list[multiprocessing.process.BaseProcess] = []
        for i in range(opts.processes):
            parent_end, child_end = ctx.Pipe()
            plan = WorkerPlan(
                index=i,
                count=opts.processes,
                run_id=self.run_id,
                base_url=opts.base_url,
                world=self.world.to_json(),
                rate=opts.rate,
                sync_timeout_ms=opts.sync_timeout_ms,
                late_ms=opts.late_ms,
                send_timeout=opts.send_timeout,
                body_words=opts.body_words,
                http_client=opts.http_client,
            )
            proc = ctx.Process(
                target=worker_main, args=(plan, child_end), name=f"loadgen-worker-{i}", daemon=True
            )
            proc.start()
            child_end.close()
            conns.append(parent_end)
            procs.append(proc)
        try:
            return self._drive(conns)
        except BaseException:
            for running in procs:
                running.terminate()
            raise
        finally:
            for running in procs:
                running.join(timeout=10)
                if running.is_alive():
                    running.kill()

    def _drive(self, conns: list[Connection]) -> dict[str, Any]:
        opts = self.opts
        t_setup = time.monotonic()
        # Every user's initial sync comes first; thousands of them take a while on a slow server.
        self._expect(conns, "ready", timeout=300 + 0.3 * self.world.users)
        log(
            opts,
            f"{self.world.users} clients synced and long-polling ({time.monotonic() - t_setup:.1f}s)",
        )
        t0 = time.monotonic() + 0.5
        measure_from = t0 + opts.warmup
        end = measure_from + opts.duration
        for conn in conns:
            conn.send(("start", t0, measure_from, end))
        log(
            opts,
            f"sending {opts.rate:g} msg/s: {opts.warmup:g}s warm-up, then {opts.duration:g}s measured",
        )
        pids, aux = opts.server_pids, opts.aux_pids
        time.sleep(max(0.0, measure_from - time.monotonic()))
        server_cpu_start = process_cpu_seconds(pids) if pids else None
        aux_cpu_start = process_cpu_seconds(aux) if aux else None
        machine_start = machine_busy_seconds()
        time.sleep(max(0.0, end - time.monotonic()))
        server_cpu_end = process_cpu_seconds(pids) if pids else None
        aux_cpu_end = process_cpu_seconds(aux) if aux else None
        machine_busy = machine_busy_seconds() - machine_start
        memory = process_memory_kib(pids) if pids else None
        aux_memory = process_memory_kib(aux) if aux else None
        self._expect(conns, "sent", timeout=opts.send_timeout + 60)
        stop_at = time.monotonic() + opts.drain
        for conn in conns:
            conn.send(("stop", stop_at))
        results: list[WorkerResult] = list(
            self._expect(conns, "result", timeout=opts.drain + 120).values()
        )
        server: dict[str, Any] = {"pid": pids[0] if len(pids) == 1 else list(pids) or None}
        if server_cpu_start is not None and server_cpu_end is not None and memory is not None:
            cpu = server_cpu_end - server_cpu_start
            server.update(
                cpu_seconds=round(cpu, 2),
                cpu_cores=round(cpu / opts.duration, 3),
                rss_mib=round(memory["VmRSS"] / 1024, 1),
                peak_rss_mib=round(memory["VmHWM"] / 1024, 1),
            )
        if aux_cpu_start is not None and aux_cpu_end is not None and aux_memory is not None:
            aux_cpu = aux_cpu_end - aux_cpu_start
            server["aux"] = {
                "pids": list(aux),
                "cpu_seconds": round(aux_cpu, 2),
                "cpu_cores": round(aux_cpu / opts.duration, 3),
                "rss_mib": round(aux_memory["VmRSS"] / 1024, 1),
            }
        machine = {"cores": os.cpu_count(), "busy_cores": round(machine_busy / opts.duration, 3)}
        return self._report(results, server, machine)

    def _missing_sample(
        self, ok_keys: set[int], masks: dict[int, int], limit: int = 20
    ) -> list[dict[str, Any]]:
        """A few sent messages that some member never saw: which message, who sent it, who missed it."""
        world = self.world
        sample: list[dict[str, Any]] = []
        for k in sorted(ok_keys):
            room, sender_pos = world.sender_of(k)
            mask = masks.get(k, 0)
            absent = [
                world.accounts[u].user_id
                for pos, u in enumerate(room.members)
                if pos != sender_pos and not mask >> pos & 1
            ]
            if absent:
                sample.append(
                    {
                        "k": k,
                        "txn_id": f"{self.run_id}.{k}",
                        "room_id": room.room_id,
                        "sender": world.accounts[room.members[sender_pos]].user_id,
                        "missed_by": absent,
                    }
                )
                if len(sample) >= limit:
                    break
        return sample

    def _report(
        self, results: list[WorkerResult], server: dict[str, Any], machine: dict[str, Any]
    ) -> dict[str, Any]:
        opts = self.opts
        ok_keys: set[int] = set()
        errors: Counter[str] = Counter()
        sync_errors: Counter[str] = Counter()
        masks: dict[int, int] = {}
        for r in results:
            ok_keys.update(r.send_ok_keys)
            errors.update(r.send_errors)
            sync_errors.update(r.sync_errors)
            for k, m in r.masks.items():
                masks[k] = masks.get(k, 0) | m
        world = self.world
        expected = sum(len(world.rooms[k % world.rooms_count].members) - 1 for k in ok_keys)
        seen = sum(masks.get(k, 0).bit_count() for k in ok_keys)
        unexpected = sum(m.bit_count() for k, m in masks.items() if k not in ok_keys)
        duplicates = sum(r.duplicates for r in results)
        scheduled = sum(r.send_scheduled for r in results)
        send_errors = sum(errors.values())
        missing = expected - seen
        missing_sample = self._missing_sample(ok_keys, masks)
        late = sum(r.late for r in results)
        lateness = sorted(x for r in results for x in r.send_lateness)
        delivery = latency_summary(x for r in results for x in r.delivery_latency)
        by_size: dict[int, list[float]] = {}
        for r in results:
            for latency, size in zip(r.delivery_latency, r.delivery_room_size, strict=True):
                by_size.setdefault(size, []).append(latency)
        client_cpu = sum(r.cpu_seconds for r in results)
        error_total = send_errors + missing + duplicates + unexpected + sum(sync_errors.values())
        passed = error_total == 0 and delivery["p99"] is not None and delivery["p99"] < opts.p99_ms
        busiest_worker = max(r.cpu_seconds for r in results) / opts.duration
        return {
            "config": {
                "base_url": opts.base_url,
                "users": world.users,
                "rooms": world.rooms_count,
                "room_size": (
                    sorted({len(r.members) for r in world.rooms})
                    if world.custom
                    else world.room_size
                ),
                "rate": opts.rate,
                "duration_s": opts.duration,
                "warmup_s": opts.warmup,
                "drain_s": opts.drain,
                "processes": opts.processes,
                "timeline_limit": opts.timeline_limit,
                "sync_timeout_ms": opts.sync_timeout_ms,
                "late_ms": opts.late_ms,
                "p99_ms": opts.p99_ms,
                "run_id": self.run_id,
            },
            "sends": {
                "scheduled": scheduled,
                "ok": len(ok_keys),
                "errors": send_errors,
                "error_kinds": dict(errors),
                "late": late,
                "lateness_ms": {
                    "p99": percentile_ms(lateness, 99),
                    "max": round(lateness[-1] * 1000, 2) if lateness else None,
                },
                "latency_ms": latency_summary(x for r in results for x in r.send_latency),
            },
            "deliveries": {
                "expected": expected,
                "seen": seen,
                "missing": missing,
                "duplicates": duplicates,
                "unexpected": unexpected,
                "latency_ms": delivery,
                # Worlds with rooms of several sizes (the large scenario): a big room's
                # fan-out and the small rooms' deliveries, apart.
                "latency_ms_by_room_size": (
                    {str(size): latency_summary(v) for size, v in sorted(by_size.items())}
                    if len(by_size) > 1
                    else {}
                ),
                "missing_sample": missing_sample,
                "limited_timelines": sum(r.limited_timelines for r in results),
                "sync_requests": sum(r.sync_requests for r in results),
                "sync_errors": dict(sync_errors),
            },
            "throughput": {
                "sends_per_s": round(len(ok_keys) / opts.duration, 2),
                "deliveries_per_s": round(seen / opts.duration, 2),
            },
            "server": server,
            "client": {
                "processes": opts.processes,
                "cpu_seconds": round(client_cpu, 2),
                "cpu_cores": round(client_cpu / opts.duration, 3),
                "busiest_worker_cores": round(busiest_worker, 3),
                # A worker near a full core, or more than 1% of sends issued late.
                "saturated": busiest_worker > 0.85 or late > 0.01 * max(scheduled, 1),
            },
            "machine": {
                **machine,
                # Everything else running on the machine meanwhile (other load, the kernel's
                # own threads); large values mean the numbers are not trustworthy.
                "other_cores": round(
                    machine["busy_cores"]
                    - client_cpu / opts.duration
                    - server.get("cpu_cores", 0)
                    - server.get("aux", {}).get("cpu_cores", 0),
                    3,
                ),
            },
            "errors_total": error_total,
            "passed": passed,
        }


def summary(report: dict[str, Any]) -> str:
    c, s, d = report["config"], report["sends"], report["deliveries"]
    srv, cl, tp = report["server"], report["client"], report["throughput"]
    sl, dl = s["latency_ms"], d["latency_ms"]
    lines = [
        f"rate {c['rate']:g} msg/s, {c['users']} users, {c['rooms']} rooms x {c['room_size']}, "
        f"{c['duration_s']:g}s measured (+{c['warmup_s']:g}s warm-up), {c['processes']} client process(es)",
        f"  sends      scheduled {s['scheduled']}  ok {s['ok']}  errors {s['errors']} {s['error_kinds'] or ''}"
        f"  late {s['late']} (p99 {s['lateness_ms']['p99']} ms, max {s['lateness_ms']['max']} ms)",
        f"  send lat   p50 {sl['p50']} ms  p99 {sl['p99']} ms  max {sl['max']} ms",
        f"  deliveries expected {d['expected']}  seen {d['seen']}  missing {d['missing']}"
        f"  duplicates {d['duplicates']}  unexpected {d['unexpected']}  limited timelines {d['limited_timelines']}"
        f"  sync errors {d['sync_errors'] or 0}",
        f"  delivery   p50 {dl['p50']} ms  p99 {dl['p99']} ms  max {dl['max']} ms",
        *(
            f"    in rooms of {size}: p50 {v['p50']} ms  p99 {v['p99']} ms  max {v['max']} ms"
            for size, v in d.get("latency_ms_by_room_size", {}).items()
        ),
        f"  throughput {tp['sends_per_s']} sends/s, {tp['deliveries_per_s']} deliveries/s",
    ]
    if srv.get("cpu_seconds") is not None:
        lines.append(
            f"  server     cpu {srv['cpu_seconds']} s ({srv['cpu_cores']} cores)"
            f"  rss {srv['rss_mib']} MiB  peak rss {srv['peak_rss_mib']} MiB"
        )
    if srv.get("aux"):
        aux = srv["aux"]
        lines.append(
            f"  helpers    cpu {aux['cpu_seconds']} s ({aux['cpu_cores']} cores)  rss {aux['rss_mib']} MiB"
            f"  (pids {', '.join(map(str, aux['pids']))})"
        )
    lines.append(
        f"  loadgen    cpu {cl['cpu_seconds']} s ({cl['cpu_cores']} cores, busiest worker {cl['busiest_worker_cores']})"
        + ("  <- client may be the bottleneck" if cl["saturated"] else "")
    )
    m = report["machine"]
    lines.append(
        f"  machine    {m['busy_cores']} of {m['cores']} cores busy, {m['other_cores']} used by other processes"
    )
    lines.append(
        f"  verdict    {'PASS' if report['passed'] else 'FAIL'} (errors {report['errors_total']}, "
        f"delivery p99 {dl['p99']} ms vs {c['p99_ms']:g} ms)"
    )
    return "\n".join(lines)


def _exit_on_sigterm() -> None:
    """SIGTERM unwinds like Ctrl-C, so worker processes are stopped on the way out."""
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))


def raise_fd_limit() -> int:
    """Raise the soft open-files limit to the hard one: every long-poll is a socket."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError):
            pass
    return soft


def main(argv: Sequence[str] | None = None) -> int:
    _exit_on_sigterm()
    fd_limit = raise_fd_limit()
    opts = parse_args(argv)
    world = obtain_world(opts)
    if opts.setup_only:
        return 0
    if fd_limit != resource.RLIM_INFINITY and fd_limit < world.users // opts.processes + 256:
        raise SystemExit(
            f"open-files limit {fd_limit} is too low for {world.users} long-polls in "
            f"{opts.processes} process(es): raise 'ulimit -n'"
        )
    report = Coordinator(opts, world).run()
    if opts.json_out is not None:
        opts.json_out.parent.mkdir(parents=True, exist_ok=True)
        opts.json_out.write_text(json.dumps(report, indent=2) + "\n")
    print(summary(report), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
