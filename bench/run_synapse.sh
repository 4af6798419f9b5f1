#!/usr/bin/env bash
# Start Synapse (from PyPI, in its own virtualenv bench/.venv-synapse) on SQLite in a
# fresh temporary directory, run find_max_rate.py against it, and stop it. Extra
# arguments go to find_max_rate.py.
#
#   bench/run_synapse.sh [find_max_rate options...]
#
# Environment: SYNAPSE_SPEC (pip requirement; default matrix-synapse==1.163.2),
# SYNAPSE_VENV (default bench/.venv-synapse), PYTHON (interpreter that creates that
# venv; default python3), BENCH_PYTHON, RESULTS_DIR, KEEP_WORKDIR=1, BENCH_PRESENCE,
# BENCH_RT, BENCH_NICE as in run_bastion.sh.
set -euo pipefail
# shellcheck source=bench/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
check_bench_python

SYNAPSE_SPEC="${SYNAPSE_SPEC:-matrix-synapse==1.163.2}"
SYNAPSE_VENV="${SYNAPSE_VENV:-$BENCH_DIR/.venv-synapse}"
SYN_PY="$SYNAPSE_VENV/bin/python"

if ! "$SYN_PY" -c 'import synapse' 2>/dev/null || ! "$SYNAPSE_VENV/bin/pip" show -q matrix-synapse >/dev/null 2>&1; then
    bench_log "installing $SYNAPSE_SPEC into $SYNAPSE_VENV"
    "${PYTHON:-python3}" -m venv "$SYNAPSE_VENV"
    "$SYNAPSE_VENV/bin/pip" install -q --upgrade pip
fi
# A no-op when the requirement is already met; upgrades or downgrades to SYNAPSE_SPEC otherwise.
mkdir -p "$RESULTS_DIR"
if ! "$SYNAPSE_VENV/bin/pip" install -q "$SYNAPSE_SPEC" >"$RESULTS_DIR/synapse-pip.log" 2>&1; then
    cat "$RESULTS_DIR/synapse-pip.log" >&2
    exit 1
fi
VERSION="$("$SYN_PY" -c 'import synapse; print(synapse.__version__.split()[0])')"

WORK="$(mktemp -d "${TMPDIR:-/tmp}/synapse-bench.XXXXXX")"
PORT="$(free_port)"
SECRET="$(random_secret)"
SERVER_PID=""

cleanup() {
    if [ -n "$SERVER_PID" ]; then
        stop_server "$SERVER_PID"
        cp "$WORK/homeserver.log" "$RESULTS_DIR/synapse-server.log" 2>/dev/null || true
    fi
    if [ -z "${KEEP_WORKDIR:-}" ]; then rm -rf "$WORK"; else bench_log "kept $WORK"; fi
}
trap cleanup EXIT

(cd "$WORK" && "$SYN_PY" -m synapse.app.homeserver --server-name localhost \
    --config-path "$WORK/homeserver.yaml" --data-directory "$WORK/data" \
    --generate-config --report-stats=no >/dev/null)
"$SYN_PY" "$BENCH_DIR/synapse_config.py" "$WORK/homeserver.yaml" --port "$PORT" --shared-secret "$SECRET" \
    --presence "${BENCH_PRESENCE:-off}"

"${PRIO_SERVER[@]}" "$SYN_PY" -m synapse.app.homeserver --config-path "$WORK/homeserver.yaml" >"$WORK/stdout.log" 2>&1 &
SERVER_PID=$!
wait_healthy "http://127.0.0.1:$PORT/_matrix/client/versions" "$SERVER_PID" "$WORK/stdout.log"
bench_log "Synapse $VERSION (pid $SERVER_PID) on port $PORT, SQLite in $WORK"

"${PRIO_CLIENT[@]}" "$BENCH_PYTHON" "$BENCH_DIR/find_max_rate.py" \
    --label "synapse $VERSION (SQLite)" \
    --base-url "http://127.0.0.1:$PORT" \
    --shared-secret "$SECRET" \
    --server-pid "$SERVER_PID" \
    --work-dir "$RESULTS_DIR/synapse" \
    --json-out "$RESULTS_DIR/synapse.json" \
    "$@"
