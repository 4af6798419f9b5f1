"""Media upload/download throughput with encryption at rest on and off, and the server's memory.

Starts two Bastions (SQLite, temporary directories) with the test harness, one with
encryption at rest off and one with it on, and in alternating turns uploads a file of
``--mib`` MiB to each and downloads it again over real HTTP, ``--rounds`` times; reports the median MiB/s of each direction, the server's CPU seconds per round, and
its resident memory: at start, and its peak (``VmHWM``) after the transfers. With
streaming intact the peak stays far below the file size.

Then, in this process, the CPU time (all threads) of the storage path alone — writing
the file through :class:`LocalMediaStore` with and without the streamed encryption
(including the plaintext digest), and reading it back — which background load on the
machine disturbs much less than throughput.

    .venv/bin/python bench/media_crypto.py [--mib 50] [--rounds 5] [--cipher aes-256-gcm]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bastion.security import stream
from bastion.security.crypto import SUITES
from bastion.services.media_store import LocalMediaStore
from tests.harness import ServerProcess, TestDatabase, start_server

PIECE = 1024 * 1024


def _status_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _pieces(data: bytes) -> Iterator[bytes]:
    for i in range(0, len(data), PIECE):
        yield data[i : i + PIECE]


def _round(
    http: httpx.Client, pid: int, auth: dict[str, str], data: bytes
) -> tuple[float, float, float]:
    """(upload MiB/s, download MiB/s, server CPU seconds) of one upload + download."""
    cpu0 = _cpu_seconds(pid)
    t0 = time.perf_counter()
    resp = http.post(
        "/_matrix/media/v3/upload",
        content=_pieces(data),
        headers={
            **auth,
            "Content-Type": "application/octet-stream",
            "Content-Length": str(len(data)),
        },
    )
    resp.raise_for_status()
    t1 = time.perf_counter()
    mid = resp.json()["content_uri"].rsplit("/", 1)[1]
    got = 0
    with http.stream(
        "GET", f"/_matrix/client/v1/media/download/localhost/{mid}", headers=auth
    ) as dl:
        dl.raise_for_status()
        for piece in dl.iter_raw():
            got += len(piece)
    t2 = time.perf_counter()
    assert got == len(data), (got, len(data))
    mib = len(data) / 2**20
    return mib / (t1 - t0), mib / (t2 - t1), _cpu_seconds(pid) - cpu0


def run(data: bytes, rounds: int, cipher: str) -> dict[str, dict[str, float]]:
    """Both servers run side by side and take turns, so background load hits both alike."""
    modes = {"off": {"enabled": False}, "on": {"enabled": True, "cipher": cipher}}
    with tempfile.TemporaryDirectory(prefix="bastion-media-bench-") as tmp:
        db = TestDatabase("sqlite")
        servers: dict[str, ServerProcess] = {}
        try:
            for mode, encryption in modes.items():
                servers[mode] = start_server(
                    Path(tmp) / mode,
                    db,
                    encryption=encryption,
                    logging={"level": "WARNING"},
                    media={"max_upload_bytes": len(data) + 1024, "uploads_per_minute": 1000},
                )
            samples: dict[str, list[tuple[float, float, float]]] = {mode: [] for mode in modes}
            start_rss = {}
            for mode, srv in servers.items():
                assert srv.process is not None
                start_rss[mode] = _status_kib(srv.process.pid, "VmRSS")
            clients = {
                mode: (srv.client().register(), httpx.Client(base_url=srv.base_url, timeout=300))
                for mode, srv in servers.items()
            }
            for n in range(rounds):
                for mode in ("off", "on") if n % 2 == 0 else ("on", "off"):
                    user, http = clients[mode]
                    pid = servers[mode].process.pid  # type: ignore[union-attr]
                    samples[mode].append(
                        _round(http, pid, {"Authorization": f"Bearer {user.token}"}, data)
                    )
            for _user, http in clients.values():
                http.close()
            return {
                mode: {
                    "upload_mib_s": statistics.median(s[0] for s in samples[mode]),
                    "download_mib_s": statistics.median(s[1] for s in samples[mode]),
                    "server_cpu_s_per_round": statistics.median(s[2] for s in samples[mode]),
                    "rss_start_mib": start_rss[mode] / 1024,
                    "rss_peak_mib": _status_kib(servers[mode].process.pid, "VmHWM") / 1024,  # type: ignore[union-attr]
                }
                for mode in modes
            }
        finally:
            for srv in servers.values():
                srv.stop()


def storage_cpu(data: bytes, rounds: int, cipher: str) -> dict[str, float]:
    """Median CPU milliseconds (process time, all threads) per write/read of ``data``."""
    dek = SUITES[cipher](os.urandom(SUITES[cipher].key_size))

    async def key_for(_dek_id: int) -> object:
        return dek

    async def pieces() -> object:
        for i in range(0, len(data), 64 * 1024):  # about what an ASGI server hands over
            yield data[i : i + 64 * 1024]

    async def measure() -> dict[str, float]:
        with tempfile.TemporaryDirectory(prefix="bastion-media-bench-") as tmp:
            store = LocalMediaStore(Path(tmp))
            times: dict[str, list[float]] = {
                "write plain (sha256)": [],
                "write encrypted (hmac)": [],
                "read plain": [],
                "read encrypted": [],
            }
            for _ in range(rounds):
                cpu = time.process_time()
                await store.write("plainfile", pieces())  # type: ignore[arg-type]
                times["write plain (sha256)"].append(time.process_time() - cpu)
                mac = stream.content_mac(dek)
                cpu = time.process_time()
                sealed = stream.encrypt_stream(
                    pieces(), dek, 1, b"media|sealedfile", tap=mac.update
                )  # type: ignore[arg-type]
                await store.write("sealedfile", sealed, digest=False)
                mac.hexdigest()
                times["write encrypted (hmac)"].append(time.process_time() - cpu)
                cpu = time.process_time()
                async for _piece in store.read("plainfile"):
                    pass
                times["read plain"].append(time.process_time() - cpu)
                cpu = time.process_time()
                opened = stream.open_stream(
                    store.read("sealedfile"), b"media|sealedfile", key_for, required=True
                )  # type: ignore[arg-type]
                async for _piece in opened:
                    pass
                times["read encrypted"].append(time.process_time() - cpu)
            return {k: statistics.median(v) * 1000 for k, v in times.items()}

    return asyncio.run(measure())


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--mib", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--cipher", default="aes-256-gcm", choices=["aes-256-gcm", "sm4-gcm"])
    args = parser.parse_args()
    data = os.urandom(args.mib * 2**20)
    results = run(data, args.rounds, args.cipher)
    print(f"{args.mib} MiB file, {args.rounds} rounds, median; encryption 'on' uses {args.cipher}")
    print(f"{'':22}{'off':>10}{'on':>10}{'on/off':>9}")
    for key in (
        "upload_mib_s",
        "download_mib_s",
        "server_cpu_s_per_round",
        "rss_start_mib",
        "rss_peak_mib",
    ):
        off, on = results["off"][key], results["on"][key]
        print(f"{key:22}{off:10.2f}{on:10.2f}{on / off:9.2f}")
    print(f"\nstorage path only, CPU ms per {args.mib} MiB (median of {args.rounds}):")
    for key, value in storage_cpu(data, args.rounds, args.cipher).items():
        print(f"  {key:24}{value:8.1f}")


if __name__ == "__main__":
    main()
