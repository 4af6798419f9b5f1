#!/usr/bin/env bash
# Bastion against Synapse, same scenario, same machine, one invocation: runs
# run_bastion.sh, then run_synapse.sh, then prints the side-by-side table and ratio.
# Arguments go to find_max_rate.py for both servers.
#
#   bench/compare.sh [find_max_rate options...]
#
# Reports land in $RESULTS_DIR (default bench/results/<timestamp>/): bastion.json,
# synapse.json (each with every step and the full report of the best one), the
# per-step loadgen reports, both servers' logs, and summary.md.
set -uo pipefail
# shellcheck source=bench/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
check_bench_python
export RESULTS_DIR BENCH_PYTHON
mkdir -p "$RESULTS_DIR"
bench_log "results in $RESULTS_DIR"

status=0
"$BENCH_DIR/run_bastion.sh" "$@" 2>&1 | tee "$RESULTS_DIR/bastion.log" || status=1
"$BENCH_DIR/run_synapse.sh" "$@" 2>&1 | tee "$RESULTS_DIR/synapse.log" || status=1
echo
"$BENCH_PYTHON" "$BENCH_DIR/compare_report.py" "$RESULTS_DIR" || status=1
exit "$status"
