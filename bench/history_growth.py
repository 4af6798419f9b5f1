#!/usr/bin/env python3
"""Does the server get slower as it accumulates history? The core scenario, fresh and aged.

Starts Bastion (SQLite, presence off, as run_bastion.sh) — or Synapse with
``--server synapse`` — sets up the core scenario (100 users, 20 rooms of 10), then:

1. **fresh** — one ``loadgen.py`` run at ``--rate`` (100 msg/s) for ``--duration`` (20 s);
2. **fill** — ``--fill-runs`` (3) runs at ``--fill-rate`` (150 msg/s) for ``--fill-duration``
   (60 s) each, on the same users and rooms, so the rooms gather history (~27,000
   messages with the defaults); their figures are recorded too;
3. **aged** — the fresh run again.

Reported for each run: server CPU per message, delivery p50/p99, RSS, errors. The
question is the ratio aged / fresh of CPU per message and of p99 at the same rate: a
server whose cost per message grows with history shows it here. (It found the unread
count recount of 2026-11-28: CPU per message 6.4 → 9.7 ms and p99 21 → 1,416 ms after
27k messages, before the fix.)

Output: ``result.json`` and ``summary.md`` in ``--results-dir`` (default
bench/results/growth-<timestamp>/), plus every run's JSON report and the server's log.

    bench/history_growth.py [--server bastion|synapse] [--rate 100] [--fill-runs 3]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import sys
from pathlib import Path
from typing import Any

import benchlib as bl


def run_summary(path: Path) -> dict[str, Any]:
    if not path.exists():
        return {"error": "loadgen failed (see the log)"}
    r = json.loads(path.read_text())
    d, s, srv = r["deliveries"], r["sends"], r["server"]
    return {
        "rate": r["config"]["rate"],
        "passed": r["passed"],
        "errors": r["errors_total"],
        "delivery_p50_ms": d["latency_ms"]["p50"],
        "delivery_p99_ms": d["latency_ms"]["p99"],
        "delivery_max_ms": d["latency_ms"]["max"],
        "missing": d["missing"],
        "duplicates": d["duplicates"],
        "server_cpu_cores": srv.get("cpu_cores"),
        "server_cpu_ms_per_msg": round(srv["cpu_seconds"] * 1000 / s["ok"], 2) if s["ok"] else None,
        "rss_mib": srv.get("rss_mib"),
        "other_cores": r["machine"]["other_cores"],
    }


def main() -> int:
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    p = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--server", choices=("bastion", "synapse"), default="bastion")
    p.add_argument("--users", type=int, default=100)
    p.add_argument("--rooms", type=int, default=20)
    p.add_argument("--room-size", type=int, default=10)
    p.add_argument("--rate", type=float, default=100.0, help="rate of the fresh and aged runs")
    p.add_argument("--duration", type=float, default=20.0)
    p.add_argument("--fill-rate", type=float, default=150.0)
    p.add_argument("--fill-duration", type=float, default=60.0)
    p.add_argument("--fill-runs", type=int, default=3)
    p.add_argument("--results-dir", type=Path)
    args = p.parse_args()
    out = bl.results_dir("growth", args.results_dir)
    bl.log(f"results in {out}")
    root = bl.work_root()
    srv: bl.Server = bl.Bastion("bastion", root) if args.server == "bastion" else bl.Synapse("synapse", root)
    state = out / "state.json"
    scenario = ["--users", str(args.users), "--rooms", str(args.rooms), "--room-size", str(args.room_size)]
    runs: list[dict[str, Any]] = []
    try:
        srv.start()
        bl.log(f"{srv.label}: pids {srv.server_pids()} on {srv.base_url}")
        if bl.run_logged(bl.loadgen_cmd(srv, *scenario, "--state-file", str(state), "--setup-only"), out / "loadgen.log"):
            raise SystemExit("setup failed")
        plan = [("fresh", args.rate, args.duration)]
        plan += [(f"fill-{i + 1}", args.fill_rate, args.fill_duration) for i in range(args.fill_runs)]
        plan += [("aged", args.rate, args.duration)]
        for name, rate, duration in plan:
            bl.wait_idle(srv.server_pids())
            json_out = out / f"{name}.json"
            cmd = bl.loadgen_cmd(
                srv, *scenario, "--state-file", str(state), "--rate", f"{rate:g}",
                "--duration", f"{duration:g}", "--json-out", str(json_out),
            )
            bl.run_logged(cmd, out / "loadgen.log")
            runs.append({"run": name, **run_summary(json_out)})
    finally:
        srv.cleanup(out)
        if not os.environ.get("KEEP_WORKDIR"):
            shutil.rmtree(root, ignore_errors=True)
    fresh, aged = runs[0], runs[-1]

    def ratio(key: str) -> float | None:
        a, b = aged.get(key), fresh.get(key)
        return round(a / b, 2) if a and b else None

    result = {
        "benchmark": "history growth",
        "server": srv.describe(),
        "method": vars(args) | {"results_dir": str(out)},
        "runs": runs,
        "aged_over_fresh": {"cpu_ms_per_msg": ratio("server_cpu_ms_per_msg"), "delivery_p99": ratio("delivery_p99_ms")},
    }
    header = ["run", "rate (msg/s)", "CPU per message (ms)", "delivery p50 / p99 / max (ms)", "RSS (MiB)", "errors", "passed"]
    rows = [
        [
            r["run"], r.get("rate"), r.get("server_cpu_ms_per_msg"),
            f"{r.get('delivery_p50_ms')} / {r.get('delivery_p99_ms')} / {r.get('delivery_max_ms')}",
            r.get("rss_mib"), r.get("errors"), r.get("passed"),
        ]
        for r in runs
    ]
    md = "\n".join(
        [
            f"### History growth — {srv.label}",
            "",
            bl.md_table(header, rows),
            "",
            f"Aged / fresh at {args.rate:g} msg/s: CPU per message {result['aged_over_fresh']['cpu_ms_per_msg']}, "
            f"delivery p99 {result['aged_over_fresh']['delivery_p99']}.",
            "",
        ]
    )
    bl.write_outputs(out, result, md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
