#!/usr/bin/env python3
"""Media throughput, Bastion against Synapse: one large file and many small ones.

Starts the servers side by side (``--servers``, default ``bastion,synapse``; also
``bastion-noenc``: Bastion with encryption at rest off), each on SQLite in a fresh
temporary directory with upload rate limits opened (Bastion
``media.uploads_per_minute``; Synapse's ``rc_media_create`` is opened by
synapse_config.py) and room for the large file (Synapse ``max_upload_size: 200M``;
Bastion's default 100 MiB suffices). One user per server (shared-secret registration).

A round (``--rounds``, default 3; the servers take turns, the order alternating
between rounds) runs four phases against each server:

* ``large up`` — ``POST /_matrix/media/v3/upload`` of one ``--large-mib`` (50) MiB file;
* ``large down`` — ``GET /_matrix/client/v1/media/download/localhost/{id}`` of it;
* ``small up`` — ``--small-count`` (100) files of ``--small-kib`` (1024) KiB,
  ``--concurrency`` (4) requests in flight;
* ``small down`` — the same files downloaded, same concurrency;
* ``thumbnails`` — ``--images`` (40) distinct 1920x1080 JPEG photos-sized images (coloured
  noise, about 1 MiB each), each uploaded and then its 320x240 ``scale`` thumbnail fetched
  (``GET /_matrix/client/v1/media/thumbnail/...``), ``--concurrency`` images in flight.
  Reported: images/s until the last thumbnail is served, and the server's CPU seconds
  per image counted until the server is idle again — both servers make several sizes
  per image (Synapse while uploading, Bastion in the background after it), so the
  CPU per image is the fair measure of thumbnailing cost. Every thumbnail is decoded and
  must be an image no larger than 800x600.

File contents are random (``os.urandom``), fresh each round. Every download is
compared byte for byte with what was uploaded (after the clock stops). Measured per
phase: wall time → MiB/s (and files/s for small files); the server's CPU seconds
(utime+stime of its processes); its RSS before the phase and its peak during it —
the kernel's peak-RSS counter (VmHWM) is reset just before each phase by writing 5 to
``/proc/PID/clear_refs``, so the peak is that phase's own. The client is aiohttp on
uvloop in one process on the same machine.

Output: ``result.json`` and ``summary.md`` (also printed) in ``--results-dir``
(default bench/results/media-<timestamp>/).

    .venv/bin/python bench/media_compare.py [--rounds 3] [--servers bastion,bastion-noenc,synapse]
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
from pathlib import Path
from typing import Any

import aiohttp
import benchlib as bl
from loadgen import LOOP_FACTORY, SetupClient, loads, register

PHASES = ("large up", "large down", "small up", "small down", "thumbnails")


class Measure:
    """Server CPU, RSS before, and peak RSS over one phase."""

    def __init__(self, server: bl.Server) -> None:
        self.pids = server.server_pids()

    def __enter__(self) -> Measure:
        self.peak_reset = bl.reset_peak_rss(self.pids)
        self.rss_before = bl.process_memory_kib(self.pids)["VmRSS"]
        self.cpu = bl.process_cpu_seconds(self.pids)
        self.t = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        self.seconds = time.perf_counter() - self.t
        self.cpu = bl.process_cpu_seconds(self.pids) - self.cpu
        mem = bl.process_memory_kib(self.pids)
        self.rss_after = mem["VmRSS"]
        self.peak = mem["VmHWM"]

    def report(self, nbytes: int, files: int) -> dict[str, Any]:
        return {
            "seconds": round(self.seconds, 3),
            "mib_per_s": round(nbytes / 2**20 / self.seconds, 1),
            "files_per_s": round(files / self.seconds, 1),
            "server_cpu_s": round(self.cpu, 2),
            "rss_before_mib": round(self.rss_before / 1024, 1),
            "peak_rss_mib": round(self.peak / 1024, 1) if self.peak_reset else None,
            "rss_after_mib": round(self.rss_after / 1024, 1),
        }


async def upload(
    session: aiohttp.ClientSession, base: str, token: str, data: bytes, content_type: str = "application/octet-stream"
) -> str:
    headers = {"Authorization": f"Bearer {token}", "Content-Type": content_type}
    async with session.post(f"{base}/_matrix/media/v3/upload", data=data, headers=headers) as resp:
        raw = await resp.read()
        if resp.status != 200:
            raise RuntimeError(f"upload -> {resp.status}: {raw[:300]!r}")
        uri = str(loads(raw)["content_uri"])
    return uri.rsplit("/", 1)[1]


async def download(session: aiohttp.ClientSession, base: str, token: str, media_id: str) -> bytes:
    url = f"{base}/_matrix/client/v1/media/download/localhost/{media_id}"
    buf = bytearray()
    async with session.get(url, headers={"Authorization": f"Bearer {token}"}) as resp:
        if resp.status != 200:
            raise RuntimeError(f"download -> {resp.status}: {(await resp.read())[:300]!r}")
        async for piece in resp.content.iter_chunked(1 << 20):
            buf += piece
    return bytes(buf)


def make_images(count: int, width: int = 1920, height: int = 1080) -> list[bytes]:
    """Distinct JPEGs of coloured noise (the worst case for a JPEG encoder, ~1 MiB each)."""
    import io

    from PIL import Image

    images = []
    for i in range(count):
        bands = [Image.effect_noise((width, height), 30 + (i * 7 + c) % 40) for c in range(3)]
        buf = io.BytesIO()
        Image.merge("RGB", bands).save(buf, "JPEG", quality=85)
        images.append(buf.getvalue())
    return images


async def upload_and_thumbnail(session: aiohttp.ClientSession, base: str, token: str, data: bytes) -> bytes:
    media_id = await upload(session, base, token, data, "image/jpeg")
    url = f"{base}/_matrix/client/v1/media/thumbnail/localhost/{media_id}?width=320&height=240&method=scale"
    async with session.get(url, headers={"Authorization": f"Bearer {token}"}) as resp:
        body = await resp.read()
        if resp.status != 200:
            raise RuntimeError(f"thumbnail -> {resp.status}: {body[:300]!r}")
    return body


def check_thumbnails(thumbs: list[bytes]) -> None:
    import io

    from PIL import Image

    for body in thumbs:
        with Image.open(io.BytesIO(body)) as img:
            if img.width > 800 or img.height > 600:
                raise RuntimeError(f"a thumbnail of {img.width}x{img.height} is larger than any thumbnail size")


async def bounded(limit: int, coros: list[Any]) -> list[Any]:
    sem = asyncio.Semaphore(limit)

    async def one(c: Any) -> Any:
        async with sem:
            return await c

    return await asyncio.gather(*(one(c) for c in coros))


async def one_round(server: bl.Server, token: str, args: argparse.Namespace) -> dict[str, Any]:
    base = server.base_url
    large = os.urandom(args.large_mib * 2**20)
    small = [os.urandom(args.small_kib * 1024) for _ in range(args.small_count)]
    out: dict[str, Any] = {}
    timeout = aiohttp.ClientTimeout(total=600)
    async with aiohttp.ClientSession(
        timeout=timeout, connector=aiohttp.TCPConnector(limit=0), auto_decompress=False
    ) as session:
        with Measure(server) as m:
            large_id = await upload(session, base, token, large)
        out["large up"] = m.report(len(large), 1)
        with Measure(server) as m:
            got = await download(session, base, token, large_id)
        out["large down"] = m.report(len(large), 1)
        if got != large:
            raise RuntimeError(f"large download differs ({len(got)} of {len(large)} bytes)")
        with Measure(server) as m:
            ids = await bounded(args.concurrency, [upload(session, base, token, d) for d in small])
        out["small up"] = m.report(sum(map(len, small)), len(small))
        with Measure(server) as m:
            back = await bounded(args.concurrency, [download(session, base, token, i) for i in ids])
        out["small down"] = m.report(sum(map(len, small)), len(small))
        bad = sum(1 for a, b in zip(small, back, strict=True) if a != b)
        if bad:
            raise RuntimeError(f"{bad} small downloads differ from their uploads")
        if args.images:
            images = make_images(args.images)
            bl.wait_idle(server.server_pids(), max_wait=30)
            with Measure(server) as m:
                thumbs = await bounded(
                    args.concurrency, [upload_and_thumbnail(session, base, token, d) for d in images]
                )
                served = time.perf_counter() - m.t
                # Background thumbnailing (Bastion makes the other sizes after the upload).
                await asyncio.to_thread(bl.wait_idle, server.server_pids(), 60.0)
            check_thumbnails(thumbs)
            report = m.report(sum(map(len, images)), len(images))
            report["seconds"] = round(served, 3)
            report["files_per_s"] = round(len(images) / served, 1)
            report["mib_per_s"] = round(sum(map(len, images)) / 2**20 / served, 1)
            # wait_idle's last quiet second is not thumbnailing; leave it out.
            report["server_cpu_ms_per_image"] = round(1000 * report["server_cpu_s"] / len(images), 1)
            out["thumbnails"] = report
    return out


def run(coro: Any) -> Any:
    with asyncio.Runner(loop_factory=LOOP_FACTORY) as runner:
        return runner.run(coro)


async def make_user(server: bl.Server) -> str:
    async with aiohttp.ClientSession() as session:
        _, token = await register(
            SetupClient(session, server.base_url),
            server.shared_secret,
            f"media{secrets.token_hex(3)}",
        )
    return str(token)


def main() -> int:
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    p = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--servers", default="bastion,synapse", help="bastion, bastion-noenc, synapse")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--large-mib", type=int, default=50)
    p.add_argument("--small-count", type=int, default=100)
    p.add_argument("--small-kib", type=int, default=1024)
    p.add_argument("--images", type=int, default=40, help="images for the thumbnail phase (0: skip it)")
    p.add_argument("--concurrency", type=int, default=4, help="small-file requests in flight")
    p.add_argument("--results-dir", type=Path)
    args = p.parse_args()
    out = bl.results_dir("media", args.results_dir)
    bl.log(f"results in {out}")
    root = bl.work_root()
    names = [s.strip() for s in args.servers.split(",") if s.strip()]
    servers: dict[str, bl.Server] = {}
    media = {"media": {"uploads_per_minute": 100_000, "max_upload_bytes": 200 * 2**20}}
    try:
        for name in names:
            if name in ("bastion", "bastion-noenc"):
                servers[name] = bl.Bastion(
                    name, root, encryption=name == "bastion", overrides=media
                )
            elif name == "synapse":
                servers[name] = bl.Synapse(name, root, extra_args=["--max-upload-size", "200M"])
            else:
                raise SystemExit(f"unknown server {name!r}")
            servers[name].start()
            bl.log(f"{servers[name].label}: pids {servers[name].server_pids()}")
        tokens = {name: run(make_user(srv)) for name, srv in servers.items()}
        idle_rss = {name: bl.rss_mib(srv.server_pids()) for name, srv in servers.items()}
        rounds: list[dict[str, Any]] = []
        for r in range(args.rounds):
            for name in names if r % 2 == 0 else names[::-1]:
                srv = servers[name]
                bl.wait_idle(srv.server_pids(), max_wait=30)
                phases = run(one_round(srv, tokens[name], args))
                rounds.append({"server": name, "round": r + 1, **phases})
                bl.log(
                    f"round {r + 1} {name}: "
                    + ", ".join(
                        f"{ph} {phases[ph]['mib_per_s']} MiB/s (peak {phases[ph]['peak_rss_mib']} MiB)"
                        for ph in PHASES
                        if ph in phases
                    )
                )
        result = summarise(args, servers, rounds, idle_rss)
        bl.write_outputs(out, result, render(result))
        return 0
    finally:
        for srv in servers.values():
            srv.cleanup(out)
        if not os.environ.get("KEEP_WORKDIR"):
            shutil.rmtree(root, ignore_errors=True)


def summarise(
    args: argparse.Namespace,
    servers: dict[str, bl.Server],
    rounds: list[dict[str, Any]],
    idle_rss: dict[str, float],
) -> dict[str, Any]:
    summary: dict[str, Any] = {}
    phases = [ph for ph in PHASES if all(ph in r for r in rounds)]
    for name in servers:
        mine = [r for r in rounds if r["server"] == name]
        summary[name] = {
            "idle_rss_mib": idle_rss[name],
            **{
                phase: {
                    "mib_per_s": bl.median(r[phase]["mib_per_s"] for r in mine),
                    "files_per_s": bl.median(r[phase]["files_per_s"] for r in mine),
                    "server_cpu_s": bl.median(r[phase]["server_cpu_s"] for r in mine),
                    "rss_before_mib": bl.median(r[phase]["rss_before_mib"] for r in mine),
                    "peak_rss_mib": max(
                        (r[phase]["peak_rss_mib"] or 0 for r in mine), default=None
                    ),
                    **(
                        {"server_cpu_ms_per_image": bl.median(r[phase]["server_cpu_ms_per_image"] for r in mine)}
                        if phase == "thumbnails"
                        else {}
                    ),
                }
                for phase in phases
            },
        }
    return {
        "benchmark": "media throughput",
        "method": {
            "large_mib": args.large_mib,
            "small_count": args.small_count,
            "small_kib": args.small_kib,
            "images": args.images,
            "phases": phases,
            "concurrency": args.concurrency,
            "rounds": args.rounds,
            "throughput": "median over rounds",
            "peak_rss": "VmHWM after resetting it (clear_refs 5) at the start of each phase; max over rounds",
        },
        "servers": {name: srv.describe() for name, srv in servers.items()},
        "summary": summary,
        "rounds": rounds,
    }


def render(result: dict[str, Any]) -> str:
    m = result["method"]
    phases = m["phases"]
    header = ["server", "idle RSS (MiB)"]
    for phase in phases:
        unit = {"large": "MiB/s", "small": "MiB/s (files/s)", "thumbnails": "images/s (CPU ms/image)"}[phase.split()[0]]
        header += [f"{phase} {unit}", f"{phase} peak RSS (MiB)"]
    header.append("server CPU s (" + " / ".join(phases) + ")")
    rows = []
    for name, s in result["summary"].items():
        row: list[Any] = [result["servers"][name]["label"], s["idle_rss_mib"]]
        for phase in phases:
            ph = s[phase]
            if phase.startswith("large"):
                speed = f"{ph['mib_per_s']}"
            elif phase == "thumbnails":
                speed = f"{ph['files_per_s']} ({ph['server_cpu_ms_per_image']})"
            else:
                speed = f"{ph['mib_per_s']} ({ph['files_per_s']})"
            row += [speed, ph["peak_rss_mib"]]
        row.append(" / ".join(str(s[phase]["server_cpu_s"]) for phase in phases))
        rows.append(row)
    return "\n".join(
        [
            f"### Media — one {m['large_mib']} MiB file, {m['small_count']} files of "
            f"{m['small_kib']} KiB, {m['images']} images to thumbnail ({m['concurrency']} in flight)",
            "",
            bl.md_table(header, rows),
            "",
            f"Median of {m['rounds']} round(s), servers alternating; peak RSS is the highest "
            "over the rounds of the phase's own peak (VmHWM reset at the phase's start).",
            "",
        ]
    )


if __name__ == "__main__":
    sys.exit(main())
