# Helpers shared by run_bastion.sh and run_synapse.sh (sourced, not run).
# shellcheck shell=bash

BENCH_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO_DIR="$(cd "$BENCH_DIR/.." && pwd)"
# The interpreter for loadgen.py / find_max_rate.py (needs aiohttp; uvloop and orjson help).
BENCH_PYTHON="${BENCH_PYTHON:-$REPO_DIR/.venv/bin/python}"
RESULTS_DIR="${RESULTS_DIR:-$BENCH_DIR/results/$(date +%Y%m%d-%H%M%S)}"
# BENCH_NICE=-10 runs the server under test and the load generator at that niceness
# (negative values need root), so other work on a shared machine disturbs them less.
# Both servers get the same treatment. Unset: normal priority.
# BENCH_RT=1 instead runs them under the real-time round-robin policy (chrt -r 1,
# root only): they then preempt every normal process at once, which is what keeps
# wake-up latency honest on a machine busy with other work. The kernel's RT
# throttling still leaves other processes at least 5% of each core, and the server
# (one event loop) and the load generator together use well under two cores.
# The load generator gets the higher RT priority, so its timestamps stay accurate
# while the server saturates.
PRIO_SERVER=()
PRIO_CLIENT=()
if [ -n "${BENCH_RT:-}" ]; then
    PRIO_SERVER=(chrt -r 1)
    PRIO_CLIENT=(chrt -r 2)
elif [ -n "${BENCH_NICE:-}" ]; then
    PRIO_SERVER=(nice -n "$BENCH_NICE")
    PRIO_CLIENT=(nice -n "$BENCH_NICE")
fi

bench_log() { printf '[%s %s] %s\n' "$(basename "$0")" "$(date +%H:%M:%S)" "$*" >&2; }

check_bench_python() {
    if ! "$BENCH_PYTHON" -c 'import aiohttp' 2>/dev/null; then
        bench_log "$BENCH_PYTHON cannot import aiohttp: run '$REPO_DIR/.venv/bin/pip install -e \"$REPO_DIR[bench]\"'"
        exit 1
    fi
}

free_port() {
    "$BENCH_PYTHON" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

random_secret() {
    "$BENCH_PYTHON" -c 'import secrets; print(secrets.token_hex(24))'
}

# wait_healthy URL PID LOGFILE: poll URL until it answers 200; fail if PID exits or 60 s pass.
wait_healthy() {
    local url="$1" pid="$2" logfile="$3" i
    for i in $(seq 1 600); do
        if ! kill -0 "$pid" 2>/dev/null; then
            bench_log "server exited during start-up; last log lines:"
            tail -n 40 "$logfile" >&2
            return 1
        fi
        if "$BENCH_PYTHON" - "$url" <<'EOF' 2>/dev/null; then
import sys, urllib.request
sys.exit(0 if urllib.request.urlopen(sys.argv[1], timeout=1).status == 200 else 1)
EOF
            return 0
        fi
        sleep 0.1
    done
    bench_log "server did not answer $url within 60 s; last log lines:"
    tail -n 40 "$logfile" >&2
    return 1
}

# stop_server PID: SIGTERM, then SIGKILL after 20 s.
stop_server() {
    local pid="$1" i
    kill -TERM "$pid" 2>/dev/null || return 0
    for i in $(seq 1 200); do
        kill -0 "$pid" 2>/dev/null || return 0
        sleep 0.1
    done
    bench_log "server $pid ignored SIGTERM for 20 s; killing it"
    kill -KILL "$pid" 2>/dev/null || true
}
