#!/usr/bin/env python3
"""Side-by-side summary of one compare.sh run: reads <results>/{bastion,synapse}.json.

Prints a Markdown table (also written to <results>/summary.md) with each server's
highest sustained rate, the latencies and resource use at that rate, and the ratio.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from benchlib import machine_info

TARGET_RATIO = 20.0


def _row(name: str, result: dict[str, Any] | None) -> list[str]:
    if result is None:
        return [name, "not run", *[""] * 9]
    best = result.get("best")
    rate = result.get("max_rate")
    if best is None or rate is None:
        return [result.get("label", name), "none passed", *[""] * 9]
    d, s, srv, cl, m = (
        best["deliveries"],
        best["sends"],
        best["server"],
        best["client"],
        best["machine"],
    )
    sends = s["ok"] or 1
    cpu_ms_per_msg = srv.get("cpu_seconds", 0) * 1000 / sends
    return [
        result["label"],
        f"**{rate:g}**",
        f"{d['latency_ms']['p50']} / {d['latency_ms']['p99']}",
        f"{s['latency_ms']['p50']} / {s['latency_ms']['p99']}",
        f"{srv.get('cpu_cores')}",
        f"{cpu_ms_per_msg:.2f}",
        f"{srv.get('rss_mib')} / {srv.get('peak_rss_mib')}",
        f"{cl['cpu_cores']}",
        f"{m['other_cores']}",
        f"{len(result['steps'])} in {result['search_seconds']:.0f}s",
        f"{d['expected']} / {d['seen']}",
    ]


def render(results_dir: Path) -> str:
    loaded: dict[str, dict[str, Any] | None] = {}
    for name in ("bastion", "synapse"):
        path = results_dir / f"{name}.json"
        loaded[name] = json.loads(path.read_text()) if path.exists() else None
    info = machine_info(load_average=False)
    header = [
        "server",
        "max rate (msg/s)",
        "delivery p50 / p99 (ms)",
        "send p50 / p99 (ms)",
        "server CPU (cores)",
        "server CPU per message (ms)",
        "RSS / peak RSS (MiB)",
        "loadgen CPU (cores)",
        "other load (cores)",
        "search steps",
        "deliveries expected / seen",
    ]
    lines = [
        f"Results in `{results_dir}`; machine: {info['cpu_model']}, {info['cores']} cores, "
        f"{info['memory_gib']} GiB RAM, Linux {info['kernel']}.",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
    ]
    for name, result in loaded.items():
        lines.append("| " + " | ".join(_row(name, result)) + " |")
    bastion, synapse = loaded["bastion"], loaded["synapse"]
    b_rate = bastion.get("max_rate") if bastion else None
    s_rate = synapse.get("max_rate") if synapse else None
    lines.append("")
    if b_rate and s_rate:
        ratio = b_rate / s_rate
        verdict = "meets" if ratio >= TARGET_RATIO else "does NOT meet"
        lines.append(
            f"Ratio Bastion / Synapse: **{ratio:.1f}x** ({verdict} the {TARGET_RATIO:g}x target)."
        )
    else:
        lines.append("Ratio: n/a (a server had no passing rate or was not run).")
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results_dir", type=Path)
    args = parser.parse_args()
    text = render(args.results_dir)
    (args.results_dir / "summary.md").write_text(text)
    (args.results_dir / "machine.json").write_text(json.dumps(machine_info(load_average=False), indent=2) + "\n")
    sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
