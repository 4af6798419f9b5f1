#!/usr/bin/env python3
"""Large scenario: 2,000 long-polling users, 200 rooms of 10 plus one 1,000-member room.

For each server (``--servers``, default Bastion then Synapse, one after the other, each
fresh, SQLite, presence off; scale-out.py's Bastion layouts are accepted too, e.g.
``bastion-pg-2w-async``: two workers on PostgreSQL with Redis behind nginx, and
``synapse-pg``: Synapse on PostgreSQL) this script:

**Setup.** Registers ``--users`` (2,000) accounts with the shared-secret admin API and
one extra *heavy* user, uploads the load generator's /sync filter for each (timeline
``m.room.message`` only, no state/presence/receipts/account data), creates
``--small-rooms`` (200) rooms of ``--small-room-size`` (10) — every user in exactly one
— and one room of ``--big-room-size`` (1,000) members (users 0..999), all with
``preset: public_chat`` so members join without an invitation (halving the setup's
requests). The heavy user joins ``--heavy-rooms`` (200) of the small rooms, and each of
those rooms gets ``--heavy-messages`` (5) messages from its creator. Password hashing
is made cheap on both servers for the setup's sake (``--cheap-passwords``, on by
default: Bastion argon2 ``time_cost 1, memory 8 MiB``; Synapse ``bcrypt_rounds 4``) —
no password is checked while anything is measured.

**(ii) Initial /sync of the heavy user.** The server is restarted (stop, start: its
caches are cold; the OS page cache is not dropped) and the heavy user's first
``GET /sync`` — no ``since``, no filter — is timed from request to the last byte of the
response; this is repeated ``--cold-restarts`` (5) times and the median reported with
every sample (one sample varies by ±25%). Then ``--warm-syncs`` (5) more, reported as
median and minimum. The number
of joined rooms in the response is checked.

**(i) Memory per idle long-poll.** Every user makes an initial sync with its filter
(``timeout=0``), then the client closes all connections and, once the server is idle,
the server's RSS is read (VmRSS summed over its processes, median of 5 readings 0.5 s
apart). Then every user opens a ``/sync?since=...&timeout=30000`` long-poll (re-polling
when one returns, as a client does); once the server has gone idle and holds
``--users`` established connections (counted from /proc/net/tcp), RSS is read again
the same way. (after - before) / users is the memory per connected idle client.
RSS is read once more after the clients disconnect.

**(iii) Message rate.** ``find_max_rate.py`` with every user long-polling, messages
round-robin over all rooms *including the 1,000-member room* (one message there is 999
deliveries; ``--search-rooms small`` leaves it out, ``--search-rooms big`` sends only
there: deliveries per second in a big room's fan-out), members of each room in turn;
pass = delivery p99 < 100 ms and no errors. Each step's measured window holds at least
two full round-robin cycles (``--min-messages`` = 2 x rooms, at least 150, unless given after ``--``):
a shorter window may hold no message for the big room at all, and then a step passes
or fails by where the window falls, not by the server. The step reports give the
delivery latency by room size too (``latency_ms_by_room_size``). Extra arguments after
``--`` go to find_max_rate.py. ``--no-search`` skips this part.

Output: ``result.json`` and ``summary.md`` (also printed) in ``--results-dir``
(default bench/results/large-<timestamp>/), with the searches' step reports and the
servers' logs. The client raises its open-files limit to the hard limit and fails
early if that is below what 2,000 long-polls need.

    .venv/bin/python bench/large_scenario.py [--servers bastion,synapse] [-- find_max_rate options]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import shutil
import signal
import statistics
import sys
import time
from pathlib import Path
from typing import Any
from urllib.parse import quote

import aiohttp
import benchlib as bl
import scaleout
import yaml
from loadgen import (
    CLIENT_V3,
    LOOP_FACTORY,
    Account,
    Room,
    SetupClient,
    World,
    gather_limited,
    loads,
    raise_fd_limit,
    register,
    room_layout,
    sync_filter,
)


def run(coro: Any) -> Any:
    with asyncio.Runner(loop_factory=LOOP_FACTORY) as runner:
        return runner.run(coro)


# -- setup -------------------------------------------------------------------------------------


async def build(server: bl.Server, args: argparse.Namespace) -> dict[str, Any]:
    """Users, rooms and the heavy user; returns the loadgen world and the heavy user's token."""
    prefix = f"large{secrets.token_hex(3)}_"
    timing: dict[str, float] = {}
    timeout = aiohttp.ClientTimeout(total=600)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        api = SetupClient(session, server.base_url)
        conc = args.setup_concurrency
        t = time.monotonic()
        registered = await gather_limited(
            conc,
            (
                register(api, server.shared_secret, f"{prefix}{i}")
                for i in range(args.users + 1)  # the last one is the heavy user
            ),
        )
        heavy_id, heavy_token = registered.pop()
        timing["register_s"] = time.monotonic() - t
        bl.log(f"  registered {args.users} users + 1 in {timing['register_s']:.0f}s")

        flt = sync_filter(100)

        async def upload_filter(user_id: str, token: str) -> str:
            path = f"{CLIENT_V3}/user/{quote(user_id, safe='')}/filter"
            return str((await api.call("POST", path, token, flt))["filter_id"])

        filters = await gather_limited(conc, (upload_filter(u, tok) for u, tok in registered))
        accounts = [Account(u, tok, f) for (u, tok), f in zip(registered, filters, strict=True)]

        async def create(creator: int, name: str) -> str:
            body = {"preset": "public_chat", "name": name}
            tok = accounts[creator].access_token
            return str((await api.call("POST", f"{CLIENT_V3}/createRoom", tok, body))["room_id"])

        async def join(token: str, room_id: str) -> None:
            await api.call("POST", f"{CLIENT_V3}/join/{quote(room_id, safe='')}", token, {})

        t = time.monotonic()
        layout = room_layout(args.users, args.small_rooms, args.small_room_size, seed=1)
        small_ids = await gather_limited(
            conc, (create(m[0], f"small room {i}") for i, m in enumerate(layout))
        )
        await gather_limited(
            conc,
            (
                join(accounts[u].access_token, room_id)
                for room_id, members in zip(small_ids, layout, strict=True)
                for u in members[1:]
            ),
        )
        timing["small_rooms_s"] = time.monotonic() - t
        bl.log(
            f"  {args.small_rooms} rooms of {args.small_room_size} in {timing['small_rooms_s']:.0f}s"
        )

        t = time.monotonic()
        big_members = list(range(min(args.big_room_size, args.users)))
        rooms = [Room(r, m) for r, m in zip(small_ids, layout, strict=True)]
        if len(big_members) >= 2:
            big_id = await create(big_members[0], "big room")
            await gather_limited(
                conc, (join(accounts[u].access_token, big_id) for u in big_members[1:])
            )
            rooms.append(Room(big_id, big_members))
        timing["big_room_s"] = time.monotonic() - t
        bl.log(f"  a room of {len(big_members)} in {timing['big_room_s']:.0f}s")

        t = time.monotonic()
        heavy_rooms = list(zip(small_ids, layout, strict=True))[: args.heavy_rooms]
        await gather_limited(conc, (join(heavy_token, r) for r, _ in heavy_rooms))

        async def messages(room_id: str, creator: int) -> None:
            tok = accounts[creator].access_token
            for n in range(args.heavy_messages):
                path = (
                    f"{CLIENT_V3}/rooms/{quote(room_id, safe='')}/send/m.room.message/{prefix}{n}"
                )
                body = {"msgtype": "m.text", "body": f"message {n} for the heavy user"}
                await api.call("PUT", path, tok, body)

        await gather_limited(conc, (messages(r, m[0]) for r, m in heavy_rooms))
        timing["heavy_user_s"] = time.monotonic() - t
        bl.log(f"  heavy user in {len(heavy_rooms)} rooms in {timing['heavy_user_s']:.0f}s")
    world = World(
        base_url=server.base_url,
        users=args.users,
        rooms_count=len(rooms),
        room_size=args.small_room_size,
        accounts=accounts,
        rooms=rooms,
        custom=True,
    )
    return {
        "world": world,
        "heavy_user": heavy_id,
        "heavy_token": heavy_token,
        "heavy_rooms": len(heavy_rooms),
        "timing_s": {k: round(v, 1) for k, v in timing.items()},
    }


# -- (ii) initial sync of the heavy user ---------------------------------------------------------


async def timed_syncs(base: str, token: str, count: int) -> list[dict[str, Any]]:
    out = []
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=300)) as session:
        for _ in range(count):
            t = time.perf_counter()
            async with session.get(
                f"{base}{CLIENT_V3}/sync", headers={"Authorization": f"Bearer {token}"}
            ) as resp:
                raw = await resp.read()
                status = resp.status
            elapsed = time.perf_counter() - t
            body = loads(raw) if status == 200 else {}
            out.append(
                {
                    "ms": round(elapsed * 1000, 1),
                    "status": status,
                    "bytes": len(raw),
                    "joined_rooms": len(body.get("rooms", {}).get("join", {})),
                }
            )
    return out


# -- (i) memory per idle long-poll -------------------------------------------------------------


def established(port: int) -> int:
    """Server-side TCP connections in ESTABLISHED state on ``port`` (from /proc/net/tcp*)."""
    count = 0
    for name in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(name).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if fields[3] == "01" and int(fields[1].rsplit(":", 1)[1], 16) == port:
                count += 1
    return count


def rss_median(pids: list[int], samples: int = 5) -> float:
    values = []
    for _ in range(samples):
        values.append(bl.process_memory_kib(pids)["VmRSS"])
        time.sleep(0.5)
    return float(statistics.median(values))


async def idle_memory(server: bl.Server, world: World, args: argparse.Namespace) -> dict[str, Any]:
    base = server.base_url
    pids = server.server_pids()
    loop = asyncio.get_running_loop()
    big = set(world.rooms[-1].members) if len(world.rooms) > args.small_rooms else set()

    def url(acc: Account, since: str | None, timeout_ms: int) -> str:
        u = f"{base}{CLIENT_V3}/sync?timeout={timeout_ms}&filter={quote(acc.filter_id, safe='')}"
        return u + (f"&since={quote(since, safe='')}" if since else "")

    # initial syncs (timed: members of the big room apart), then every connection closed
    t = time.monotonic()
    timings: dict[str, list[float]] = {"big-room members": [], "others": []}
    async with aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=0), timeout=aiohttp.ClientTimeout(total=600)
    ) as session:

        async def initial(index: int, acc: Account) -> str:
            headers = {"Authorization": f"Bearer {acc.access_token}"}
            t0 = time.perf_counter()
            async with session.get(url(acc, None, 0), headers=headers) as resp:
                raw = await resp.read()
                if resp.status != 200:
                    raise RuntimeError(f"initial sync -> {resp.status}: {raw[:200]!r}")
            timings["big-room members" if index in big else "others"].append(
                time.perf_counter() - t0
            )
            return str(loads(raw)["next_batch"])

        sinces = await gather_limited(16, (initial(i, a) for i, a in enumerate(world.accounts)))
    initial_s = time.monotonic() - t
    initial_ms = {}
    for group, values in timings.items():
        values.sort()
        if values:
            initial_ms[group] = {
                "count": len(values),
                "p50": round(bl.percentile(values, 50) * 1000, 1),  # type: ignore[operator]
                "p99": round(bl.percentile(values, 99) * 1000, 1),  # type: ignore[operator]
            }
    await loop.run_in_executor(None, bl.wait_idle, pids, 60.0)
    await asyncio.sleep(2)
    out: dict[str, Any] = {
        "clients": len(world.accounts),
        "initial_syncs_s": round(initial_s, 1),
        "initial_sync_ms (16 in flight)": initial_ms,
        "cycles": [],
    }
    for _ in range(args.cycles):
        cycle = await hold_long_polls(server, world, sinces, url, args)
        sinces = cycle.pop("sinces")
        out["cycles"].append(cycle)
    first = out["cycles"][0]
    out.update(
        {
            k: first[k]
            for k in (
                "rss_before_mib",
                "rss_held_mib",
                "rss_after_disconnect_mib",
                "kib_per_client",
                "connections_held",
            )
        }
    )
    return out


async def hold_long_polls(
    server: bl.Server,
    world: World,
    sinces: list[str],
    url: Any,
    args: argparse.Namespace,
) -> dict[str, Any]:
    """Every user long-polls; RSS before, while all are held, and after they disconnect."""
    pids = server.server_pids()
    loop = asyncio.get_running_loop()
    before = await loop.run_in_executor(None, rss_median, pids)
    conns_before = established(server.port)
    returned = errors = 0
    stop = asyncio.Event()
    latest = list(sinces)
    async with aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=0), timeout=aiohttp.ClientTimeout(total=None)
    ) as session:

        async def poll(index: int, acc: Account) -> None:
            nonlocal returned, errors
            headers = {"Authorization": f"Bearer {acc.access_token}"}
            while not stop.is_set():
                try:
                    async with session.get(
                        url(acc, latest[index], 30_000), headers=headers
                    ) as resp:
                        raw = await resp.read()
                        if resp.status == 200:
                            latest[index] = loads(raw)["next_batch"]
                            returned += 1
                        else:
                            errors += 1
                            await asyncio.sleep(1)
                except asyncio.CancelledError:
                    raise
                except Exception:
                    errors += 1
                    await asyncio.sleep(1)

        t = time.monotonic()
        tasks = [asyncio.create_task(poll(i, a)) for i, a in enumerate(world.accounts)]
        deadline = time.monotonic() + 120
        held = 0
        while time.monotonic() < deadline:
            await asyncio.sleep(0.5)
            held = established(server.port)
            if held >= len(world.accounts):
                break
        connect_s = time.monotonic() - t
        await loop.run_in_executor(None, bl.wait_idle, pids, 30.0)
        await asyncio.sleep(args.hold_seconds)
        held = established(server.port)
        after = await loop.run_in_executor(None, rss_median, pids)
        held_after = established(server.port)
        fds = sum(len(os.listdir(f"/proc/{p}/fd")) for p in pids if Path(f"/proc/{p}").exists())
        stop.set()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    await loop.run_in_executor(None, bl.wait_idle, pids, 30.0)
    await asyncio.sleep(2)
    released = await loop.run_in_executor(None, rss_median, pids)
    n = len(world.accounts)
    return {
        "connect_s": round(connect_s, 1),
        "connections_before": conns_before,
        "connections_held": min(held, held_after),
        "server_fds_while_held": fds,
        "polls_returned_early": returned,
        "poll_errors": errors,
        "rss_before_mib": round(before / 1024, 1),
        "rss_held_mib": round(after / 1024, 1),
        "rss_after_disconnect_mib": round(released / 1024, 1),
        "kib_per_client": round((after - before) / n, 2),
        "sinces": latest,
    }


# -- per server --------------------------------------------------------------------------------


def one_server(name: str, root: Path, out: Path, args: argparse.Namespace) -> dict[str, Any]:
    srv: bl.Server
    overrides: dict[str, Any] = {}
    for item in args.bastion_config:
        dotted, _, value = item.partition("=")
        *parents, leaf = dotted.split(".")
        node = overrides
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = yaml.safe_load(value)
    if args.cheap_passwords:
        overrides["password_hashing"] = dict(bl.CHEAP_PASSWORD_HASHING)
    if name == "bastion":
        srv = bl.Bastion("bastion", root, overrides=overrides)
    elif name.startswith("bastion-"):
        # scaleout.py's layouts: bastion-pg, bastion-pg-2w-async, ...
        srv = scaleout.make_server(name, root, overrides)
    elif name in ("synapse", "synapse-pg"):
        extra = ["--bcrypt-rounds", "4"] if args.cheap_passwords else []
        database = "postgresql" if name == "synapse-pg" else "sqlite"
        srv = bl.Synapse(name, root, database=database, extra_args=extra)
    else:
        raise SystemExit(f"unknown server {name!r}")
    result: dict[str, Any] = {"server": srv.describe()}
    try:
        srv.start()
        bl.log(f"{srv.label}: pids {srv.server_pids()} on {srv.base_url}; setting up")
        t = time.monotonic()
        built = run(build(srv, args))
        world: World = built["world"]
        result["setup"] = {
            "seconds": round(time.monotonic() - t, 1),
            **built["timing_s"],
            "users": args.users,
            "rooms": {
                "small": args.small_rooms,
                "small_size": args.small_room_size,
                "big_size": len(world.rooms[-1].members)
                if len(world.rooms) > args.small_rooms
                else 0,
            },
            "heavy_user_rooms": built["heavy_rooms"],
            "heavy_messages_per_room": args.heavy_messages,
        }
        state = out / name / "state.json"
        state.parent.mkdir(exist_ok=True)
        state.write_text(json.dumps(world.to_json()))

        # (ii) cold, then warm, initial sync of the heavy user
        colds = []
        for i in range(args.cold_restarts):
            bl.log(f"{name}: restart {i + 1}/{args.cold_restarts} for a cold initial /sync of the heavy user")
            srv.restart()
            colds += run(timed_syncs(srv.base_url, built["heavy_token"], 1))
        warm = run(timed_syncs(srv.base_url, built["heavy_token"], args.warm_syncs))
        result["heavy_initial_sync"] = {
            "cold_ms": bl.median(s["ms"] for s in colds),
            "cold_all_ms": [s["ms"] for s in colds],
            "warm_median_ms": bl.median(s["ms"] for s in warm),
            "warm_min_ms": min((s["ms"] for s in warm), default=None),
            "bytes": colds[0]["bytes"],
            "joined_rooms": colds[0]["joined_rooms"],
            "all": colds + warm,
        }
        bl.log(f"  {result['heavy_initial_sync']}")

        # (i) memory per idle long-poll
        bl.log(f"{name}: {args.users} long-polls for the memory reading")
        result["idle_memory"] = run(idle_memory(srv, world, args))
        bl.log(f"  {result['idle_memory']}")

        # (iii) message rate
        if args.search:
            search_state, search_rooms = state, world.rooms_count
            if args.search_rooms != "all" and len(world.rooms) > args.small_rooms:
                part = world.rooms[: args.small_rooms] if args.search_rooms == "small" else world.rooms[-1:]
                sub = World(**{**world.__dict__, "rooms": part})
                sub.rooms_count = search_rooms = len(sub.rooms)
                search_state = out / name / f"state-{args.search_rooms}.json"
                search_state.write_text(json.dumps(sub.to_json()))
            bl.wait_idle(srv.server_pids())
            json_out = out / f"{name}-search.json"
            fmr_args = list(args.fmr_args)
            if not any(x.startswith("--min-messages") for x in fmr_args):
                fmr_args += ["--min-messages", str(max(2 * search_rooms, 150))]  # 150: find_max_rate's default
            bl.run_logged(
                bl.find_max_rate_cmd(
                    srv,
                    "--state-file",
                    str(search_state),
                    "--work-dir",
                    str(out / name / "search"),
                    "--json-out",
                    str(json_out),
                    *fmr_args,
                ),
                out / f"{name}.log",
            )
            found = json.loads(json_out.read_text()) if json_out.exists() else None
            result["search"] = {
                "rooms": args.search_rooms,
                "p99_ms_below": (found or {}).get("criterion", {}).get("delivery_p99_ms_below"),
                **bl.search_summary(found),
            }
    except Exception as exc:
        bl.log(f"{name}: {type(exc).__name__}: {exc}")
        result["error"] = f"{type(exc).__name__}: {exc}"
    finally:
        srv.cleanup(out)
    return result


def main() -> int:
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    p = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--servers", default="bastion,synapse")
    p.add_argument("--users", type=int, default=2000)
    p.add_argument("--small-rooms", type=int, default=200)
    p.add_argument("--small-room-size", type=int, default=10)
    p.add_argument("--big-room-size", type=int, default=1000, help="0: no big room")
    p.add_argument("--heavy-rooms", type=int, default=200)
    p.add_argument("--heavy-messages", type=int, default=5)
    p.add_argument("--warm-syncs", type=int, default=5)
    p.add_argument(
        "--cold-restarts",
        type=int,
        default=5,
        help="restarts, each followed by one timed initial /sync (the cold figure is their median)",
    )
    p.add_argument(
        "--hold-seconds",
        type=float,
        default=5.0,
        help="hold the long-polls this long before reading RSS",
    )
    p.add_argument(
        "--cycles",
        type=int,
        default=2,
        help="connect/disconnect cycles of the long-polls (the first gives the figure; "
        "later ones show whether the memory is reused or keeps growing)",
    )
    p.add_argument("--setup-concurrency", type=int, default=8)
    p.add_argument(
        "--cheap-passwords",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="cheap password hashing on both servers (setup speed only)",
    )
    p.add_argument("--search", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument(
        "--bastion-config",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a Bastion config override, dotted key and YAML value (repeatable), "
        "e.g. limits.sync_pacing_ms=500",
    )
    p.add_argument(
        "--search-rooms",
        choices=("all", "small", "big"),
        default="all",
        help="messages to every room, the small rooms only, or the big room only (its fan-out)",
    )
    p.add_argument("--results-dir", type=Path)
    p.add_argument("fmr_args", nargs="*", help="after --: find_max_rate.py options")
    args = p.parse_args()
    if args.heavy_rooms > args.small_rooms:
        p.error("--heavy-rooms cannot exceed --small-rooms")
    limit = raise_fd_limit()
    if limit < args.users + 512:
        raise SystemExit(f"open-files limit {limit} is too low for {args.users} long-polls")
    out = bl.results_dir("large", args.results_dir)
    bl.log(f"results in {out}; open-files limit {limit}")
    root = bl.work_root()
    results = {}
    try:
        for name in [s.strip() for s in args.servers.split(",") if s.strip()]:
            results[name] = one_server(name, root, out, args)
    finally:
        if not os.environ.get("KEEP_WORKDIR"):
            shutil.rmtree(root, ignore_errors=True)
    result = {
        "benchmark": "large scenario",
        "method": {
            "users": args.users,
            "small_rooms": args.small_rooms,
            "small_room_size": args.small_room_size,
            "big_room_size": args.big_room_size,
            "heavy_rooms": args.heavy_rooms,
            "heavy_messages": args.heavy_messages,
            "warm_syncs": args.warm_syncs,
            "cold_restarts": args.cold_restarts,
            "cycles": args.cycles,
            "cheap_passwords": args.cheap_passwords,
            "search": args.search,
            "search_rooms": args.search_rooms,
            "bastion_config": args.bastion_config,
            "find_max_rate_args": args.fmr_args,
        },
        "servers": results,
    }
    bl.write_outputs(out, result, render(result))
    return 0


def render(result: dict[str, Any]) -> str:
    m = result["method"]
    # The bound the searches applied (find_max_rate.py records it; 100 ms by default).
    bounds = sorted(
        {r["search"]["p99_ms_below"] for r in result["servers"].values() if r.get("search", {}).get("p99_ms_below")}
    )
    p99_bound = " / ".join(f"{b:g}" for b in bounds) or "100"
    config_note = (" Bastion config overrides: " + ", ".join(m["bastion_config"]) + ".") if m.get("bastion_config") else ""
    header = [
        "server",
        "RSS before / with long-polls / after disconnect (MiB)",
        "KiB per idle long-poll (later cycles)",
        "connections held",
        "heavy user initial /sync cold, median (all) (ms)",
        "warm median (ms)",
        "joined rooms in response",
        "max rate (msg/s)",
        "delivery p50 / p99 (ms)",
        "deliveries/s",
        "server CPU (cores)",
    ]
    rows = []
    for r in result["servers"].values():
        mem = r.get("idle_memory", {})
        hs = r.get("heavy_initial_sync", {})
        se = r.get("search", {})
        label = r["server"]["label"] + (f" — error: {r['error']}" if r.get("error") else "")
        rows.append(
            [
                label,
                f"{mem.get('rss_before_mib')} / {mem.get('rss_held_mib')} / "
                f"{mem.get('rss_after_disconnect_mib')}",
                f"{mem.get('kib_per_client')}"
                + (
                    " (" + ", ".join(str(c["kib_per_client"]) for c in mem["cycles"][1:]) + ")"
                    if len(mem.get("cycles", [])) > 1
                    else ""
                ),
                mem.get("connections_held"),
                f"{hs.get('cold_ms')} ({', '.join(str(x) for x in hs.get('cold_all_ms', []))})",
                hs.get("warm_median_ms"),
                hs.get("joined_rooms"),
                (se.get("max_rate") or "none passed") if se else "not run",
                f"{se.get('delivery_p50_ms')} / {se.get('delivery_p99_ms')}"
                if se and se.get("max_rate")
                else "",
                se.get("deliveries_per_s") if se else "",
                se.get("server_cpu_cores") if se else "",
            ]
        )
    rooms = {
        "all": "all rooms incl. the big one",
        "small": "the small rooms only",
        "big": "the big room only",
    }[m["search_rooms"]]
    return "\n".join(
        [
            f"### Large scenario — {m['users']} users, {m['small_rooms']} rooms of "
            f"{m['small_room_size']} + one of {m['big_room_size']}; heavy user in "
            f"{m['heavy_rooms']} rooms",
            "",
            bl.md_table(header, rows),
            "",
            f"Memory per idle long-poll: (RSS with all {m['users']} long-polls held - RSS after "
            "their initial syncs with no connection open) / users. Initial /sync: no since, no "
            f"filter, first request after a restart (cold; median of {m.get('cold_restarts', 1)} restarts), "
            f"then median of {m['warm_syncs']} more. Message rate: delivery p99 < {p99_bound} ms and no errors, "
            f"messages round-robin over {rooms}.{config_note}",
            "",
        ]
    )


if __name__ == "__main__":
    sys.exit(main())
