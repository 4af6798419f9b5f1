#!/usr/bin/env python3
"""Find the highest message rate a running homeserver sustains within a latency bound.

A step runs ``loadgen.py`` at one rate; it *passes* when the report has zero errors
(failed sends, missing or duplicate deliveries, sync errors) and delivery p99 below
``--p99-ms``. The search doubles the rate from ``--start-rate`` while steps pass
(halving instead if the first step fails), then bisects (geometric midpoints)
between the highest pass and the lowest fail until they are within
``--precision``. The best rate is then run once more to confirm it; if the
confirmation fails, the search goes on below it.

Users and rooms are created once (``loadgen.py --setup-only``) and every step reuses
them through a state file: registering 100 users and building 20 rooms takes far
longer than a step on a slow server, and reuse keeps the server's state growing the
same way for every server. Each step has its own run id, so messages from earlier
steps are never counted. Between steps the script waits for the server's CPU to go
quiet, so work queued by an overloaded step does not leak into the next one.

The machine may be shared. Before each step the script also waits for the rest of
the machine to go quiet, and a step that *fails* while other processes used more
than ``--max-other-cores`` is run again (``--disturbed-retries`` times): outside load
can only make a server look slower, so a pass under it stands.

The report (``--json-out``) lists every step and holds the full loadgen report of
the best passing run.
"""

from __future__ import annotations

import argparse
import json
import math
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
LOADGEN = BENCH_DIR / "loadgen.py"

sys.path.insert(0, str(BENCH_DIR))
from loadgen import machine_busy_seconds, process_cpu_seconds  # noqa: E402


@dataclass
class Step:
    rate: float
    passed: bool
    report: dict[str, Any] | None
    error: str | None
    seconds: float
    disturbed: bool = False  # failed while other processes loaded the machine; re-run

    def brief(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "rate": self.rate,
            "passed": self.passed,
            "seconds": round(self.seconds, 1),
        }
        if self.disturbed:
            out["disturbed"] = True
        if self.error:
            out["error"] = self.error
        r = self.report
        if r is not None:
            out.update(
                errors=r["errors_total"],
                send_errors=r["sends"]["error_kinds"],
                missing=r["deliveries"]["missing"],
                late_sends=r["sends"]["late"],
                delivery_ms=r["deliveries"]["latency_ms"],
                send_ms=r["sends"]["latency_ms"],
                server_cpu_cores=r["server"].get("cpu_cores"),
                server_rss_mib=r["server"].get("rss_mib"),
                client_cpu_cores=r["client"]["cpu_cores"],
                other_cpu_cores=r["machine"]["other_cores"],
            )
        return out


def fmt_rate(rate: float) -> str:
    return f"{rate:g}"


def round_rate(rate: float) -> float:
    """Three significant figures: enough resolution, readable numbers."""
    if rate <= 0:
        return rate
    digits = 2 - math.floor(math.log10(rate))
    return float(round(rate, digits))


class Search:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.work_dir: Path = args.work_dir
        self.state_file: Path = args.state_file or self.work_dir / "state.json"
        self.steps: list[Step] = []
        self.started = time.monotonic()
        self.budget_exhausted = False

    def log(self, message: str) -> None:
        print(f"[find_max_rate {time.strftime('%H:%M:%S')}] {message}", flush=True)

    def loadgen_args(self) -> list[str]:
        a = self.args
        out = [
            sys.executable,
            str(LOADGEN),
            "--base-url",
            a.base_url,
            "--users",
            str(a.users),
            "--rooms",
            str(a.rooms),
            "--room-size",
            str(a.room_size),
            "--state-file",
            str(self.state_file),
            "--processes",
            str(a.processes),
            "--p99-ms",
            str(a.p99_ms),
        ]
        if a.shared_secret:
            out += ["--shared-secret", a.shared_secret]
        for pid in a.server_pid:
            out += ["--server-pid", str(pid)]
        for pid in a.aux_pid:
            out += ["--aux-pid", str(pid)]
        return out + list(a.loadgen_arg)

    def setup(self) -> float:
        t = time.monotonic()
        if self.state_file.exists():
            self.log(f"reusing the users and rooms in {self.state_file}")
            return 0.0
        self.log(
            f"creating {self.args.users} users and {self.args.rooms} rooms of {self.args.room_size}"
        )
        subprocess.run([*self.loadgen_args(), "--setup-only"], check=True)
        return time.monotonic() - t

    def server_alive(self) -> bool:
        return all(Path(f"/proc/{pid}").exists() for pid in self.args.server_pid)

    def cool_down(self) -> None:
        """Wait for the server to go idle (at most --cooldown-max s), then for the rest of
        the machine to go quiet (at most --quiet-wait s).

        Idle: under 5% of a core over one second. Quiet: other processes under
        --max-other-cores over one second.
        """
        pid = self.args.server_pid
        t = time.monotonic()
        server = other = 0.0
        while True:
            server_before = process_cpu_seconds(pid) if pid else 0.0
            machine_before = machine_busy_seconds()
            time.sleep(1.0)
            server = (process_cpu_seconds(pid) if pid else 0.0) - server_before
            other = machine_busy_seconds() - machine_before - server
            waited = time.monotonic() - t
            if server >= 0.05:
                if waited < self.args.cooldown_max:
                    continue
                self.log(f"server still busy ({server:.2f} cores) after {waited:.0f}s; going on")
                return
            if other < self.args.max_other_cores or waited >= self.args.quiet_wait:
                return

    def duration_for(self, rate: float) -> float:
        duration: float = self.args.duration
        min_messages: int = self.args.min_messages
        return max(duration, min_messages / rate)

    def run_step(self, rate: float) -> Step:
        """One step; a failure while other processes loaded the machine is run again."""
        for _ in range(self.args.disturbed_retries):
            step = self._run_step(rate)
            other = step.report["machine"]["other_cores"] if step.report else 0.0
            if step.passed or other <= self.args.max_other_cores:
                return step
            step.disturbed = True
            self.log(f"  other processes used {other} cores during that step: running it again")
        return self._run_step(rate)

    def _run_step(self, rate: float) -> Step:
        if not self.server_alive():
            raise SystemExit(f"a server process of {self.args.server_pid} is gone")
        self.cool_down()
        duration = self.duration_for(rate)
        index = len(self.steps) + 1
        out = self.work_dir / f"step-{index:02d}-rate-{fmt_rate(rate)}.json"
        cmd = [
            *self.loadgen_args(),
            "--rate",
            fmt_rate(rate),
            "--duration",
            f"{duration:g}",
            "--warmup",
            f"{self.args.warmup:g}",
            "--json-out",
            str(out),
            "--quiet",
        ]
        t = time.monotonic()
        proc = subprocess.run(cmd, capture_output=True, text=True)
        seconds = time.monotonic() - t
        if proc.returncode != 0 or not out.exists():
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
            step = Step(rate, False, None, "loadgen failed: " + " | ".join(tail), seconds)
            self.log(f"step {index}: {fmt_rate(rate)} msg/s  FAIL  ({step.error})")
        else:
            report = json.loads(out.read_text())
            step = Step(rate, bool(report["passed"]), report, None, seconds)
            d, s = report["deliveries"], report["sends"]
            by_size = "".join(
                f"  rooms of {size}: p99 {v['p99']} ms"
                for size, v in d.get("latency_ms_by_room_size", {}).items()
            )
            self.log(
                f"step {index}: {fmt_rate(rate)} msg/s  {'pass' if step.passed else 'FAIL'}  "
                f"delivery p50/p99 {d['latency_ms']['p50']}/{d['latency_ms']['p99']} ms{by_size}  "
                f"send p99 {s['latency_ms']['p99']} ms  errors {report['errors_total']}  "
                f"late {s['late']}  server {report['server'].get('cpu_cores')} cores  "
                f"client {report['client']['cpu_cores']} cores  other {report['machine']['other_cores']} cores  "
                f"({seconds:.0f}s)"
            )
        self.steps.append(step)
        return step

    def time_left_for(self, rate: float) -> bool:
        elapsed = time.monotonic() - self.started
        # A step costs its warm-up, measured window and drain plus ~10 s of process
        # start, initial syncs and cool-down.
        estimate = self.args.warmup + self.duration_for(rate) + 15
        if elapsed + estimate > self.args.time_budget:
            self.budget_exhausted = True
            self.log(
                f"time budget of {self.args.time_budget:g}s would be exceeded; stopping the search"
            )
            return False
        return len(self.steps) < int(self.args.max_steps)

    def search(self) -> float | None:
        """The highest passing rate below every failing one, or None if none passed.

        Rates are assumed monotonic: a pass above a lower failure is not believed.
        """
        a = self.args
        passes: set[float] = set()
        fails: set[float] = set()
        confirmed: set[float] = set()
        confirmations = 0

        def best() -> float | None:
            ceiling = min(fails, default=math.inf)
            ok = [r for r in passes if r < ceiling]
            return max(ok) if ok else None

        def attempt(rate: float) -> None:
            for _ in range(1 + a.fail_retries):
                if self.run_step(rate).passed:
                    passes.add(rate)
                    return
            fails.add(rate)
            passes.discard(rate)

        rate: float | None = a.start_rate
        while rate is not None:
            if not self.time_left_for(rate):
                break
            attempt(rate)
            rate = None
            lo = best()
            hi = min((r for r in fails if lo is None or r > lo), default=None)
            if lo is None:
                # Nothing passes yet: halve below the lowest failure.
                assert hi is not None
                if hi > a.min_rate:
                    rate = round_rate(max(hi / 2, a.min_rate))
            elif hi is None:
                # Nothing fails yet: double, up to --max-rate.
                if lo < a.max_rate:
                    rate = round_rate(min(lo * 2, a.max_rate))
            elif hi / lo > 1 + a.precision:
                mid = round_rate(math.sqrt(lo * hi))
                if mid not in (lo, hi):
                    rate = mid
            if (
                rate is None
                and lo is not None
                and a.confirm
                and lo not in confirmed
                and confirmations < 2
            ):
                # Converged (or out of range): run the best rate once more. If it fails
                # now, it joins the failures and the search goes on below it.
                confirmations += 1
                confirmed.add(lo)
                self.log(f"confirming {fmt_rate(lo)} msg/s")
                rate = lo
        return best()


def scenario_of(state_file: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Users and rooms as run: from the state file when it holds a custom layout."""
    try:
        world = json.loads(state_file.read_text())
    except (OSError, ValueError):
        world = {}
    if world.get("custom"):
        sizes = sorted(len(r["members"]) for r in world["rooms"])
        return {
            "users": world["users"],
            "rooms": world["rooms_count"],
            "room_sizes": {str(n): sizes.count(n) for n in sorted(set(sizes))},
        }
    return {"users": args.users, "rooms": args.rooms, "room_size": args.room_size}


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Find the highest rate with delivery p99 under a bound and no errors.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--base-url", required=True)
    p.add_argument("--shared-secret", required=True)
    p.add_argument(
        "--server-pid",
        type=int,
        action="append",
        default=[],
        help="for server CPU/RSS readings and the cool-down between steps (repeatable: workers are summed)",
    )
    p.add_argument(
        "--aux-pid",
        type=int,
        action="append",
        default=[],
        help="helper processes (nginx, redis, database backends) reported apart from the server (repeatable)",
    )
    p.add_argument(
        "--state-file",
        type=Path,
        help="users and rooms to reuse (created there if missing; default: <work-dir>/state.json, which must not exist)",
    )
    p.add_argument(
        "--label", default="server", help="name of the server under test, for the report"
    )
    p.add_argument("--users", type=int, default=100)
    p.add_argument("--rooms", type=int, default=20)
    p.add_argument("--room-size", type=int, default=10)
    p.add_argument("--start-rate", type=float, default=10.0)
    p.add_argument("--min-rate", type=float, default=0.5)
    p.add_argument("--max-rate", type=float, default=20_000.0)
    p.add_argument(
        "--precision", type=float, default=0.1, help="stop bisecting when fail/pass <= 1 + this"
    )
    p.add_argument("--p99-ms", type=float, default=100.0)
    p.add_argument(
        "--duration", type=float, default=10.0, help="measured seconds per step (at least)"
    )
    p.add_argument(
        "--min-messages",
        type=int,
        default=150,
        help="lengthen a step's window to send at least this many",
    )
    p.add_argument("--warmup", type=float, default=3.0)
    p.add_argument("--processes", type=int, default=1, help="loadgen worker processes")
    p.add_argument(
        "--fail-retries",
        type=int,
        default=0,
        help="re-run a failing step this many times before believing it",
    )
    p.add_argument(
        "--no-confirm", dest="confirm", action="store_false", help="do not re-run the best rate"
    )
    p.add_argument("--max-steps", type=int, default=24)
    p.add_argument(
        "--time-budget",
        type=float,
        default=780.0,
        help="seconds; no step starts that would overrun it",
    )
    p.add_argument(
        "--cooldown-max",
        type=float,
        default=60.0,
        help="longest wait for an idle server before a step",
    )
    p.add_argument(
        "--quiet-wait",
        type=float,
        default=15.0,
        help="longest wait for a quiet machine before a step",
    )
    p.add_argument(
        "--max-other-cores",
        type=float,
        default=0.25,
        help="CPU (in cores) that other processes may use before the machine counts as disturbed",
    )
    p.add_argument(
        "--disturbed-retries",
        type=int,
        default=1,
        help="re-runs of a step that failed on a disturbed machine",
    )
    p.add_argument(
        "--work-dir",
        type=Path,
        default=Path("bench/results/scratch"),
        help="state file and step reports",
    )
    p.add_argument("--json-out", type=Path)
    p.add_argument(
        "--loadgen-arg", action="append", default=[], help="extra loadgen.py argument (repeatable)"
    )
    return p.parse_args()


def main() -> int:
    # SIGTERM unwinds like Ctrl-C: subprocess.run then kills the running loadgen step.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    args = parse_args()
    args.work_dir.mkdir(parents=True, exist_ok=True)
    if args.state_file is None and (args.work_dir / "state.json").exists():
        raise SystemExit(
            f"{args.work_dir}/state.json exists: use a fresh --work-dir for a fresh server"
        )
    search = Search(args)
    setup_seconds = search.setup()
    best = search.search()
    best_step = next((s for s in reversed(search.steps) if s.rate == best and s.passed), None)
    result = {
        "label": args.label,
        "max_rate": best,
        "criterion": {"delivery_p99_ms_below": args.p99_ms, "errors": 0},
        "scenario": scenario_of(search.state_file, args),
        "setup_seconds": round(setup_seconds, 1),
        "search_seconds": round(time.monotonic() - search.started, 1),
        "budget_exhausted": search.budget_exhausted,
        "steps": [s.brief() for s in search.steps],
        "best": best_step.report if best_step else None,
    }
    if args.json_out:
        args.json_out.parent.mkdir(parents=True, exist_ok=True)
        args.json_out.write_text(json.dumps(result, indent=2) + "\n")
    if best is None:
        search.log(f"{args.label}: no rate passed (delivery p99 < {args.p99_ms:g} ms, no errors)")
        return 1
    assert best_step is not None and best_step.report is not None
    r = best_step.report
    search.log(
        f"{args.label}: max sustained rate {fmt_rate(best)} msg/s "
        f"(delivery p99 {r['deliveries']['latency_ms']['p99']} ms, server {r['server'].get('cpu_cores')} cores, "
        f"rss {r['server'].get('rss_mib')} MiB) in {result['search_seconds']:.0f}s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
