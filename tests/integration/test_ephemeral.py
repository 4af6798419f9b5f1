"""Receipts, read markers, typing and presence over HTTP."""

from __future__ import annotations

import threading
import time

import pytest

from tests.harness import MatrixError, MatrixHttp, ServerProcess


def ephemeral(sync: dict, room: str) -> dict[str, dict]:
    events = sync["rooms"].get("join", {}).get(room, {}).get("ephemeral", {}).get("events", [])
    return {e["type"]: e["content"] for e in events}


def test_read_receipts_flow_and_lower_unread_counts(room_pair) -> None:
    alice, bob, room = room_pair
    ids = [alice.send(room, f"r{i}") for i in range(3)]
    since = alice.sync()["next_batch"]
    bob_sync = bob.sync()
    assert bob_sync["rooms"]["join"][room]["unread_notifications"]["notification_count"] == 3
    bob.call("POST", f"/_matrix/client/v3/rooms/{room}/receipt/m.read/{ids[1]}", {})
    receipts = ephemeral(alice.sync(since=since), room)["m.receipt"]
    assert bob.user_id in receipts[ids[1]]["m.read"]
    assert isinstance(receipts[ids[1]]["m.read"][bob.user_id]["ts"], int)
    counts = bob.sync(since=bob_sync["next_batch"])["rooms"]["join"][room]["unread_notifications"]
    assert counts["notification_count"] == 1
    # A receipt for an older event does not move the marker back.
    bob.call("POST", f"/_matrix/client/v3/rooms/{room}/receipt/m.read/{ids[0]}", {})
    assert bob.sync()["rooms"]["join"][room]["unread_notifications"]["notification_count"] == 1
    # Private receipts are seen by their owner only.
    since_a = alice.sync()["next_batch"]
    since_b = bob.sync()["next_batch"]
    bob.call("POST", f"/_matrix/client/v3/rooms/{room}/receipt/m.read.private/{ids[2]}", {})
    assert "m.receipt" not in ephemeral(alice.sync(since=since_a), room)
    mine = ephemeral(bob.sync(since=since_b), room)["m.receipt"]
    assert bob.user_id in mine[ids[2]]["m.read.private"]
    assert bob.sync()["rooms"]["join"][room]["unread_notifications"]["notification_count"] == 0


def test_threaded_receipt_and_validation(room_pair) -> None:
    alice, bob, room = room_pair
    root = alice.send(room, "root")
    bob.call("POST", f"/_matrix/client/v3/rooms/{room}/receipt/m.read/{root}", {"thread_id": "main"})
    for body in ({"thread_id": ""}, {"thread_id": 5}, {"thread_id": "not-an-event"}):
        with pytest.raises(MatrixError) as err:
            bob.call("POST", f"/_matrix/client/v3/rooms/{room}/receipt/m.read/{root}", body)
        assert err.value.status == 400 and err.value.errcode == "M_INVALID_PARAM"
    with pytest.raises(MatrixError) as err:
        bob.call("POST", f"/_matrix/client/v3/rooms/{room}/receipt/m.bogus/{root}", {})
    assert err.value.status == 400
    with pytest.raises(MatrixError) as err:
        bob.call("POST", f"/_matrix/client/v3/rooms/{room}/receipt/m.read/$unknown", {})
    assert err.value.status == 404
    outsider = MatrixHttp(bob.base_url, bob.server_name).register()
    with pytest.raises(MatrixError) as err:
        outsider.call("POST", f"/_matrix/client/v3/rooms/{room}/receipt/m.read/{root}", {})
    assert err.value.status == 403


def test_own_message_reads_the_main_timeline_not_the_threads(room_pair) -> None:
    """Counts per thread (unread_thread_notifications): bob never sends a receipt; his
    own message in the main timeline marks it read, the threads stay unread — also on a
    later incremental sync, counted from where the last one stopped."""
    alice, bob, room = room_pair
    threaded = '{"room": {"timeline": {"unread_thread_notifications": true}}}'

    def counts(since: str | None = None) -> tuple[int, dict, str]:
        sync = bob.sync(since=since, filter=threaded)
        data = sync["rooms"]["join"][room]
        return data["unread_notifications"]["notification_count"], data["unread_thread_notifications"], sync["next_batch"]

    root = alice.send(room, "thread root")
    alice.send(room, "main one")
    for i in range(2):
        alice.send(room, {"msgtype": "m.text", "body": f"reply {i}", "m.relates_to": {"rel_type": "m.thread", "event_id": root}})
    main, threads, since = counts()
    assert main == 2 and threads == {root: {"notification_count": 2, "highlight_count": 0}}
    bob.send(room, "my answer")
    main, threads, since = counts(since)
    assert main == 0 and threads == {root: {"notification_count": 2, "highlight_count": 0}}
    alice.send(room, "main two")
    alice.send(room, {"msgtype": "m.text", "body": "reply 2", "m.relates_to": {"rel_type": "m.thread", "event_id": root}})
    main, threads, _ = counts(since)
    assert main == 1 and threads == {root: {"notification_count": 3, "highlight_count": 0}}
    main, threads, _ = counts()  # an initial sync agrees
    assert main == 1 and threads == {root: {"notification_count": 3, "highlight_count": 0}}


def test_own_post_in_a_thread_reads_that_thread_also_after_a_restart(make_server) -> None:
    """Spec (receiving notifications): sending an event updates the sender's read
    receipt. bob never sends a receipt; his reply in one thread marks that thread read
    up to it — not the other thread, not the main timeline. After a restart, with his
    reply pushed out of the server's memory of the room, the counts must not change."""
    srv = make_server()
    alice, bob = srv.client().register(), srv.client().register()
    room = alice.create_room(invite=[bob.user_id])
    bob.join(room)
    threaded = '{"room": {"timeline": {"unread_thread_notifications": true}}}'

    def counts(since: str | None = None) -> tuple[int, dict, str]:
        sync = bob.sync(since=since, filter=threaded)
        data = sync["rooms"]["join"][room]
        return data["unread_notifications"]["notification_count"], data["unread_thread_notifications"], sync["next_batch"]

    def reply(sender: MatrixHttp, root: str, body: str) -> str:
        return sender.send(room, {"msgtype": "m.text", "body": body, "m.relates_to": {"rel_type": "m.thread", "event_id": root}})

    first, second = alice.send(room, "first thread"), alice.send(room, "second thread")
    reply(alice, first, "a1")
    reply(alice, second, "b1")
    main, threads, since = counts()
    assert main == 2 and threads == {first: {"notification_count": 1, "highlight_count": 0},
                                     second: {"notification_count": 1, "highlight_count": 0}}
    reply(bob, first, "bob read the first thread")
    main, threads, since = counts(since)
    assert main == 2 and threads == {second: {"notification_count": 1, "highlight_count": 0}}
    reply(alice, first, "a2")
    main, threads, since = counts(since)
    assert main == 2 and threads == {first: {"notification_count": 1, "highlight_count": 0},
                                     second: {"notification_count": 1, "highlight_count": 0}}
    for i in range(60):  # more than the server keeps of a room in memory
        alice.send(room, f"main {i}")
    expected = {first: {"notification_count": 1, "highlight_count": 0}, second: {"notification_count": 1, "highlight_count": 0}}
    assert counts()[:2] == (62, expected)
    srv.restart()
    assert counts()[:2] == (62, expected)


def test_read_markers_set_fully_read_and_receipt(room_pair) -> None:
    alice, bob, room = room_pair
    event_id = alice.send(room, "marker")
    since = bob.sync()["next_batch"]
    bob.call("POST", f"/_matrix/client/v3/rooms/{room}/read_markers", {"m.fully_read": event_id, "m.read": event_id})
    sync = bob.sync(since=since)
    data = sync["rooms"]["join"][room]
    assert {"type": "m.fully_read", "content": {"event_id": event_id}} in data["account_data"]["events"]
    assert bob.user_id in ephemeral(sync, room)["m.receipt"][event_id]["m.read"]
    # m.fully_read through the receipt endpoint is the same as read_markers
    second = alice.send(room, "marker 2")
    bob.call("POST", f"/_matrix/client/v3/rooms/{room}/receipt/m.fully_read/{second}", {})
    assert bob.call("GET", f"/_matrix/client/v3/user/{bob.user_id}/rooms/{room}/account_data/m.fully_read") == {"event_id": second}


def test_typing_with_expiry_wakes_long_poll(room_pair) -> None:
    alice, bob, room = room_pair
    since = alice.sync()["next_batch"]
    result: dict = {}

    def poll() -> None:
        # Long-poll as a client does: other things (alice's own presence) may wake it first.
        token = since
        deadline = time.monotonic() + 8
        while time.monotonic() < deadline:
            sync = alice.sync(since=token, timeout=10000)
            token = sync["next_batch"]
            if "m.typing" in ephemeral(sync, room):
                result["sync"] = sync
                result["woke_at"] = time.monotonic()
                return

    thread = threading.Thread(target=poll)
    thread.start()
    time.sleep(0.3)
    sent = time.monotonic()
    bob.call("PUT", f"/_matrix/client/v3/rooms/{room}/typing/{bob.user_id}", {"typing": True, "timeout": 1500})
    thread.join(8)
    typing = ephemeral(result["sync"], room)["m.typing"]
    assert typing == {"user_ids": [bob.user_id]}
    assert result["woke_at"] - sent < 1, "the long-poll was not woken by the typing notice"
    since = result["sync"]["next_batch"]
    # Expiry (1.5 s) is itself a change that wakes the next long-poll.
    start = time.monotonic()
    after = alice.sync(since=since, timeout=10000)
    # m.typing always carries the whole current list, so a server may repeat an
    # unchanged list (with several workers, one that heard of the change later than the
    # worker that issued the token does); what matters is that the empty list arrives.
    while ephemeral(after, room).get("m.typing") != {"user_ids": []} and time.monotonic() - start < 5:
        after = alice.sync(since=after["next_batch"], timeout=10000)
    assert ephemeral(after, room)["m.typing"] == {"user_ids": []}
    assert 0.5 < time.monotonic() - start < 5
    with pytest.raises(MatrixError) as err:
        bob.call("PUT", f"/_matrix/client/v3/rooms/{room}/typing/{alice.user_id}", {"typing": True})
    assert err.value.status == 403
    with pytest.raises(MatrixError) as err:
        bob.call("PUT", f"/_matrix/client/v3/rooms/{room}/typing/{bob.user_id}", {"typing": "yes"})
    assert err.value.errcode == "M_BAD_JSON"


def test_presence_set_get_and_in_sync(room_pair, server: ServerProcess) -> None:
    alice, bob, _room = room_pair
    since = alice.sync(set_presence="offline")["next_batch"]
    bob.call("PUT", f"/_matrix/client/v3/presence/{bob.user_id}/status", {"presence": "unavailable", "status_msg": "in a meeting"})
    status = alice.call("GET", f"/_matrix/client/v3/presence/{bob.user_id}/status")
    assert status["presence"] == "unavailable" and status["status_msg"] == "in a meeting"
    events = alice.sync(since=since, set_presence="offline")["presence"]["events"]
    assert {"sender": bob.user_id, "type": "m.presence"} == {k: events[-1][k] for k in ("sender", "type")}
    assert events[-1]["content"]["presence"] == "unavailable"
    stranger = server.client().register()
    with pytest.raises(MatrixError) as err:
        stranger.call("GET", f"/_matrix/client/v3/presence/{bob.user_id}/status")
    assert err.value.status == 403
    with pytest.raises(MatrixError) as err:
        alice.call("PUT", f"/_matrix/client/v3/presence/{bob.user_id}/status", {"presence": "online"})
    assert err.value.status == 403
    with pytest.raises(MatrixError) as err:
        bob.call("PUT", f"/_matrix/client/v3/presence/{bob.user_id}/status", {"presence": "busy"})
    assert err.value.errcode == "M_BAD_JSON"
    # Syncing marks a user online.
    bob.sync()
    assert alice.call("GET", f"/_matrix/client/v3/presence/{bob.user_id}/status")["presence"] == "online"


def test_presence_disabled(make_server) -> None:
    srv = make_server(presence={"enabled": False})
    alice = srv.client().register()
    alice.call("PUT", f"/_matrix/client/v3/presence/{alice.user_id}/status", {"presence": "online"})
    assert alice.call("GET", f"/_matrix/client/v3/presence/{alice.user_id}/status") == {"presence": "offline"}
    assert alice.sync()["presence"]["events"] == []
