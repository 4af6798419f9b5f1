#!/usr/bin/env python3
"""Scale-out: the core scenario against several server layouts, one after another.

Layouts (``--configs``, comma-separated, in this order by default):

* ``bastion-sqlite`` — one ``bastion serve`` on SQLite (as ``bastion init`` writes it);
* ``bastion-pg`` — one ``bastion serve`` on a fresh PostgreSQL database;
* ``bastion-pg-2w`` — two ``bastion serve --port P_i --worker-index i`` processes on one
  PostgreSQL database, a private ``redis-server`` (no persistence) as their bus,
  ``trusted_proxies: [127.0.0.1/32]``, and nginx round-robining every request over
  them (``--workers N`` changes the count; ``bastion-pg-Nw`` names it);
* ``bastion-pg-async``, ``bastion-pg-Nw-async`` — the same with the database's
  ``synchronous_commit = off`` (commits do not wait for the WAL fsync: a PostgreSQL
  crash may lose the last few hundred milliseconds of acknowledged writes; see
  docs/deployment.md);
* ``synapse-pg`` — Synapse, single process, on PostgreSQL (psycopg2-binary is installed
  into ``bench/.venv-synapse`` on first use); ``synapse-sqlite`` is also available;
* ``synapse-pg-Nw`` — Synapse with its own workers: the main process and N-1 generic
  workers serving ``/sync``, Redis between them (Synapse's ``redis`` extra is installed
  on first use), nginx sending ``/sync`` to the workers and everything else to the main
  process; ``-async`` as for Bastion.

For each: start it (fresh temporary directory and database), create the core
scenario's users and rooms (100 users, 20 rooms of 10), run ``find_max_rate.py``
(highest rate with delivery p99 < 100 ms and no errors), stop it, drop the database.
Extra arguments after ``--`` go to find_max_rate.py.

Reported per layout at its maximum: the rate, delivery p50/p99, deliveries/s, server
CPU (utime+stime summed over the worker processes) in cores and per message, RSS summed
over the workers, and — apart — the helpers' CPU and RSS: nginx, redis-server and the
PostgreSQL backends connected to the layout's database when the search started (their
RSS includes the shared buffers they touched). Output: ``result.json`` and
``summary.md`` in ``--results-dir`` (default bench/results/scaleout-<timestamp>/).

    .venv/bin/python bench/scaleout.py [--configs bastion-sqlite,bastion-pg,bastion-pg-2w,synapse-pg] [-- fmr options]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import sys
from pathlib import Path
from typing import Any

import benchlib as bl

DEFAULT = "bastion-sqlite,bastion-pg,bastion-pg-2w,synapse-pg"


def make_server(name: str, root: Path, bastion_overrides: dict[str, Any] | None = None) -> bl.Server:
    """The server of layout ``name``; ``bastion_overrides``: config keys for Bastion layouts."""
    if name == "bastion-sqlite":
        return bl.Bastion(name, root, overrides=bastion_overrides)
    m = re.fullmatch(r"bastion-pg(?:-(\d+)w)?(-async)?", name)
    if m:
        return bl.Bastion(
            name,
            root,
            overrides=bastion_overrides,
            database="postgresql",
            workers=int(m.group(1) or 1),
            pg_settings={"synchronous_commit": "off"} if m.group(2) else None,
        )
    if name == "synapse-sqlite":
        return bl.Synapse(name, root, database="sqlite")
    m = re.fullmatch(r"synapse-pg(?:-(\d+)w)?(-async)?", name)
    if m:
        pg_settings = {"synchronous_commit": "off"} if m.group(2) else None
        processes = int(m.group(1) or 1)
        if processes == 1:
            return bl.Synapse(name, root, database="postgresql", pg_settings=pg_settings)
        return bl.SynapseWorkers(name, root, sync_workers=processes - 1, pg_settings=pg_settings)
    raise SystemExit(f"unknown layout {name!r}")


def main() -> int:
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    p = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--configs", default=DEFAULT)
    p.add_argument("--users", type=int, default=100)
    p.add_argument("--rooms", type=int, default=20)
    p.add_argument("--room-size", type=int, default=10)
    p.add_argument("--processes", type=int, default=1, help="loadgen worker processes")
    p.add_argument("--results-dir", type=Path)
    p.add_argument("fmr_args", nargs="*", help="after --: find_max_rate.py options")
    args = p.parse_args()
    out = bl.results_dir("scaleout", args.results_dir)
    bl.log(f"results in {out}")
    scenario = ["--users", str(args.users), "--rooms", str(args.rooms)]
    scenario += ["--room-size", str(args.room_size), "--processes", str(args.processes)]
    root = bl.work_root()
    layouts: list[dict[str, Any]] = []
    try:
        for name in [c.strip() for c in args.configs.split(",") if c.strip()]:
            srv = make_server(name, root)
            try:
                srv.start()
                bl.log(f"{name}: {srv.label}, pids {srv.server_pids()} + helpers {srv.aux_pids()}")
                state = out / name / "state.json"
                state.parent.mkdir(exist_ok=True)
                rc = bl.run_logged(
                    bl.loadgen_cmd(srv, *scenario, "--state-file", str(state), "--setup-only"),
                    out / f"{name}.log",
                )
                if rc:
                    raise RuntimeError(f"{name}: setup failed")
                json_out = out / f"{name}.json"
                bl.run_logged(
                    bl.find_max_rate_cmd(
                        srv,
                        *scenario,
                        "--state-file",
                        str(state),
                        "--work-dir",
                        str(out / name),
                        "--json-out",
                        str(json_out),
                        *args.fmr_args,
                    ),
                    out / f"{name}.log",
                )
                result = json.loads(json_out.read_text()) if json_out.exists() else None
                layouts.append(
                    {
                        "config": name,
                        "server": srv.describe(),
                        "helpers": {
                            "pids": srv.aux_pids(),
                            "what": "nginx, redis-server, PostgreSQL backends of this database",
                        },
                        **bl.search_summary(result),
                    }
                )
            except Exception as exc:
                bl.log(f"{name}: {exc}")
                layouts.append({"config": name, "server": srv.describe(), "error": str(exc)})
            finally:
                srv.cleanup(out)
        result = {
            "benchmark": "scale-out",
            "scenario": {"users": args.users, "rooms": args.rooms, "room_size": args.room_size},
            "method": {
                "search": "find_max_rate.py: delivery p99 < 100 ms and no errors",
                "find_max_rate_args": args.fmr_args,
                "server_cpu": "utime+stime summed over the server's worker processes",
                "helpers": "nginx + redis-server + PostgreSQL backends of the layout's database",
            },
            "layouts": layouts,
        }
        bl.write_outputs(out, result, render(result))
        return 0
    finally:
        if not os.environ.get("KEEP_WORKDIR"):
            shutil.rmtree(root, ignore_errors=True)


def render(result: dict[str, Any]) -> str:
    header = [
        "layout",
        "server",
        "max rate (msg/s)",
        "delivery p50 / p99 (ms)",
        "deliveries/s",
        "server CPU (cores)",
        "CPU ms / msg",
        "server RSS (MiB)",
        "helpers CPU (cores)",
        "helpers RSS (MiB)",
        "loadgen CPU (cores)",
        "other load (cores)",
    ]
    rows = []
    for lay in result["layouts"]:
        if lay.get("error"):
            rows.append(
                [lay["config"], lay["server"]["label"], f"error: {lay['error']}", *[""] * 9]
            )
            continue
        if not lay.get("max_rate"):
            rows.append([lay["config"], lay["server"]["label"], "none passed", *[""] * 9])
            continue
        rows.append(
            [
                lay["config"],
                lay["server"]["label"],
                lay["max_rate"],
                f"{lay.get('delivery_p50_ms')} / {lay.get('delivery_p99_ms')}",
                lay.get("deliveries_per_s"),
                lay.get("server_cpu_cores"),
                lay.get("server_cpu_ms_per_msg"),
                lay.get("rss_mib"),
                lay.get("aux_cpu_cores"),
                lay.get("aux_rss_mib"),
                lay.get("client_cpu_cores"),
                lay.get("other_cores"),
            ]
        )
    sc = result["scenario"]
    return "\n".join(
        [
            f"### Scale-out — {sc['users']} users, {sc['rooms']} rooms of {sc['room_size']}",
            "",
            bl.md_table(header, rows),
            "",
            "Figures at each layout's highest passing rate (delivery p99 < 100 ms, no errors). "
            "Server CPU and RSS are summed over the worker processes; helpers are nginx, "
            "redis-server and the PostgreSQL backends of the layout's database.",
            "",
        ]
    )


if __name__ == "__main__":
    sys.exit(main())
