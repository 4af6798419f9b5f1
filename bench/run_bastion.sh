#!/usr/bin/env bash
# Start Bastion on SQLite in a fresh temporary directory, run find_max_rate.py against
# it, and stop it. Extra arguments go to find_max_rate.py (e.g. --duration 20).
#
#   bench/run_bastion.sh [find_max_rate options...]
#
# Environment: BASTION_PYTHON (interpreter with Bastion installed; default the repo's
# .venv), BENCH_PYTHON (interpreter for the load generator; default the same venv),
# RESULTS_DIR (where reports go; default bench/results/<timestamp>), KEEP_WORKDIR=1
# (keep the server's temporary directory), BASTION_SQLITE_SYNCHRONOUS=full (fsync
# every commit, like Synapse), BENCH_PRESENCE=on, BENCH_RT=1 or BENCH_NICE=-10 (see lib.sh).
set -euo pipefail
# shellcheck source=bench/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
check_bench_python

BASTION_PYTHON="${BASTION_PYTHON:-$REPO_DIR/.venv/bin/python}"
WORK="$(mktemp -d "${TMPDIR:-/tmp}/bastion-bench.XXXXXX")"
PORT="$(free_port)"
SECRET="$(random_secret)"
SERVER_PID=""
mkdir -p "$RESULTS_DIR"

cleanup() {
    if [ -n "$SERVER_PID" ]; then
        stop_server "$SERVER_PID"
        cp "$WORK/server.log" "$RESULTS_DIR/bastion-server.log" 2>/dev/null || true
    fi
    if [ -z "${KEEP_WORKDIR:-}" ]; then rm -rf "$WORK"; else bench_log "kept $WORK"; fi
}
trap cleanup EXIT

# The configuration is what 'bastion init' writes (SQLite in the data dir, default
# limits), plus the registration shared secret the load generator needs.
"$BASTION_PYTHON" -m bastion init --config "$WORK/bastion.yaml" --server-name localhost \
    --data-dir "$WORK/data" --port "$PORT" --registration-shared-secret "$SECRET" >/dev/null
# Presence is off on both servers unless BENCH_PRESENCE=on (see docs/performance.md).
# BASTION_SQLITE_SYNCHRONOUS=full: fsync every commit, as Synapse's SQLite does
# (Bastion's default, normal, syncs the WAL only at checkpoints).
"$BASTION_PYTHON" - "$WORK/bastion.yaml" "${BENCH_PRESENCE:-off}" "${BASTION_SQLITE_SYNCHRONOUS:-}" <<'PY'
import sys, yaml
path, presence, synchronous = sys.argv[1:4]
config = yaml.safe_load(open(path))
config.setdefault("presence", {})["enabled"] = presence == "on"
if synchronous:
    config["database"]["sqlite_synchronous"] = synchronous
open(path, "w").write(yaml.safe_dump(config, sort_keys=False))
PY
"${PRIO_SERVER[@]}" "$BASTION_PYTHON" -m bastion serve --config "$WORK/bastion.yaml" >"$WORK/server.log" 2>&1 &
SERVER_PID=$!
wait_healthy "http://127.0.0.1:$PORT/_matrix/client/versions" "$SERVER_PID" "$WORK/server.log"
VERSION="$("$BASTION_PYTHON" -m bastion --version 2>/dev/null | awk '{print $NF}')"
COMMIT="$(git -C "$REPO_DIR" rev-parse --short HEAD 2>/dev/null || echo unknown)"
if [ -n "$(git -C "$REPO_DIR" status --porcelain -- src 2>/dev/null)" ]; then COMMIT="$COMMIT+dirty"; fi
VERSION="$VERSION@$COMMIT"
if [ -n "${BASTION_SQLITE_SYNCHRONOUS:-}" ]; then VERSION="$VERSION, synchronous=$BASTION_SQLITE_SYNCHRONOUS"; fi
bench_log "Bastion $VERSION (pid $SERVER_PID) on port $PORT, SQLite in $WORK"

"${PRIO_CLIENT[@]}" "$BENCH_PYTHON" "$BENCH_DIR/find_max_rate.py" \
    --label "bastion $VERSION (SQLite)" \
    --base-url "http://127.0.0.1:$PORT" \
    --shared-secret "$SECRET" \
    --server-pid "$SERVER_PID" \
    --work-dir "$RESULTS_DIR/bastion" \
    --json-out "$RESULTS_DIR/bastion.json" \
    "$@"
