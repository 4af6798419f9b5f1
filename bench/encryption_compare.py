#!/usr/bin/env python3
"""Encryption at rest on vs off: the core scenario against two Bastions in one run.

Starts two Bastions side by side (SQLite, fresh temporary directories, presence off as
in run_bastion.sh): one with ``encryption: {enabled: true}`` — what ``bastion init``
writes — and one with ``encryption: {enabled: false}``. Each gets its own users and
rooms (``--users``/``--rooms``/``--room-size``, default the core 100 / 20 x 10). Then:

1. **Search** — ``find_max_rate.py`` against each (highest rate with delivery
   p99 < 100 ms and no errors). ``--search-rounds N`` repeats the pair, alternating
   which goes first (on/off, off/on, ...); the reported maximum is the median of the
   rounds.
2. **Fixed rate** — both at one common rate, ``--common-fraction`` (0.8) of the lower
   maximum (or ``--common-rate``), ``--fixed-rounds`` (3) times each, alternating
   (on, off, off, on, on, off ...), each a ``loadgen.py`` run of ``--fixed-duration``
   seconds after ``--fixed-warmup``; the servers must go idle before each run.
   Reported: median delivery p50/p99 and median server CPU per message.

The idle server is running but has no clients while the other is measured. With
``--fresh`` every search and every fixed-rate run gets a new server instead (empty
database, new users and rooms): the figures then do not depend on how much history the
server has accumulated from earlier runs, nor on which mode ran the longer search. Target:
the two within 10% (``--target``) of each other, in max rate and in p99 at the
common rate.

Extra arguments after ``--`` go to find_max_rate.py (e.g. ``-- --duration 20``).
Output: ``result.json`` and ``summary.md`` (a Markdown fragment, also printed) in
``--results-dir`` (default bench/results/encryption-<timestamp>/), plus each search's
and run's JSON reports and the servers' logs.

    bench/encryption_compare.py [--search-rounds 1] [--fixed-rounds 3] [-- find_max_rate options]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import signal
import sys
from pathlib import Path
from typing import Any

import benchlib as bl

MODES = ("on", "off")


def round_rate(rate: float) -> float:
    digits = 2 - math.floor(math.log10(rate))
    return float(round(rate, digits))


def main() -> int:
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    p = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--users", type=int, default=100)
    p.add_argument("--rooms", type=int, default=20)
    p.add_argument("--room-size", type=int, default=10)
    p.add_argument("--processes", type=int, default=1, help="loadgen worker processes")
    p.add_argument(
        "--body-words", type=int, default=0,
        help="common words added to each message (loadgen.py --body-words; the blind index costs per word)",
    )
    p.add_argument("--search-rounds", type=int, default=1)
    p.add_argument("--fixed-rounds", type=int, default=3)
    p.add_argument("--fixed-duration", type=float, default=30.0)
    p.add_argument("--fixed-warmup", type=float, default=3.0)
    p.add_argument("--common-fraction", type=float, default=0.8)
    p.add_argument(
        "--common-rate", type=float, help="fixed rate instead of a fraction of the lower max"
    )
    p.add_argument("--target", type=float, default=0.10, help="allowed relative difference")
    p.add_argument(
        "--fresh",
        action="store_true",
        help="a new server (empty database, new users and rooms) for every search and every "
        "fixed-rate run, instead of one long-lived server per mode",
    )
    p.add_argument("--results-dir", type=Path)
    p.add_argument("fmr_args", nargs="*", help="after --: find_max_rate.py options")
    args = p.parse_args()
    out = bl.results_dir("encryption", args.results_dir)
    bl.log(f"results in {out}")

    root = bl.work_root()
    scenario = [
        "--users",
        str(args.users),
        "--rooms",
        str(args.rooms),
        "--room-size",
        str(args.room_size),
        "--processes",
        str(args.processes),
    ]
    # Passed to loadgen.py directly, and to find_max_rate.py as loadgen arguments.
    words = ["--body-words", str(args.body_words)] if args.body_words else []
    servers: dict[str, bl.Bastion] = {}  # the long-lived pair (or, with --fresh, the first of each)
    live: list[bl.Bastion] = []

    def new_server(mode: str, tag: str) -> tuple[bl.Bastion, Path]:
        """Start a Bastion for ``mode`` and create the scenario's users and rooms on it."""
        srv = bl.Bastion(f"bastion-enc-{mode}{tag}", root, encryption=mode == "on")
        live.append(srv)
        srv.start()
        bl.log(f"{srv.label}: pid {srv.server_pids()} on {srv.base_url}")
        (out / mode).mkdir(exist_ok=True)
        state = out / mode / f"state{tag}.json"
        rc = bl.run_logged(
            bl.loadgen_cmd(srv, *scenario, "--state-file", str(state), "--setup-only"),
            out / f"{mode}.log",
        )
        if rc:
            raise SystemExit(f"setup against encryption {mode} failed")
        servers.setdefault(mode, srv)
        return srv, state

    def server_for(mode: str, tag: str) -> tuple[bl.Bastion, Path]:
        if args.fresh:
            return new_server(mode, tag)
        return servers[mode], out / mode / "state.json"

    def done_with(srv: bl.Bastion) -> None:
        if args.fresh:
            srv.cleanup(out)
            live.remove(srv)

    try:
        if not args.fresh:
            for mode in MODES:
                new_server(mode, "")

        # 1. the searches, alternating which server goes first
        searches: list[dict[str, Any]] = []
        for r in range(args.search_rounds):
            for mode in MODES if r % 2 == 0 else MODES[::-1]:
                srv, state = server_for(mode, f"-search-{r + 1}")
                json_out = out / mode / f"search-{r + 1}.json"
                cmd = bl.find_max_rate_cmd(
                    srv,
                    *scenario,
                    "--state-file",
                    str(state),
                    "--work-dir",
                    str(out / mode / f"search-{r + 1}"),
                    "--json-out",
                    str(json_out),
                    *[f"--loadgen-arg={w}" for w in words],
                    *args.fmr_args,
                )
                bl.run_logged(cmd, out / f"{mode}.log")
                done_with(srv)
                result = json.loads(json_out.read_text()) if json_out.exists() else None
                searches.append({"mode": mode, "round": r + 1, **bl.search_summary(result)})
        max_rate = {
            mode: bl.median(s["max_rate"] for s in searches if s["mode"] == mode) for mode in MODES
        }

        # 2. both at one common rate, alternating
        fixed: list[dict[str, Any]] = []
        common = args.common_rate
        if common is None and all(max_rate.values()):
            common = round_rate(args.common_fraction * min(v for v in max_rate.values() if v))
        if common is None:
            bl.log("no common rate: a search found no passing rate; skipping the fixed-rate runs")
        else:
            bl.log(f"fixed-rate runs at {common:g} msg/s, {args.fixed_rounds} per server")
            for r in range(args.fixed_rounds):
                for mode in MODES if r % 2 == 0 else MODES[::-1]:
                    srv, state = server_for(mode, f"-fixed-{r + 1}")
                    bl.wait_idle(srv.server_pids())
                    json_out = out / mode / f"fixed-{r + 1}-rate-{common:g}.json"
                    cmd = bl.loadgen_cmd(
                        srv,
                        *scenario,
                        "--state-file",
                        str(state),
                        "--rate",
                        f"{common:g}",
                        "--duration",
                        f"{args.fixed_duration:g}",
                        "--warmup",
                        f"{args.fixed_warmup:g}",
                        "--json-out",
                        str(json_out),
                        *words,
                    )
                    bl.run_logged(cmd, out / f"{mode}.log")
                    done_with(srv)
                    fixed.append({"mode": mode, "round": r + 1, **fixed_summary(json_out)})
        result = summarise(args, servers, searches, max_rate, common, fixed)
        bl.write_outputs(out, result, render(result))
        return 0
    finally:
        for srv in live:
            srv.cleanup(out)
        if not os.environ.get("KEEP_WORKDIR"):
            shutil.rmtree(root, ignore_errors=True)


def fixed_summary(path: Path) -> dict[str, Any]:
    if not path.exists():
        return {"error": "loadgen failed (see the log)"}
    r = json.loads(path.read_text())
    d, s, srv = r["deliveries"], r["sends"], r["server"]
    return {
        "passed": r["passed"],
        "errors": r["errors_total"],
        "delivery_p50_ms": d["latency_ms"]["p50"],
        "delivery_p99_ms": d["latency_ms"]["p99"],
        "delivery_max_ms": d["latency_ms"]["max"],
        "send_p99_ms": s["latency_ms"]["p99"],
        "deliveries_per_s": r["throughput"]["deliveries_per_s"],
        "server_cpu_cores": srv.get("cpu_cores"),
        "server_cpu_ms_per_msg": round(srv["cpu_seconds"] * 1000 / s["ok"], 2) if s["ok"] else None,
        "rss_mib": srv.get("rss_mib"),
        "other_cores": r["machine"]["other_cores"],
        "client_saturated": r["client"]["saturated"],
    }


def summarise(
    args: argparse.Namespace,
    servers: dict[str, bl.Bastion],
    searches: list[dict[str, Any]],
    max_rate: dict[str, float | None],
    common: float | None,
    fixed: list[dict[str, Any]],
) -> dict[str, Any]:
    at_common = {
        mode: {
            key: bl.median(f.get(key) for f in fixed if f["mode"] == mode)
            for key in ("delivery_p50_ms", "delivery_p99_ms", "server_cpu_ms_per_msg", "rss_mib")
        }
        for mode in MODES
    }

    def ratio(a: float | None, b: float | None) -> float | None:
        return round(a / b, 3) if a and b else None

    ratios = {
        "max_rate_on_over_off": ratio(max_rate["on"], max_rate["off"]),
        "p99_at_common_on_over_off": ratio(
            at_common["on"]["delivery_p99_ms"], at_common["off"]["delivery_p99_ms"]
        ),
        "cpu_per_msg_on_over_off": ratio(
            at_common["on"]["server_cpu_ms_per_msg"], at_common["off"]["server_cpu_ms_per_msg"]
        ),
    }
    within = {k: (abs(v - 1) <= args.target if v is not None else None) for k, v in ratios.items()}
    return {
        "benchmark": "encryption at rest on vs off",
        "scenario": {"users": args.users, "rooms": args.rooms, "room_size": args.room_size,
                     "body_words": args.body_words},
        "method": {
            "search": "find_max_rate.py: delivery p99 < 100 ms and no errors",
            "search_rounds": args.search_rounds,
            "find_max_rate_args": args.fmr_args,
            "common_rate": common,
            "common_fraction": args.common_fraction if args.common_rate is None else None,
            "fixed_rounds": args.fixed_rounds,
            "fixed_duration_s": args.fixed_duration,
            "fixed_warmup_s": args.fixed_warmup,
            "target_relative_difference": args.target,
            "fresh_server_per_run": args.fresh,
        },
        "servers": {mode: srv.describe() for mode, srv in servers.items()},
        "searches": searches,
        "max_rate": max_rate,
        "fixed_runs": fixed,
        "at_common_rate": at_common,
        "ratios": ratios,
        "within_target": within,
    }


def render(result: dict[str, Any]) -> str:
    rate = result["method"]["common_rate"]
    common = f"{rate:g}" if rate is not None else "n/a"
    rows = []
    for mode in MODES:
        best = [s for s in result["searches"] if s["mode"] == mode]
        last = best[-1] if best else {}
        c = result["at_common_rate"][mode]
        runs = [f for f in result["fixed_runs"] if f["mode"] == mode]
        rows.append(
            [
                f"encryption {mode}",
                result["max_rate"][mode] or "none passed",
                " / ".join(str(s["max_rate"]) for s in best),
                f"{last.get('delivery_p50_ms')} / {last.get('delivery_p99_ms')}",
                last.get("server_cpu_ms_per_msg"),
                f"{c['delivery_p50_ms']} / {c['delivery_p99_ms']}",
                ", ".join(str(f.get("delivery_p99_ms")) for f in runs),
                c["server_cpu_ms_per_msg"],
                c["rss_mib"],
                sum(1 for f in runs if f.get("errors")),
            ]
        )
    header = [
        "Bastion",
        "max rate (msg/s, median)",
        "max rate per search",
        "delivery p50 / p99 at max (ms, last search)",
        "CPU ms / msg at max",
        f"delivery p50 / p99 at {common} msg/s (ms, median)",
        f"p99 per run at {common} msg/s",
        f"CPU ms / msg at {common} msg/s",
        "RSS (MiB)",
        "runs with errors",
    ]
    r, w = result["ratios"], result["within_target"]
    target = result["method"]["target_relative_difference"]

    def verdict(key: str) -> str:
        return "n/a" if w[key] is None else ("within" if w[key] else "NOT within")

    lines = [
        f"### Encryption at rest on vs off — {result['scenario']['users']} users, "
        f"{result['scenario']['rooms']} rooms of {result['scenario']['room_size']}"
        + (f", messages of 3 + {result['scenario']['body_words']} words" if result["scenario"].get("body_words") else ""),
        "",
        bl.md_table(header, rows),
        "",
        f"- max rate on / off: **{r['max_rate_on_over_off']}** ({verdict('max_rate_on_over_off')} "
        f"±{target:.0%})",
        f"- delivery p99 at {common} msg/s, on / off: **{r['p99_at_common_on_over_off']}** "
        f"({verdict('p99_at_common_on_over_off')} ±{target:.0%})",
        f"- server CPU per message at {common} msg/s, on / off: **{r['cpu_per_msg_on_over_off']}**",
        "",
        f"Servers: {result['servers']['on']['label']}; {result['servers']['off']['label']}. "
        f"Search rounds {result['method']['search_rounds']}, fixed-rate runs "
        f"{result['method']['fixed_rounds']} per server of {result['method']['fixed_duration_s']:g} s "
        f"(+{result['method']['fixed_warmup_s']:g} s warm-up), alternating"
        + (", a fresh server for every search and run." if result["method"]["fresh_server_per_run"] else "."),
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
