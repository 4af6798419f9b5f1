#!/usr/bin/env python3
"""/sync pacing on vs off: the core scenario at fixed rates against fresh Bastions.

For each round, and in it for each configuration (alternating which goes first from
round to round), starts a fresh Bastion on SQLite (presence off, as in
run_bastion.sh) with ``limits.sync_pacing_ms`` set to the configuration's interval
(``--intervals``, default ``0,50``: pacing off, and the default 50 ms) and
``limits.sync_pacing_busy_lag_ms`` to ``--busy-lag-ms``, creates the core scenario's
users and rooms, and runs ``loadgen.py`` at each of ``--rates`` (``--duration``
seconds each, the server idle before each run). Fresh servers, because CPU per message
drifts from one server process to the next by more than the effect measured here.

Reported per configuration and rate, median over rounds and each round's figures:
pass/fail, delivery p50 / p99, server CPU per message, /sync responses per message
(sync requests over the whole run, warm-up and drain included, divided by the
measured window's messages — a ratio, comparable between configurations), load
generator CPU.

Output: ``result.json`` and ``summary.md`` (also printed) in ``--results-dir``
(default bench/results/sync-pacing-<timestamp>/), plus each run's JSON report.

    bench/sync_pacing.py [--rounds 2] [--rates 200,300,400,450] [--intervals 0,50]
"""

from __future__ import annotations

import argparse
import json
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import benchlib as bl


def run_config(
    interval: int, busy_lag: float, rates: list[float], duration: float, out: Path, tag: str, root: Path
) -> list[dict[str, Any]]:
    overrides = {"limits": {"sync_pacing_ms": interval, "sync_pacing_busy_lag_ms": busy_lag}}
    server = bl.Bastion(f"pacing-{interval}", root, overrides=overrides)
    rows: list[dict[str, Any]] = []
    try:
        server.start()
        state = server.work / "state.json"
        subprocess.run(bl.loadgen_cmd(server, "--state-file", str(state), "--setup-only", "--quiet"), check=True)
        for rate in rates:
            bl.wait_idle(server.server_pids())
            report_path = out / f"{tag}-w{interval}-r{rate:g}.json"
            cmd = bl.loadgen_cmd(
                server, "--state-file", str(state), "--rate", str(rate), "--duration", str(duration),
                "--quiet", "--json-out", str(report_path),
            )
            bl.run_logged(cmd, out / f"{tag}-w{interval}-r{rate:g}.log")
            report = json.loads(report_path.read_text())
            deliveries, srv = report["deliveries"], report["server"]
            messages = max(report["sends"]["ok"], 1)
            sends_per_s = max(report["throughput"]["sends_per_s"], 1e-9)
            rows.append(
                {
                    "interval_ms": interval,
                    "rate": rate,
                    "passed": report["passed"],
                    "p50_ms": deliveries["latency_ms"]["p50"],
                    "p99_ms": deliveries["latency_ms"]["p99"],
                    "cpu_ms_per_msg": round(1000 * srv["cpu_cores"] / sends_per_s, 2),
                    "syncs_per_msg": round(deliveries["sync_requests"] / messages, 2),
                    "client_cores": report["client"]["cpu_cores"],
                    "late_sends": report["sends"]["late"],
                    "errors": report["errors_total"],
                }
            )
            bl.log(f"{tag} interval {interval} ms, {rate:g} msg/s: {rows[-1]}")
    finally:
        server.cleanup(out)
    return rows


def main() -> int:
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--rates", default="200,300,400,450", help="messages/s, comma-separated")
    p.add_argument("--intervals", default="0,50", help="limits.sync_pacing_ms values, comma-separated")
    p.add_argument("--busy-lag-ms", type=float, default=5.0, help="limits.sync_pacing_busy_lag_ms")
    p.add_argument("--duration", type=float, default=15.0, help="measured window per run, seconds")
    p.add_argument("--results-dir", type=Path)
    a = p.parse_args()
    rates = [float(x) for x in a.rates.split(",")]
    intervals = [int(x) for x in a.intervals.split(",")]
    out = bl.results_dir("sync-pacing", a.results_dir)
    root = bl.work_root()
    rows: list[dict[str, Any]] = []
    for round_no in range(a.rounds):
        order = intervals if round_no % 2 == 0 else intervals[::-1]
        for interval in order:
            for row in run_config(interval, a.busy_lag_ms, rates, a.duration, out, f"round{round_no + 1}", root):
                rows.append({"round": round_no + 1, **row})
    table = []
    for interval in intervals:
        for rate in rates:
            runs = [r for r in rows if r["interval_ms"] == interval and r["rate"] == rate]
            table.append(
                [
                    f"{interval} ms" if interval else "off",
                    f"{rate:g}",
                    " / ".join("pass" if r["passed"] else "fail" for r in runs),
                    " / ".join(f"{r['p50_ms']}" for r in runs),
                    " / ".join(f"{r['p99_ms']}" for r in runs),
                    f"{bl.median(r['cpu_ms_per_msg'] for r in runs)}",
                    f"{bl.median(r['syncs_per_msg'] for r in runs)}",
                    f"{bl.median(r['client_cores'] for r in runs)}",
                ]
            )
    markdown = (
        f"Bastion {bl.bastion_version()} (SQLite), core scenario, {a.duration:g} s per run, "
        f"{a.rounds} rounds of fresh servers, busy lag {a.busy_lag_ms:g} ms; per-round figures separated by /\n\n"
        + bl.md_table(
            ["pacing", "msg/s", "verdict", "delivery p50 (ms)", "delivery p99 (ms)",
             "CPU per msg (ms, median)", "/sync responses per msg (median)", "loadgen cores (median)"],
            table,
        )
    )
    root.rmdir()
    bl.write_outputs(out, {"rounds": a.rounds, "busy_lag_ms": a.busy_lag_ms, "duration_s": a.duration, "runs": rows}, markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
