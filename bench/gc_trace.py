#!/usr/bin/env python3
"""Run ``bastion serve`` with every slow garbage collection logged, for latency work.

    python bench/gc_trace.py --log /tmp/gc.log -- --config bastion.yaml

Registers a ``gc.callbacks`` hook before handing over to Bastion's own CLI, and
writes one line per collection that took over ``--min-ms`` (and every generation-2
collection): the ``time.monotonic()`` at its end — the clock loadgen.py uses, so
pauses can be matched against delivery latencies — the generation, the pause, the
objects it freed and, for generation 2, how many objects the collector tracks.
Nothing in ``src/`` changes.
"""

from __future__ import annotations

import argparse
import gc
import sys
import time
from typing import Any, TextIO


class GcLogger:
    def __init__(self, out: TextIO, min_ms: float) -> None:
        self.out = out
        self.min_s = min_ms / 1000
        self.started = 0.0

    def __call__(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self.started = time.perf_counter()
            return
        pause = time.perf_counter() - self.started
        generation = info["generation"]
        if pause < self.min_s and generation < 2:
            return
        tracked = f" tracked={len(gc.get_objects())}" if generation == 2 else ""
        self.out.write(
            f"{time.monotonic():.3f} gen{generation} {pause * 1000:.1f}ms "
            f"collected={info['collected']}{tracked}\n"
        )
        self.out.flush()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--log", required=True, help="file for the GC lines")
    parser.add_argument("--min-ms", type=float, default=2.0, help="log gen-0/1 pauses over this")
    parser.add_argument(
        "serve_args", nargs=argparse.REMAINDER, help="-- then 'bastion serve' options"
    )
    args = parser.parse_args()
    serve_args = args.serve_args[1:] if args.serve_args[:1] == ["--"] else args.serve_args
    log = open(args.log, "a")  # stays open for the life of the server
    gc.callbacks.append(GcLogger(log, args.min_ms))

    from bastion.cli import main as bastion_main

    sys.argv = ["bastion", "serve", *serve_args]
    bastion_main()


if __name__ == "__main__":
    main()
