"""matrix-js-sdk against a running Bastion: ``node --test`` in tests/js.

Each ``tests/js/*.test.mjs`` file runs against a fresh server (``make_server``, so
SQLite or PostgreSQL per ``BASTION_TEST_DATABASE``) with accounts registered here
and handed over in environment variables. The JS tests drive the real SDK: password
login, ``startClient`` (a real /sync loop), rooms, messages, local echo,
back-pagination, state and power levels, logout; and the everyday messaging features
(receipts, typing, presence, profiles, account data, relations and threads, search,
push rules, the room and user directories, devices, deactivation, room upgrades).
A server administrator, created with ``bastion user add --admin``, is passed too (for
publishing rooms to the directory).

Node.js >= 20 is needed; dependencies are installed with ``npm ci`` from the
committed lockfile when ``tests/js/node_modules`` is missing or stale. The tests skip
only when ``node`` itself is not installed.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import uuid

import pytest

from tests.harness import REPO, ServerProcess

JS_DIR = REPO / "tests" / "js"
NODE_TIMEOUT = 300  # seconds for one `node --test` run; each JS test has its own, shorter bounds
EXTRA_USERS = 5
ADMIN_PASSWORD = "js-sdk admin password"

JS_TEST_FILES = sorted(p.name for p in JS_DIR.glob("*.test.mjs"))


def _node_or_skip() -> str:
    node = shutil.which("node")
    if node is None:
        pytest.skip("node is not installed; the matrix-js-sdk tests need Node.js >= 20 (CI has it)")
    return node


def _wanted_sdk_version() -> str:
    lock = json.loads((JS_DIR / "package-lock.json").read_text())
    return lock["packages"]["node_modules/matrix-js-sdk"]["version"]


def _installed_sdk_version() -> str | None:
    pkg = JS_DIR / "node_modules" / "matrix-js-sdk" / "package.json"
    try:
        return json.loads(pkg.read_text())["version"]
    except (OSError, ValueError, KeyError):
        return None


@pytest.fixture(scope="session")
def js_sdk() -> str:
    """Path to node, with tests/js dependencies installed (npm ci, once per session)."""
    node = _node_or_skip()
    version = subprocess.run(
        [node, "--version"], capture_output=True, text=True, timeout=30
    ).stdout.strip()
    match = re.match(r"v(\d+)\.", version)
    if match is None or int(match.group(1)) < 20:
        pytest.fail(
            f"node {version} is too old: matrix-js-sdk 36 needs Node.js >= 20", pytrace=False
        )
    if _installed_sdk_version() != _wanted_sdk_version():
        npm = shutil.which("npm")
        if npm is None:
            pytest.fail(
                "node is installed but npm is not: cannot install tests/js dependencies",
                pytrace=False,
            )
        proc = subprocess.run(
            [npm, "ci", "--no-audit", "--no-fund"],
            cwd=JS_DIR,
            capture_output=True,
            text=True,
            timeout=600,
        )
        if proc.returncode != 0:
            pytest.fail(
                f"npm ci failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}", pytrace=False
            )
        assert _installed_sdk_version() == _wanted_sdk_version()
    return node


def _admin_account(srv: ServerProcess) -> str:
    """A server administrator, made the way operators make one (``bastion user add --admin``)."""
    name = "jsadmin" + uuid.uuid4().hex[:8]
    added = srv.cli("user", "add", name, "--admin", "--password-file", "-", input=ADMIN_PASSWORD + "\n")
    assert added.returncode == 0, f"bastion user add --admin failed:\n{added.stdout}\n{added.stderr}"
    return f"@{name}:{srv.server_name}"


def _accounts_env(srv: ServerProcess) -> dict[str, str]:
    """Register the accounts the JS tests log into, as environment variables."""
    admin_id = _admin_account(srv)
    hs = srv.client()
    alice = hs.new_user()
    bob = hs.new_user()
    extras = [hs.new_user() for _ in range(EXTRA_USERS)]
    for client in (hs, alice, bob, *extras):
        client.close()
    return {
        "BASTION_HS_URL": srv.base_url,
        "BASTION_USER1_ID": alice.user_id or "",
        "BASTION_USER1_PASSWORD": alice.password or "",
        "BASTION_USER2_ID": bob.user_id or "",
        "BASTION_USER2_PASSWORD": bob.password or "",
        "BASTION_EXTRA_USERS": json.dumps(
            [{"userId": u.user_id, "password": u.password} for u in extras]
        ),
        # Only the tests that publish rooms to the directory need a server admin.
        "BASTION_ADMIN_ID": admin_id,
        "BASTION_ADMIN_PASSWORD": ADMIN_PASSWORD,
    }


def _run_node(
    node: str, srv: ServerProcess, test_file: str, reporter: str = "spec"
) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, **_accounts_env(srv), "NO_COLOR": "1"}
    env.pop("NODE_OPTIONS", None)
    try:
        return subprocess.run(
            [
                node,
                "--test",
                "--test-concurrency=1",
                "--test-force-exit",  # the SDK leaves request-timeout timers behind after stopClient()
                f"--test-reporter={reporter}",
                test_file,
            ],
            cwd=JS_DIR,
            env=env,
            capture_output=True,
            text=True,
            timeout=NODE_TIMEOUT,
        )
    except subprocess.TimeoutExpired as exc:
        out = (
            exc.stdout.decode(errors="replace")
            if isinstance(exc.stdout, bytes)
            else (exc.stdout or "")
        )
        pytest.fail(
            f"node --test {test_file} did not finish within {NODE_TIMEOUT}s\n--- node output ---\n{out}"
            f"\n--- server log (tail) ---\n{srv.log()}",
            pytrace=False,
        )


def _report(proc: subprocess.CompletedProcess[str], srv: ServerProcess) -> str:
    return (
        f"--- node stdout ---\n{proc.stdout}\n--- node stderr ---\n{proc.stderr}\n"
        f"--- server log (tail) ---\n{srv.log()}"
    )


@pytest.mark.parametrize("test_file", JS_TEST_FILES)
def test_js_sdk(test_file: str, js_sdk: str, make_server) -> None:
    srv = make_server()
    proc = _run_node(js_sdk, srv, test_file)
    if proc.returncode != 0:
        pytest.fail(
            f"node --test {test_file} exited with {proc.returncode}\n{_report(proc, srv)}",
            pytrace=False,
        )
    # A run that executed nothing is not a pass.
    passed = re.search(r"^\S*\s*pass (\d+)\s*$", proc.stdout, re.MULTILINE)
    assert passed and int(passed.group(1)) > 0, f"no JS test passed\n{_report(proc, srv)}"


def test_js_test_files_exist() -> None:
    # An empty parametrization would only show up as a skip.
    assert JS_TEST_FILES, f"no *.test.mjs files in {JS_DIR}"
