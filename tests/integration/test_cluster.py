"""Several workers on one PostgreSQL with Redis and nginx: consistency and faults.

Each test starts its own cluster (three ``bastion serve`` processes, a Redis server and
nginx round-robining every request) and talks to the workers both through nginx and
directly, so that a client deliberately sends through one worker and syncs through
another. Needs PostgreSQL (``BASTION_TEST_DATABASE``), ``redis-server`` and ``nginx``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.harness import ClusterProcess, MatrixHttp, TestDatabase, start_server

pytestmark = pytest.mark.skipif(
    not os.environ.get("BASTION_TEST_DATABASE", "").startswith("postgres")
    or shutil.which("redis-server") is None or shutil.which("nginx") is None,
    reason="needs PostgreSQL (BASTION_TEST_DATABASE), redis-server and nginx",
)


@pytest.fixture
def cluster(tmp_path: Path, test_database: TestDatabase) -> Any:
    started: list[ClusterProcess] = []

    def factory(workers: int = 3, **overrides: Any) -> ClusterProcess:
        srv = start_server(tmp_path / uuid.uuid4().hex[:8], test_database, workers=workers, **overrides)
        assert isinstance(srv, ClusterProcess)
        started.append(srv)
        return srv

    yield factory
    for srv in started:
        srv.stop()


def on_worker(srv: ClusterProcess, index: int, client: MatrixHttp) -> MatrixHttp:
    """The same account and token, talking to one worker directly."""
    direct = MatrixHttp(f"http://127.0.0.1:{srv.worker_ports[index]}", srv.server_name, client.token)
    direct.user_id, direct.device_id = client.user_id, client.device_id
    return direct


def bodies(sync: dict[str, Any], room: str) -> list[tuple[str, str]]:
    events = sync.get("rooms", {}).get("join", {}).get(room, {}).get("timeline", {}).get("events", [])
    return [(e["event_id"], e["content"]["body"]) for e in events if e["type"] == "m.room.message"]


def test_every_client_sees_every_message_once_in_one_order(cluster: Any) -> None:
    """Six users send concurrently through different workers while each syncs through
    yet another worker: everyone sees all messages exactly once, in the same order."""
    srv: ClusterProcess = cluster(workers=3)
    users = [srv.client().register() for _ in range(6)]
    room = users[0].create_room(preset="public_chat")
    for user in users[1:]:
        user.join(room)
    per_user = 25
    expected = {f"{i}-{n}" for i in range(len(users)) for n in range(per_user)}
    seen: dict[int, list[tuple[str, str]]] = {i: [] for i in range(len(users))}
    starts = {i: on_worker(srv, (i + 1) % 3, u).sync()["next_batch"] for i, u in enumerate(users)}
    done = threading.Event()
    errors: list[str] = []

    def syncer(i: int) -> None:
        client = on_worker(srv, (i + 1) % 3, users[i])  # syncs on another worker than it sends on
        token = starts[i]
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            resp = client.sync(since=token, timeout=5000, filter='{"room":{"timeline":{"limit":1000}}}')
            token = resp["next_batch"]
            timeline = resp.get("rooms", {}).get("join", {}).get(room, {}).get("timeline", {})
            if timeline.get("limited"):
                errors.append(f"user {i}: a limited timeline (a gap) in an incremental sync")
            seen[i].extend(bodies(resp, room))
            if {b for _, b in seen[i]} >= expected and done.is_set():
                return

    def sender(i: int) -> None:
        client = on_worker(srv, i % 3, users[i])
        for n in range(per_user):
            client.send(room, f"{i}-{n}", txn=f"t{i}-{n}")

    with ThreadPoolExecutor(len(users) * 2) as pool:
        syncs = [pool.submit(syncer, i) for i in range(len(users))]
        sends = [pool.submit(sender, i) for i in range(len(users))]
        for future in sends:
            future.result()
        done.set()
        for future in syncs:
            future.result()
    assert errors == []
    history = MatrixHttp(srv.base_url, srv.server_name, users[0].token).call(
        "GET", f"/_matrix/client/v3/rooms/{room}/messages", params={"dir": "f", "limit": 1000, "from": starts[0]}
    )
    order = [(e["event_id"], e["content"]["body"]) for e in history["chunk"] if e["type"] == "m.room.message"]
    assert {b for _, b in order} == expected and len(order) == len(expected)
    for i, events in seen.items():
        assert len(events) == len(set(events)), f"user {i} saw a message twice"
        assert events == order, f"user {i} saw another order than /messages gives"
    # Each sender's own messages are in the order it sent them.
    for i in range(len(users)):
        mine = [b for _, b in order if b.startswith(f"{i}-")]
        assert mine == [f"{i}-{n}" for n in range(per_user)]


def test_a_message_sent_on_one_worker_wakes_a_long_poll_on_another(cluster: Any) -> None:
    srv: ClusterProcess = cluster(workers=2)
    alice, bob = srv.client().register(), srv.client().register()
    room = alice.create_room(invite=[bob.user_id])
    bob.join(room)
    bob_b = on_worker(srv, 1, bob)
    since = bob_b.sync()["next_batch"]
    woke: dict[str, Any] = {}

    def poll() -> None:
        resp = bob_b.sync(since=since, timeout=20000)
        woke["at"] = time.monotonic()
        woke["sync"] = resp

    thread = threading.Thread(target=poll)
    thread.start()
    time.sleep(0.5)
    sent = time.monotonic()
    on_worker(srv, 0, alice).send(room, "across workers")
    thread.join(10)
    assert [b for _, b in bodies(woke["sync"], room)] == ["across workers"]
    assert woke["at"] - sent < 0.5, f"woken after {woke['at'] - sent:.3f} s"


def test_typing_receipts_presence_and_to_device_cross_workers(cluster: Any) -> None:
    srv: ClusterProcess = cluster(workers=2)
    alice, bob = srv.client().register(), srv.client().register()
    room = alice.create_room(invite=[bob.user_id])
    bob.join(room)
    a, b = on_worker(srv, 0, alice), on_worker(srv, 1, bob)
    since = b.sync()["next_batch"]
    event_id = a.send(room, "read me")
    a.call("PUT", f"/_matrix/client/v3/rooms/{room}/typing/{alice.user_id}", {"typing": True, "timeout": 10000})
    a.call("POST", f"/_matrix/client/v3/rooms/{room}/receipt/m.read/{event_id}", {})
    a.call("PUT", f"/_matrix/client/v3/presence/{alice.user_id}/status", {"presence": "online", "status_msg": "here"})
    a.call("PUT", "/_matrix/client/v3/sendToDevice/m.test/t1", {"messages": {bob.user_id: {bob.device_id: {"x": 1}}}})
    got: dict[str, Any] = {}
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and len(got) < 4:
        resp = b.sync(since=since, timeout=2000)
        since = resp["next_batch"]
        for e in resp.get("rooms", {}).get("join", {}).get(room, {}).get("ephemeral", {}).get("events", []):
            got[e["type"]] = e["content"]
        for e in resp.get("presence", {}).get("events", []):
            if e["sender"] == alice.user_id and e["content"].get("status_msg") == "here":
                got["presence"] = e["content"]
        for e in resp.get("to_device", {}).get("events", []):
            got["to_device"] = e
    assert got["m.typing"] == {"user_ids": [alice.user_id]}
    assert alice.user_id in got["m.receipt"][event_id]["m.read"]
    assert got["presence"]["presence"] == "online"
    assert got["to_device"] == {"type": "m.test", "sender": alice.user_id, "content": {"x": 1}}
    # A second device's to-device message is delivered exactly once, wherever it syncs.
    assert b.sync(since=since)["to_device"]["events"] == []


def test_state_changes_on_two_workers_are_ordered(cluster: Any) -> None:
    """Concurrent state changes through different workers: each is authorised against
    the current state (the stale worker catches up and rebuilds), none is lost."""
    srv: ClusterProcess = cluster(workers=3)
    alice = srv.client().register()
    room = alice.create_room()
    workers = [on_worker(srv, i, alice) for i in range(3)]

    def set_topic(i: int) -> list[str]:
        return [workers[i % 3].call("PUT", f"/_matrix/client/v3/rooms/{room}/state/m.room.topic/",
                                    {"topic": f"topic {i}-{n}"})["event_id"] for n in range(10)]

    with ThreadPoolExecutor(6) as pool:
        ids = [eid for result in pool.map(set_topic, range(6)) for eid in result]
    assert len(set(ids)) == 60
    messages = alice.call("GET", f"/_matrix/client/v3/rooms/{room}/messages", params={"dir": "b", "limit": 200})
    topics = [e for e in messages["chunk"] if e["type"] == "m.room.topic"]
    assert len(topics) == 60
    # The room's DAG stays a line: each event's prev_events is the previous event.
    current = alice.call("GET", f"/_matrix/client/v3/rooms/{room}/state/m.room.topic/")
    assert current["topic"] == topics[0]["content"]["topic"]


def test_killing_a_worker_loses_nothing_acknowledged(cluster: Any) -> None:
    srv: ClusterProcess = cluster(workers=3)
    alice = srv.client().register()
    room = alice.create_room()
    acked: dict[str, str] = {}
    stop = threading.Event()
    failures: list[int] = []

    def sender(worker: int) -> None:
        client = MatrixHttp(srv.base_url, srv.server_name, alice.token)
        n = 0
        while not stop.is_set():
            txn = f"w{worker}-{n}"
            for _attempt in range(20):  # a client retries the same transaction until it is answered
                try:
                    resp = client.raw("PUT", f"/_matrix/client/v3/rooms/{room}/send/m.room.message/{txn}",
                                      json={"msgtype": "m.text", "body": txn})
                except httpx.HTTPError:
                    time.sleep(0.1)
                    continue
                if resp.status_code == 200:
                    acked[txn] = resp.json()["event_id"]
                    break
                failures.append(resp.status_code)
                time.sleep(0.1)
            n += 1

    with ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(sender, w) for w in range(4)]
        time.sleep(1.5)
        srv.kill_worker(1)  # SIGKILL, mid-load
        time.sleep(1.5)
        srv.start_worker(1)
        time.sleep(1.0)
        stop.set()
        for future in futures:
            future.result()
    assert len(acked) > 20
    seen: dict[str, str] = {}
    token = None
    while True:
        params: dict[str, Any] = {"dir": "b", "limit": 500}
        if token:
            params["from"] = token
        page = alice.call("GET", f"/_matrix/client/v3/rooms/{room}/messages", params=params)
        for event in page["chunk"]:
            if event["type"] == "m.room.message":
                assert event["content"]["body"] not in seen, "a retried send was stored twice"
                seen[event["content"]["body"]] = event["event_id"]
        token = page.get("end")
        if token is None:
            break
    assert {txn: seen.get(txn) for txn in acked} == acked


def test_redis_restart_slows_wakeups_but_loses_nothing(cluster: Any) -> None:
    srv: ClusterProcess = cluster(workers=2)
    alice, bob = srv.client().register(), srv.client().register()
    room = alice.create_room(invite=[bob.user_id])
    bob.join(room)
    a, b = on_worker(srv, 0, alice), on_worker(srv, 1, bob)
    since = b.sync()["next_batch"]
    sent: list[str] = []
    received: list[str] = []
    for phase in ("before", "without redis", "after"):
        if phase == "without redis":
            srv.stop_redis()
        if phase == "after":
            srv.start_redis()
            deadline = time.monotonic() + 15
            while time.monotonic() < deadline:
                ready = [httpx.get(f"http://127.0.0.1:{p}/ready").json() for p in srv.worker_ports]
                if all(r["bus"] == "connected" for r in ready):
                    break
                time.sleep(0.2)
            assert all(r["bus"] == "connected" for r in ready), ready
        for n in range(5):
            body = f"{phase} {n}"
            a.send(room, body)
            sent.append(body)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and len(received) < len(sent):
            resp = b.sync(since=since, timeout=3000)
            since = resp["next_batch"]
            received.extend(body for _, body in bodies(resp, room))
        assert received == sent, f"{phase}: {received} != {sent}"
        if phase == "without redis":
            ready = httpx.get(f"http://127.0.0.1:{srv.worker_ports[1]}/ready").json()
            assert ready["status"] == "ok" and ready["bus"].startswith("disconnected")


def test_revoked_tokens_fail_at_once_on_every_worker_without_the_bus(cluster: Any) -> None:
    """Workers cache access tokens; a logout, a logout/all or a deactivation on one
    worker still makes the token fail on the very next request to every other — with
    Redis stopped, so it is the database (the cache-invalidation stream read before
    each request), not the bus, that carries it."""
    srv: ClusterProcess = cluster(workers=3)
    alice, bob, carol = srv.client().register(), srv.client().register(), srv.client().register()
    bob_second = MatrixHttp(srv.base_url, srv.server_name)
    bob_second.token = bob.call("POST", "/_matrix/client/v3/login", {
        "type": "m.login.password", "identifier": {"type": "m.id.user", "user": bob.user_id},
        "password": bob.password,
    }, token=False)["access_token"]
    clients = (alice, bob, bob_second, carol)
    for index in range(3):  # every worker has every token cached
        for client in clients:
            assert on_worker(srv, index, client).call("GET", "/_matrix/client/v3/account/whoami")
    srv.stop_redis()

    def status_on_every_worker(client: MatrixHttp) -> list[int]:
        return [on_worker(srv, i, client).raw("GET", "/_matrix/client/v3/account/whoami").status_code for i in range(3)]

    on_worker(srv, 0, alice).call("POST", "/_matrix/client/v3/logout", {})
    assert status_on_every_worker(alice) == [401, 401, 401]
    on_worker(srv, 1, bob).call("POST", "/_matrix/client/v3/logout/all", {})
    assert status_on_every_worker(bob) == [401, 401, 401]
    assert status_on_every_worker(bob_second) == [401, 401, 401]
    deactivate = {"auth": {"type": "m.login.password", "password": carol.password,
                           "identifier": {"type": "m.id.user", "user": carol.user_id}}}
    on_worker(srv, 2, carol).call("POST", "/_matrix/client/v3/account/deactivate", deactivate)
    assert status_on_every_worker(carol) == [401, 401, 401]
    resp = on_worker(srv, 1, carol).raw("GET", "/_matrix/client/v3/sync")
    assert resp.status_code == 401 and resp.json()["errcode"] == "M_UNKNOWN_TOKEN"


def test_one_time_key_counts_follow_claims_made_on_other_workers(cluster: Any) -> None:
    """/sync's one-time key counts are cached per device; a claim through another worker
    (Redis stopped) shows in the owner's next sync on any worker."""
    srv: ClusterProcess = cluster(workers=3)
    alice, bob = srv.client().register(), srv.client().register()
    keys = {f"curve25519:K{n}": f"key{n}" for n in range(5)}
    on_worker(srv, 0, alice).call("POST", "/_matrix/client/v3/keys/upload", {"one_time_keys": keys})

    def counts(index: int) -> int:
        return on_worker(srv, index, alice).sync()["device_one_time_keys_count"]["curve25519"]

    assert [counts(i) for i in range(3)] == [5, 5, 5]  # now cached on every worker
    srv.stop_redis()
    claim = {"one_time_keys": {alice.user_id: {alice.device_id: "curve25519"}}}
    for n, worker in enumerate((1, 2, 0)):
        claimed = on_worker(srv, worker, bob).call("POST", "/_matrix/client/v3/keys/claim", claim)
        assert claimed["one_time_keys"][alice.user_id][alice.device_id]
        assert [counts(i) for i in range(3)] == [4 - n] * 3


def test_a_long_poll_woken_after_a_claim_elsewhere_reports_the_new_count(cluster: Any) -> None:
    """The olm handshake: Alice claims one of Bob's one-time keys through one worker, then
    sends him a to-device message through it. Bob's long-poll on another worker is woken
    by the message, and that answer must already count the claim — a client that sees the
    old count does not replace the key it lost until some later answer."""
    srv: ClusterProcess = cluster(workers=2)
    alice, bob = srv.client().register(), srv.client().register()
    keys = {f"curve25519:K{n}": f"key{n}" for n in range(5)}
    bob_0, bob_1, alice_0 = on_worker(srv, 0, bob), on_worker(srv, 1, bob), on_worker(srv, 0, alice)
    bob_0.call("POST", "/_matrix/client/v3/keys/upload", {"one_time_keys": keys})
    for attempt in range(3):
        first = bob_1.sync()  # the count is now cached on worker 1
        assert first["device_one_time_keys_count"]["curve25519"] == 5 - attempt
        woke: dict[str, Any] = {}

        def poll(since: str = first["next_batch"], woke: dict[str, Any] = woke) -> None:
            try:
                woke["sync"] = bob_1.sync(since=since, timeout=20000)
            except Exception as exc:  # reported below, not lost in the thread
                woke["error"] = exc

        thread = threading.Thread(target=poll)
        thread.start()
        time.sleep(0.5)
        claim = {"one_time_keys": {bob.user_id: {bob.device_id: "curve25519"}}}
        assert alice_0.call("POST", "/_matrix/client/v3/keys/claim", claim)["one_time_keys"][bob.user_id]
        alice_0.call(
            "PUT", f"/_matrix/client/v3/sendToDevice/m.room.encrypted/t{attempt}",
            {"messages": {bob.user_id: {bob.device_id: {"n": attempt}}}},
        )
        thread.join(10)
        assert not thread.is_alive(), "the long-poll was not woken by the to-device message"
        assert "error" not in woke, woke.get("error")
        answer = woke["sync"]
        assert [e["content"] for e in answer["to_device"]["events"]] == [{"n": attempt}]
        assert answer["device_one_time_keys_count"]["curve25519"] == 4 - attempt


@pytest.mark.skipif(not os.environ.get("BASTION_TEST_PG_RESTART"), reason="set BASTION_TEST_PG_RESTART to a command that restarts PostgreSQL")
def test_postgres_restart_fails_clearly_then_recovers(cluster: Any) -> None:
    srv: ClusterProcess = cluster(workers=2)
    alice = srv.client().register()
    room = alice.create_room()
    alice.send(room, "before")
    stop_cmd, start_cmd = os.environ["BASTION_TEST_PG_RESTART"].split(";;")
    subprocess.run(stop_cmd, shell=True, check=True)
    try:
        resp = alice.raw("PUT", f"/_matrix/client/v3/rooms/{room}/send/m.room.message/down1",
                         json={"msgtype": "m.text", "body": "while down"})
        assert resp.status_code in (500, 502, 503), resp.text
        if resp.headers.get("content-type", "").startswith("application/json"):
            assert resp.json()["errcode"] == "M_UNKNOWN"
        ready = httpx.get(f"http://127.0.0.1:{srv.worker_ports[0]}/ready")
        assert ready.status_code == 503
    finally:
        subprocess.run(start_cmd, shell=True, check=True)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        resp = alice.raw("PUT", f"/_matrix/client/v3/rooms/{room}/send/m.room.message/down1",
                         json={"msgtype": "m.text", "body": "while down"})
        if resp.status_code == 200:
            break
        time.sleep(0.5)
    assert resp.status_code == 200, resp.text
    bodies_now = [e["content"]["body"] for e in alice.call(
        "GET", f"/_matrix/client/v3/rooms/{room}/messages", params={"dir": "b", "limit": 10})["chunk"]
        if e["type"] == "m.room.message"]
    assert bodies_now == ["while down", "before"]
