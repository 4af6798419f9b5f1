#!/usr/bin/env sh
# Quick start: install Bastion into ./.venv and run it on SQLite with a generated config.
#
# First run: writes ./bastion-config/bastion.yaml and the encryption key
# ./bastion-config/kek.json (kept apart from the data in ./bastion-data), a fresh signing
# key (registration closed), creates the administrator account "admin" and prints its
# password once.
# Later runs: start the server with the existing config.
#
# Environment: BASTION_SERVER_NAME (default: localhost), BASTION_PORT (default: 8008),
#              BASTION_DATA (default: ./bastion-data), BASTION_ETC (default: ./bastion-config),
#              PYTHON (default: python3).
set -eu
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
DATA="${BASTION_DATA:-./bastion-data}"
CONFIG="${BASTION_ETC:-./bastion-config}/bastion.yaml"

if ! "$PYTHON" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else 1)'; then
    echo "Bastion needs Python 3.11 or newer ($PYTHON is $("$PYTHON" --version 2>&1))." >&2
    exit 1
fi
if [ ! -x .venv/bin/python ]; then
    if ! "$PYTHON" -m venv .venv; then
        echo "Creating a virtual environment failed. On Debian/Ubuntu: apt-get install python3-venv" >&2
        exit 1
    fi
fi
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet .

if [ ! -f "$CONFIG" ]; then
    .venv/bin/bastion init --config "$CONFIG" \
        --server-name "${BASTION_SERVER_NAME:-localhost}" \
        --data-dir "$DATA" --port "${BASTION_PORT:-8008}"
    .venv/bin/bastion user add admin --admin --config "$CONFIG" </dev/null
fi
echo "Starting Bastion on http://127.0.0.1:${BASTION_PORT:-8008} (Ctrl-C to stop)."
exec .venv/bin/bastion serve --config "$CONFIG"
