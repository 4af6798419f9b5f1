#!/usr/bin/env python3
"""To-device fan-out: one sender, N messages, each to many devices, every device long-polling.

Starts Bastion and Synapse side by side (SQLite, fresh temporary directories, presence
off, rate limits open on Synapse), and on each creates:

* a sender: one user, one device (shared-secret registration);
* ``--users`` (10) recipient users with ``--devices`` (5) devices each — the first
  device from the shared-secret registration, the others from password logins — 50
  devices in all. Every device uploads a filter that leaves out presence and account
  data (recipients are in no rooms).

A round (``--rounds``, default 3, alternating which server goes first) then:

1. every device makes an initial ``/sync`` (to get a token and flush anything left
   over) and then long-polls ``/sync?since=...&timeout=30000`` in a loop;
2. after ``--settle`` seconds the sender issues ``--messages`` (1000)
   ``PUT /sendToDevice/m.bench.fanout/{txn}`` requests, each addressing every
   recipient device by its device ID (``--wildcard``: ``"*"`` per user instead),
   ``--concurrency`` (1: one after another, as a client sends) at a time. The content
   carries the round's id and the message number *k*, plus ``--payload-bytes`` of
   padding;
3. it waits until every device has seen every message, or ``--drain-timeout`` seconds
   after the last send, then stops the long-polls.

Measured per round: the time from the first send to the last receipt; deliveries/s
(deliveries seen / that time); latency of each delivery from the moment its PUT was
issued to the moment the device's /sync response arrived (p50/p99/max); duplicates
(a device seeing one message twice), missing deliveries, failed sends and syncs; the
send phase's duration and PUT latency; the server's CPU seconds over the round and
its RSS (VmRSS at the end, VmHWM peak); the client's own CPU. Results and a Markdown
table in ``--results-dir`` (default bench/results/todevice-<timestamp>/).

    .venv/bin/python bench/todevice_fanout.py [--messages 1000] [--users 10 --devices 5] [--rounds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import secrets
import shutil
import signal
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

import aiohttp
import benchlib as bl
from loadgen import LOOP_FACTORY, SetupClient, dumps, loads, raise_fd_limit, register_account

CLIENT_V3 = "/_matrix/client/v3"
EVENT_TYPE = "m.bench.fanout"


@dataclass
class Device:
    user_id: str
    device_id: str
    token: str
    filter_id: str = ""


@dataclass
class Round:
    run_id: str
    n: int
    devices: list[Device]
    send_start: list[float] = field(default_factory=list)
    seen: list[dict[int, float]] = field(default_factory=list)  # per device: k -> receipt time
    duplicates: int = 0
    stale: int = 0  # to-device events from an earlier round or another sender
    sync_errors: Counter[str] = field(default_factory=Counter)
    send_errors: Counter[str] = field(default_factory=Counter)
    send_latency: list[float] = field(default_factory=list)
    syncs: int = 0
    received: int = 0
    all_done: asyncio.Event = field(default_factory=asyncio.Event)


async def register(api: SetupClient, secret: str, localpart: str, password: str) -> Device:
    r = await register_account(api, secret, localpart, password)
    return Device(r["user_id"], r["device_id"], r["access_token"])


async def login(api: SetupClient, localpart: str, password: str) -> Device:
    body = {
        "type": "m.login.password",
        "identifier": {"type": "m.id.user", "user": localpart},
        "password": password,
    }
    r = await api.call("POST", f"{CLIENT_V3}/login", body=body)
    return Device(r["user_id"], r["device_id"], r["access_token"])


FILTER = {
    "presence": {"types": []},
    "account_data": {"types": []},
    "room": {"rooms": [], "account_data": {"types": []}},
}


async def setup(server: bl.Server, users: int, devices: int) -> tuple[Device, list[Device]]:
    prefix = f"fan{secrets.token_hex(3)}_"
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=300)) as session:
        api = SetupClient(session, server.base_url)
        sender = await register(api, server.shared_secret, prefix + "sender", secrets.token_hex(12))
        sem = asyncio.Semaphore(4)

        async def one_user(i: int) -> list[Device]:
            password = secrets.token_hex(12)
            async with sem:
                first = await register(api, server.shared_secret, f"{prefix}{i}", password)
                out = [first]
                for _ in range(devices - 1):
                    out.append(await login(api, f"{prefix}{i}", password))
                flt = await api.call(
                    "POST",
                    f"{CLIENT_V3}/user/{quote(first.user_id, safe='')}/filter",
                    first.token,
                    FILTER,
                )
            for d in out:
                d.filter_id = str(flt["filter_id"])
            return out

        groups = await asyncio.gather(*(one_user(i) for i in range(users)))
    recipients = [d for g in groups for d in g]
    assert len({(d.user_id, d.device_id) for d in recipients}) == users * devices
    return sender, recipients


async def sync_loop(
    session: aiohttp.ClientSession,
    base: str,
    rnd: Round,
    index: int,
    since: str,
    stop: asyncio.Event,
) -> None:
    dev = rnd.devices[index]
    headers = {"Authorization": f"Bearer {dev.token}"}
    seen = rnd.seen[index]
    timeout = aiohttp.ClientTimeout(total=60)
    while not stop.is_set():
        url = (
            f"{base}{CLIENT_V3}/sync?timeout=30000&filter={quote(dev.filter_id, safe='')}"
            f"&since={quote(since, safe='')}"
        )
        try:
            async with session.get(url, headers=headers, timeout=timeout) as resp:
                raw = await resp.read()
                status = resp.status
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            rnd.sync_errors[type(exc).__name__] += 1
            await asyncio.sleep(0.1)
            continue
        now = time.monotonic()
        rnd.syncs += 1
        if status != 200:
            rnd.sync_errors[f"HTTP {status}"] += 1
            await asyncio.sleep(0.1)
            continue
        body = loads(raw)
        since = body["next_batch"]
        for event in body.get("to_device", {}).get("events", ()):
            content = event.get("content", {})
            if event.get("type") != EVENT_TYPE or content.get("run") != rnd.run_id:
                rnd.stale += 1
                continue
            k = content["k"]
            if k in seen:
                rnd.duplicates += 1
                continue
            seen[k] = now
            rnd.received += 1
        if rnd.received == rnd.n * len(rnd.devices):
            rnd.all_done.set()


async def run_round(
    server: bl.Server,
    sender: Device,
    devices: list[Device],
    args: argparse.Namespace,
) -> dict[str, Any]:
    rnd = Round(secrets.token_hex(4), args.messages, devices)
    rnd.seen = [{} for _ in devices]
    rnd.send_start = [0.0] * args.messages
    base = server.base_url
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as session:
        # initial syncs: a token for each device, and anything left over is acknowledged
        sinces: list[str] = []
        for d in devices:
            url = f"{base}{CLIENT_V3}/sync?timeout=0&filter={quote(d.filter_id, safe='')}"
            async with session.get(url, headers={"Authorization": f"Bearer {d.token}"}) as resp:
                body = loads(await resp.read())
                if resp.status != 200:
                    raise RuntimeError(f"initial sync -> {resp.status}: {body}")
                sinces.append(body["next_batch"])
        stop = asyncio.Event()
        loops = [
            asyncio.create_task(sync_loop(session, base, rnd, i, s, stop))
            for i, s in enumerate(sinces)
        ]
        await asyncio.sleep(args.settle)
        pids = server.server_pids()
        peak_reset = bl.reset_peak_rss(pids)  # the round's own peak, not the setup's
        rss0 = bl.process_memory_kib(pids)["VmRSS"]
        cpu0 = bl.process_cpu_seconds(pids)
        client_cpu0 = sum(os.times()[:2])
        pad = "x" * args.payload_bytes
        messages: dict[str, dict[str, Any]] = {}
        for d in devices:
            messages.setdefault(d.user_id, {})
            if args.wildcard:
                messages[d.user_id]["*"] = None
            else:
                messages[d.user_id][d.device_id] = None
        send_headers = {
            "Authorization": f"Bearer {sender.token}",
            "Content-Type": "application/json",
        }
        queue: asyncio.Queue[int] = asyncio.Queue()
        for k in range(args.messages):
            queue.put_nowait(k)

        async def send_worker() -> None:
            while True:
                try:
                    k = queue.get_nowait()
                except asyncio.QueueEmpty:
                    return
                content = {"run": rnd.run_id, "k": k}
                if pad:
                    content["pad"] = pad
                body = {"messages": {u: dict.fromkeys(ds, content) for u, ds in messages.items()}}
                url = f"{base}{CLIENT_V3}/sendToDevice/{EVENT_TYPE}/{rnd.run_id}.{k}"
                data = dumps(body)
                t = time.monotonic()
                rnd.send_start[k] = t
                try:
                    async with session.put(url, data=data, headers=send_headers) as resp:
                        await resp.read()
                        if resp.status != 200:
                            rnd.send_errors[f"HTTP {resp.status}"] += 1
                            continue
                except Exception as exc:
                    rnd.send_errors[type(exc).__name__] += 1
                    continue
                rnd.send_latency.append(time.monotonic() - t)

        t_first = time.monotonic()
        await asyncio.gather(*(send_worker() for _ in range(args.concurrency)))
        t_sent = time.monotonic()
        try:
            await asyncio.wait_for(rnd.all_done.wait(), args.drain_timeout)
        except TimeoutError:
            pass
        t_end = time.monotonic()
        cpu = bl.process_cpu_seconds(pids) - cpu0
        client_cpu = sum(os.times()[:2]) - client_cpu0
        memory = bl.process_memory_kib(pids)
        stop.set()
        for task in loops:
            task.cancel()
        await asyncio.gather(*loops, return_exceptions=True)

    latencies = sorted(
        t - rnd.send_start[k] for per_device in rnd.seen for k, t in per_device.items()
    )
    last_receipt = max((t for per_device in rnd.seen for t in per_device.values()), default=t_end)
    expected = (args.messages - sum(rnd.send_errors.values())) * len(devices)
    received = rnd.received
    complete = received == args.messages * len(devices)
    elapsed = (last_receipt if complete else t_end) - t_first
    send_lat = sorted(rnd.send_latency)

    def ms(v: float | None) -> float | None:
        return round(v * 1000, 2) if v is not None else None

    return {
        "run_id": rnd.run_id,
        "messages": args.messages,
        "devices": len(devices),
        "deliveries_expected": expected,
        "deliveries_seen": received,
        "missing": args.messages * len(devices) - received,
        "duplicates": rnd.duplicates,
        "stale_events": rnd.stale,
        "send_errors": dict(rnd.send_errors),
        "sync_errors": dict(rnd.sync_errors),
        "complete": complete and rnd.duplicates == 0,
        "seconds_to_last_receipt": round(elapsed, 3),
        "send_phase_seconds": round(t_sent - t_first, 3),
        "sends_per_s": round(args.messages / (t_sent - t_first), 1),
        "deliveries_per_s": round(received / elapsed, 1) if elapsed > 0 else None,
        "latency_ms": {
            "p50": ms(bl.percentile(latencies, 50)),
            "p99": ms(bl.percentile(latencies, 99)),
            "max": ms(latencies[-1] if latencies else None),
        },
        "send_latency_ms": {
            "p50": ms(bl.percentile(send_lat, 50)),
            "p99": ms(bl.percentile(send_lat, 99)),
        },
        "sync_responses": rnd.syncs,
        "server_cpu_seconds": round(cpu, 2),
        "server_cpu_ms_per_delivery": round(cpu * 1000 / received, 3) if received else None,
        "rss_before_mib": round(rss0 / 1024, 1),
        "rss_mib": round(memory["VmRSS"] / 1024, 1),
        "peak_rss_mib": round(memory["VmHWM"] / 1024, 1) if peak_reset else None,
        "client_cpu_seconds": round(client_cpu, 2),
    }


def run(coro: Any) -> Any:
    with asyncio.Runner(loop_factory=LOOP_FACTORY) as runner:
        return runner.run(coro)


def main() -> int:
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    p = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--servers", default="bastion,synapse", help="comma-separated: bastion, synapse")
    p.add_argument("--messages", type=int, default=1000)
    p.add_argument("--users", type=int, default=10, help="recipient users")
    p.add_argument("--devices", type=int, default=5, help="devices per recipient user")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--concurrency", type=int, default=1, help="sendToDevice requests in flight")
    p.add_argument("--payload-bytes", type=int, default=0, help="padding in each message's content")
    p.add_argument("--wildcard", action="store_true", help='address devices as "*" per user')
    p.add_argument(
        "--settle",
        type=float,
        default=1.0,
        help="seconds between starting the long-polls and the first send",
    )
    p.add_argument("--drain-timeout", type=float, default=120.0)
    p.add_argument("--results-dir", type=Path)
    args = p.parse_args()
    raise_fd_limit()
    out = bl.results_dir("todevice", args.results_dir)
    bl.log(f"results in {out}")
    names = [n.strip() for n in args.servers.split(",") if n.strip()]
    root = bl.work_root()
    servers: dict[str, bl.Server] = {}
    try:
        for name in names:
            if name == "bastion":
                servers[name] = bl.Bastion("bastion", root)
            elif name == "synapse":
                servers[name] = bl.Synapse("synapse", root)
            else:
                raise SystemExit(f"unknown server {name!r}")
            servers[name].start()
            bl.log(
                f"{servers[name].label}: pid {servers[name].server_pids()} on {servers[name].base_url}"
            )
        worlds = {}
        for name, srv in servers.items():
            t = time.monotonic()
            worlds[name] = run(setup(srv, args.users, args.devices))
            bl.log(
                f"{name}: sender + {args.users} users x {args.devices} devices in {time.monotonic() - t:.1f}s"
            )
        rounds: list[dict[str, Any]] = []
        for r in range(args.rounds):
            order = names if r % 2 == 0 else names[::-1]
            for name in order:
                srv = servers[name]
                bl.wait_idle(srv.server_pids(), max_wait=30)
                bl.log(f"round {r + 1}: {name}")
                sender, devices = worlds[name]
                result = run(run_round(srv, sender, devices, args))
                result.update(server=name, round=r + 1)
                rounds.append(result)
                bl.log(
                    f"  {result['deliveries_seen']}/{args.messages * len(devices)} deliveries in "
                    f"{result['seconds_to_last_receipt']}s ({result['deliveries_per_s']}/s), latency p50/p99 "
                    f"{result['latency_ms']['p50']}/{result['latency_ms']['p99']} ms, duplicates "
                    f"{result['duplicates']}, missing {result['missing']}, send errors {result['send_errors']}, "
                    f"sync errors {result['sync_errors']}"
                )
        result = summarise(args, servers, rounds)
        bl.write_outputs(out, result, render(result))
        return 0
    finally:
        for srv in servers.values():
            srv.cleanup(out)
        if not os.environ.get("KEEP_WORKDIR"):
            shutil.rmtree(root, ignore_errors=True)


def summarise(
    args: argparse.Namespace, servers: dict[str, bl.Server], rounds: list[dict[str, Any]]
) -> dict[str, Any]:
    per_server = {}
    for name in servers:
        mine = [r for r in rounds if r["server"] == name]
        per_server[name] = {
            "rounds": len(mine),
            "all_complete": all(r["complete"] for r in mine),
            "seconds_to_last_receipt": bl.median(r["seconds_to_last_receipt"] for r in mine),
            "deliveries_per_s": bl.median(r["deliveries_per_s"] for r in mine),
            "latency_p50_ms": bl.median(r["latency_ms"]["p50"] for r in mine),
            "latency_p99_ms": bl.median(r["latency_ms"]["p99"] for r in mine),
            "send_p50_ms": bl.median(r["send_latency_ms"]["p50"] for r in mine),
            "duplicates": sum(r["duplicates"] for r in mine),
            "missing": sum(r["missing"] for r in mine),
            "send_errors": sum(sum(r["send_errors"].values()) for r in mine),
            "sync_errors": sum(sum(r["sync_errors"].values()) for r in mine),
            "server_cpu_ms_per_delivery": bl.median(r["server_cpu_ms_per_delivery"] for r in mine),
            "rss_before_mib": bl.median(r["rss_before_mib"] for r in mine),
            "peak_rss_mib": max((r["peak_rss_mib"] or 0 for r in mine), default=None),
        }
    return {
        "benchmark": "to-device fan-out",
        "method": {
            "messages": args.messages,
            "recipient_users": args.users,
            "devices_per_user": args.devices,
            "deliveries_per_message": args.users * args.devices,
            "addressing": "'*' per user" if args.wildcard else "explicit device IDs",
            "concurrency": args.concurrency,
            "payload_bytes": args.payload_bytes,
            "rounds": args.rounds,
            "latency": "receipt of the /sync response minus the moment the PUT was issued",
        },
        "servers": {name: srv.describe() for name, srv in servers.items()},
        "summary": per_server,
        "rounds": rounds,
    }


def render(result: dict[str, Any]) -> str:
    m = result["method"]
    header = [
        "server",
        "time to last receipt (s)",
        "deliveries/s",
        "latency p50 / p99 (ms)",
        "sendToDevice p50 (ms)",
        "duplicates",
        "missing",
        "send / sync errors",
        "server CPU ms per delivery",
        "RSS before / peak during (MiB)",
    ]
    rows = []
    for name, s in result["summary"].items():
        rows.append(
            [
                result["servers"][name]["label"],
                s["seconds_to_last_receipt"],
                s["deliveries_per_s"],
                f"{s['latency_p50_ms']} / {s['latency_p99_ms']}",
                s["send_p50_ms"],
                s["duplicates"],
                s["missing"],
                f"{s['send_errors']} / {s['sync_errors']}",
                s["server_cpu_ms_per_delivery"],
                f"{s['rss_before_mib']} / {s['peak_rss_mib']}",
            ]
        )
    lines = [
        f"### To-device fan-out — {m['messages']} messages x {m['deliveries_per_message']} devices "
        f"({m['recipient_users']} users x {m['devices_per_user']}), {m['addressing']}, "
        f"{m['concurrency']} send(s) in flight",
        "",
        bl.md_table(header, rows),
        "",
        f"Median of {m['rounds']} round(s) per server, alternating order; duplicates, missing and "
        "errors are totals over all rounds. Latency: from issuing the PUT to the device's /sync "
        "response. Peak RSS: VmHWM reset at the round's start.",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
