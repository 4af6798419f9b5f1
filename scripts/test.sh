#!/usr/bin/env bash
# Install everything the tests need and run the whole suite.
#
#   ./scripts/test.sh                  # SQLite
#   BASTION_TEST_DATABASE=postgresql://user:pass@host/postgres ./scripts/test.sh
#
# The PostgreSQL role must be allowed to create databases: every test server gets a
# fresh database. Extra arguments are passed to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"

if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv || { echo "On Debian/Ubuntu: apt-get install python3-venv" >&2; exit 1; }
fi
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet -e '.[test]'

if ! command -v node >/dev/null || ! node -e 'process.exit(parseInt(process.versions.node) >= 20 ? 0 : 1)'; then
    echo "The matrix-js-sdk tests need Node.js 20 or newer on PATH." >&2
    exit 1
fi
if [ -f tests/js/package-lock.json ]; then
    (cd tests/js && npm ci --no-audit --no-fund --loglevel=error)
fi

.venv/bin/ruff check src tests bench
.venv/bin/mypy src/bastion
exec .venv/bin/python -m pytest -p no:cacheprovider "$@"
