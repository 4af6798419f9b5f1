"""Operating the server: durability across SIGKILL, graceful SIGTERM, config errors, init."""

from __future__ import annotations

import contextlib
import subprocess
import sys
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import yaml

from tests.harness import MatrixHttp, ServerProcess, cluster_workers, free_port, metric_total


def test_acknowledged_events_survive_sigkill_and_txn_ids_persist(make_server) -> None:
    srv: ServerProcess = make_server()
    alice = srv.client().register()
    room = alice.create_room()
    acked: dict[str, str] = {}
    stop = threading.Event()

    def sender(worker: int) -> None:
        client = MatrixHttp(srv.base_url, srv.server_name, alice.token)
        n = 0
        while not stop.is_set():
            txn = f"w{worker}-{n}"
            try:
                resp = client.raw("PUT", f"/_matrix/client/v3/rooms/{room}/send/m.room.message/{txn}",
                                  json={"msgtype": "m.text", "body": txn})
            except Exception:
                return  # the server died mid-request: that send was not acknowledged
            if resp.status_code == 200:
                acked[txn] = resp.json()["event_id"]
            n += 1

    with ThreadPoolExecutor(4) as pool:
        for w in range(4):
            pool.submit(sender, w)
        time.sleep(1.5)
        srv.kill()  # SIGKILL: no shutdown handler runs
        stop.set()
    assert len(acked) > 20
    srv.start()
    seen: dict[str, str] = {}
    token = None
    while True:
        params = {"dir": "b", "limit": 500}
        if token:
            params["from"] = token
        page = alice.call("GET", f"/_matrix/client/v3/rooms/{room}/messages", params=params)
        for event in page["chunk"]:
            if event["type"] == "m.room.message":
                seen[event["content"]["body"]] = event["event_id"]
        token = page.get("end")
        if token is None:
            break
    missing = set(acked) - set(seen)
    assert not missing, f"{len(missing)} acknowledged events lost"
    assert all(seen[txn] == event_id for txn, event_id in acked.items())
    # A retried transaction returns the original event ID, even after the restart.
    txn, event_id = next(iter(acked.items()))
    again = alice.call("PUT", f"/_matrix/client/v3/rooms/{room}/send/m.room.message/{txn}", {"msgtype": "m.text", "body": txn})
    assert again["event_id"] == event_id


def test_sigterm_is_graceful_and_releases_long_polls(make_server) -> None:
    srv: ServerProcess = make_server()
    alice = srv.client().register()
    room = alice.create_room()
    since = alice.sync()["next_batch"]
    results: dict[str, object] = {}

    def long_poll() -> None:
        try:
            resp = alice.raw("GET", "/_matrix/client/v3/sync", params={"since": since, "timeout": 60000})
            results["status"] = resp.status_code
        except Exception as exc:  # pragma: no cover - reported by the assertion below
            results["error"] = repr(exc)

    poller = threading.Thread(target=long_poll)
    poller.start()
    time.sleep(0.5)
    event_id = alice.send(room, "last words")
    started = time.monotonic()
    code = srv.stop()
    elapsed = time.monotonic() - started
    poller.join(10)
    assert code == 0, srv.log()
    assert elapsed < 8, "shutdown waited for the long-poll instead of releasing it"
    assert results.get("status") == 200, results
    srv.start()
    assert alice.call("GET", f"/_matrix/client/v3/rooms/{room}/event/{event_id}")["content"]["body"] == "last words"


def _init(tmp_path: Path, *extra: str) -> Path:
    config = tmp_path / "bastion.yaml"
    subprocess.run(
        [sys.executable, "-m", "bastion", "init", "--config", str(config), "--server-name", "example.org",
         "--data-dir", str(tmp_path / "data"), *extra],
        check=True, capture_output=True,
    )
    return config


def test_init_writes_secure_defaults(tmp_path: Path) -> None:
    config = _init(tmp_path)
    assert oct(config.stat().st_mode & 0o777) == "0o600"
    assert oct((tmp_path / "data" / "signing.key").stat().st_mode & 0o777) == "0o600"
    data = yaml.safe_load(config.read_text())
    assert data["registration"]["enabled"] is False
    assert data["listen"]["host"] == "127.0.0.1"
    assert "shared_secret" not in data["registration"]
    again = subprocess.run([sys.executable, "-m", "bastion", "init", "--config", str(config), "--server-name", "x",
                            "--data-dir", str(tmp_path / "data")], capture_output=True, text=True)
    assert again.returncode != 0 and "already exists" in again.stderr
    other = tmp_path / "other"
    other.mkdir()
    second = _init(other)
    assert (other / "data" / "signing.key").read_text() != (tmp_path / "data" / "signing.key").read_text()
    del second


def test_bad_config_names_the_key(tmp_path: Path) -> None:
    config = _init(tmp_path)
    data = yaml.safe_load(config.read_text())
    cases = [
        ({"database": {"url": data["database"]["url"], "pool_size": 0}}, "database.pool_size"),
        ({"listen": {"port": 70000}}, "listen.port"),
        ({"registraton": {"enabled": True}}, "registraton"),
        ({"server_name": "bad name!"}, "server_name"),
        ({"default_room_version": "9"}, "default_room_version"),
        ({"signing_key_path": str(tmp_path / "missing.key")}, "signing_key_path"),
    ]
    for override, key in cases:
        broken = {**data, **override}
        config.write_text(yaml.safe_dump(broken))
        result = subprocess.run([sys.executable, "-m", "bastion", "serve", "--config", str(config)],
                                capture_output=True, text=True, timeout=60)
        assert result.returncode != 0
        assert f"'{key}'" in result.stderr, (key, result.stderr)


def test_health_and_discovery(server: ServerProcess) -> None:
    anon = server.client()
    assert anon.call("GET", "/health", token=False) == {"status": "ok"}
    versions = anon.call("GET", "/_matrix/client/versions", token=False)
    assert "v1.16" in versions["versions"]
    well_known = anon.call("GET", "/.well-known/matrix/client", token=False)
    assert well_known["m.homeserver"]["base_url"] == server.base_url
    user = server.client().register()
    caps = user.call("GET", "/_matrix/client/v3/capabilities")["capabilities"]
    assert caps["m.room_versions"]["available"] == {"10": "stable", "11": "stable"}
    assert caps["m.change_password"]["enabled"] is True


def test_server_restart_keeps_sync_tokens_valid(make_server) -> None:
    srv: ServerProcess = make_server()
    alice = srv.client().register()
    room = alice.create_room()
    alice.send(room, "before restart")
    since = alice.sync()["next_batch"]
    srv.restart()
    alice.send(room, "after restart " + uuid.uuid4().hex)
    sync = alice.sync(since=since)
    bodies = [e["content"]["body"] for e in sync["rooms"]["join"][room]["timeline"]["events"]]
    assert len(bodies) == 1 and bodies[0].startswith("after restart")


def test_long_poll_after_a_restart_answers_at_once_with_what_it_missed(make_server) -> None:
    """A long-poll need not compute before waiting when nothing was notified for the
    user since its token — but a restarted server saw no notifications from before it
    started, so a token from before the restart must get its news at once, not after
    the long-poll's timeout. (Presence off: going online would notify alice herself.)"""
    srv: ServerProcess = make_server(presence={"enabled": False})
    alice = srv.client().register()
    room = alice.create_room()
    since = alice.sync()["next_batch"]
    alice.send(room, "missed while away")
    srv.restart()
    started = time.monotonic()
    sync = alice.sync(since=since, timeout=30_000)
    assert time.monotonic() - started < 15, "the long-poll waited although it had news"
    bodies = [e["content"]["body"] for e in sync["rooms"]["join"][room]["timeline"]["events"]]
    assert bodies == ["missed while away"]
    # And with nothing new, a long-poll does wait, then wakes for the next message.
    since = sync["next_batch"]
    woke: dict[str, Any] = {}
    poll = threading.Thread(target=lambda: woke.update(alice.sync(since=since, timeout=30_000)))
    poll.start()
    time.sleep(0.5)
    assert poll.is_alive()
    alice.send(room, "wake up")
    poll.join(15)
    assert not poll.is_alive()
    bodies = [e["content"]["body"] for e in woke["rooms"]["join"][room]["timeline"]["events"]]
    assert bodies == ["wake up"]


def test_readiness_and_metrics_on_their_own_listener(make_server) -> None:
    metrics_port = free_port(count=cluster_workers())  # worker i: metrics_port + i
    srv: ServerProcess = make_server(metrics={"enabled": True, "listen": {"host": "127.0.0.1", "port": metrics_port}})
    ready = httpx.get(srv.base_url + "/ready")
    assert ready.status_code == 200 and ready.json()["database"] == "ok"
    alice = srv.client().register()
    room = alice.create_room()
    alice.send(room, "counted")
    # Through a load balancer the send may have landed on any worker; worker i serves
    # its metrics on metrics.listen.port + i.
    workers = len(getattr(srv, "worker_ports", [None]))
    text = "".join(httpx.get(f"http://127.0.0.1:{metrics_port + i}/metrics").text for i in range(workers))
    # Labelled by route template, never by raw path (no room IDs or tokens in labels).
    assert any(line.startswith("bastion_http_requests_total{") and 'status="200"' in line
               and "/send/{eventType}/{txnId}" in line and 'method="PUT"' in line
               for line in text.splitlines()), text[:2000]
    assert "bastion_event_persist_seconds_count" in text and "bastion_sync_waiting" in text
    assert room not in text
    # Not on the public listener.
    assert httpx.get(srv.base_url + "/metrics").status_code == 404


def test_long_poll_is_abandoned_when_the_client_hangs_up(make_server) -> None:
    """A client that drops its /sync long-poll (a phone changing networks) frees it at
    once, instead of leaving it waiting out its timeout."""
    metrics_port = free_port(count=cluster_workers())  # worker i: metrics_port + i
    srv: ServerProcess = make_server(metrics={"enabled": True, "listen": {"host": "127.0.0.1", "port": metrics_port}})
    alice = srv.client().register()
    since = alice.sync()["next_batch"]
    workers = len(getattr(srv, "worker_ports", [None]))

    def waiting() -> float:
        return metric_total(metrics_port, "bastion_sync_waiting", workers)

    def poll_and_hang_up() -> None:
        with contextlib.suppress(httpx.ReadTimeout):
            httpx.get(srv.base_url + "/_matrix/client/v3/sync",
                      params={"since": since, "timeout": "120000"},
                      headers={"Authorization": f"Bearer {alice.token}"},
                      timeout=httpx.Timeout(10, read=3))

    thread = threading.Thread(target=poll_and_hang_up)
    thread.start()
    deadline = time.monotonic() + 2.5
    while waiting() < 1 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert waiting() == 1, "the long-poll never started waiting"
    thread.join(10)  # the client gives up after 3 s and closes its connection
    deadline = time.monotonic() + 3
    while waiting() > 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert waiting() == 0, "the server kept waiting for a client that had hung up"
