"""Rooms, messages and sync over real HTTP against a running server."""

from __future__ import annotations

import json
import socket
import threading
import time

import h11
import orjson
import pytest

from tests.harness import ClusterProcess, MatrixError, MatrixHttp, ServerProcess, cluster_workers


@pytest.fixture
def alice(server: ServerProcess) -> MatrixHttp:
    return server.client().register()


@pytest.fixture
def bob(server: ServerProcess) -> MatrixHttp:
    return server.client().register()


def timeline_bodies(sync: dict, room_id: str) -> list[str]:
    room = sync["rooms"].get("join", {}).get(room_id)
    if room is None:
        return []
    return [e["content"].get("body") for e in room["timeline"]["events"] if e["type"] == "m.room.message"]


def test_create_room_initial_state_order_and_defaults(alice: MatrixHttp) -> None:
    room = alice.create_room(name="Ops", topic="On call", preset="private_chat")
    state = alice.call("GET", f"/_matrix/client/v3/rooms/{room}/state")
    by_type = {(e["type"], e["state_key"]): e for e in state}
    assert by_type[("m.room.create", "")]["content"]["room_version"] == "10"
    assert by_type[("m.room.create", "")]["content"]["creator"] == alice.user_id
    assert by_type[("m.room.join_rules", "")]["content"]["join_rule"] == "invite"
    assert by_type[("m.room.history_visibility", "")]["content"]["history_visibility"] == "shared"
    assert by_type[("m.room.name", "")]["content"]["name"] == "Ops"
    assert by_type[("m.room.topic", "")]["content"]["topic"] == "On call"
    assert by_type[("m.room.power_levels", "")]["content"]["users"] == {alice.user_id: 100}
    assert by_type[("m.room.member", alice.user_id)]["content"]["membership"] == "join"
    # Events come back in creation order from the start of the room.
    page = alice.call("GET", f"/_matrix/client/v3/rooms/{room}/messages", params={"dir": "f", "limit": 50})
    types = [e["type"] for e in page["chunk"]]
    assert types[:3] == ["m.room.create", "m.room.member", "m.room.power_levels"]


def test_room_version_11_and_unsupported(alice: MatrixHttp) -> None:
    room = alice.create_room(room_version="11")
    create = alice.call("GET", f"/_matrix/client/v3/rooms/{room}/state/m.room.create/")
    assert create["room_version"] == "11"
    assert "creator" not in create
    with pytest.raises(MatrixError) as err:
        alice.create_room(room_version="9")
    assert err.value.status == 400 and err.value.errcode == "M_UNSUPPORTED_ROOM_VERSION"


def test_send_is_idempotent_per_txn_and_device(alice: MatrixHttp) -> None:
    room = alice.create_room()
    first = alice.send(room, "hello", txn="abc")
    again = alice.send(room, "hello", txn="abc")
    assert first == again
    other = alice.send(room, "hello", txn="abd")
    assert other != first
    # The same txn ID from another device of the same user is a different request.
    second_device = MatrixHttp(alice.base_url, alice.server_name)
    second_device.token = alice.call(
        "POST", "/_matrix/client/v3/login",
        {"type": "m.login.password", "identifier": {"type": "m.id.user", "user": alice.user_id}, "password": alice.password},
        token=False,
    )["access_token"]
    assert second_device.send(room, "hello", txn="abc") != first


def test_sync_incremental_and_long_poll_wakes(alice: MatrixHttp, bob: MatrixHttp) -> None:
    room = alice.create_room(invite=[bob.user_id])
    initial = bob.sync()
    assert room in initial["rooms"]["invite"]
    invite_state = initial["rooms"]["invite"][room]["invite_state"]["events"]
    assert any(e["type"] == "m.room.create" for e in invite_state)
    bob.join(room)
    after_join = bob.sync(since=initial["next_batch"])
    assert room in after_join["rooms"]["join"]
    since = after_join["next_batch"]

    result: dict = {}

    def poll() -> None:
        result["sync"] = bob.sync(since=since, timeout=20000)
        result["at"] = time.monotonic()

    thread = threading.Thread(target=poll)
    thread.start()
    time.sleep(0.5)
    sent_at = time.monotonic()
    alice.send(room, "wake up")
    thread.join(10)
    assert not thread.is_alive()
    assert timeline_bodies(result["sync"], room) == ["wake up"]
    assert result["at"] - sent_at < 2.0


def test_sync_timeout_returns_empty(alice: MatrixHttp) -> None:
    first = alice.sync()
    start = time.monotonic()
    second = alice.sync(since=first["next_batch"], timeout=500)
    assert time.monotonic() - start >= 0.45
    assert second["rooms"].get("join", {}) == {}


def test_transaction_id_echoed_only_to_sending_device(alice: MatrixHttp, bob: MatrixHttp) -> None:
    room = alice.create_room(invite=[bob.user_id])
    bob.join(room)
    since_a = alice.sync()["next_batch"]
    since_b = bob.sync()["next_batch"]
    alice.send(room, "with txn", txn="my-txn-1")
    mine = alice.sync(since=since_a)["rooms"]["join"][room]["timeline"]["events"]
    theirs = bob.sync(since=since_b)["rooms"]["join"][room]["timeline"]["events"]
    assert mine[-1]["unsigned"]["transaction_id"] == "my-txn-1"
    assert "transaction_id" not in theirs[-1]["unsigned"]


def test_limited_timeline_and_backfill_with_prev_batch(alice: MatrixHttp, bob: MatrixHttp) -> None:
    room = alice.create_room(invite=[bob.user_id])
    bob.join(room)
    since = bob.sync()["next_batch"]
    for i in range(25):
        alice.send(room, f"m{i}")
    sync = bob.sync(since=since, filter='{"room":{"timeline":{"limit":5}}}')
    timeline = sync["rooms"]["join"][room]["timeline"]
    assert timeline["limited"] is True
    assert [e["content"]["body"] for e in timeline["events"]] == [f"m{i}" for i in range(20, 25)]
    page = bob.call(
        "GET", f"/_matrix/client/v3/rooms/{room}/messages",
        params={"dir": "b", "from": timeline["prev_batch"], "to": since, "limit": 100},
    )
    bodies = [e["content"]["body"] for e in page["chunk"] if e["type"] == "m.room.message"]
    assert bodies == [f"m{i}" for i in range(19, -1, -1)]


def test_messages_type_filter_reaches_a_message_behind_many_other_events(alice: MatrixHttp) -> None:
    """/messages with a filter for m.room.message, in a room whose last 450 events are of
    another type: one request returns the message and says the history is exhausted,
    instead of an empty page after reading its bounded 400 events of the other type."""
    room = alice.create_room()
    alice.send(room, "under the noise")
    for i in range(450):
        alice.send(room, {"n": i}, event_type="org.example.noise")
    page = alice.call(
        "GET",
        f"/_matrix/client/v3/rooms/{room}/messages",
        params={"dir": "b", "limit": 10, "filter": json.dumps({"types": ["m.room.message"]})},
    )
    assert [e["content"]["body"] for e in page["chunk"]] == ["under the noise"]
    assert "end" not in page


def test_messages_paginate_back_to_create(alice: MatrixHttp) -> None:
    room = alice.create_room()
    for i in range(30):
        alice.send(room, f"p{i}")
    seen = []
    token = None
    for _ in range(50):
        params = {"dir": "b", "limit": 7}
        if token:
            params["from"] = token
        page = alice.call("GET", f"/_matrix/client/v3/rooms/{room}/messages", params=params)
        seen.extend(page["chunk"])
        token = page.get("end")
        if token is None:
            break
    assert seen[-1]["type"] == "m.room.create"
    bodies = [e["content"]["body"] for e in seen if e["type"] == "m.room.message"]
    assert bodies == [f"p{i}" for i in range(29, -1, -1)]
    assert len({e["event_id"] for e in seen}) == len(seen)


def test_non_member_cannot_read_or_write(alice: MatrixHttp, bob: MatrixHttp) -> None:
    room = alice.create_room()
    alice.send(room, "secret")
    for method, path, body in [
        ("GET", f"/_matrix/client/v3/rooms/{room}/messages", None),
        ("GET", f"/_matrix/client/v3/rooms/{room}/state", None),
        ("GET", f"/_matrix/client/v3/rooms/{room}/members", None),
        ("PUT", f"/_matrix/client/v3/rooms/{room}/send/m.room.message/x1", {"msgtype": "m.text", "body": "hi"}),
    ]:
        with pytest.raises(MatrixError) as err:
            bob.call(method, path, body)
        assert err.value.status == 403 and err.value.errcode == "M_FORBIDDEN"
    with pytest.raises(MatrixError) as err:
        bob.join(room)
    assert err.value.errcode == "M_FORBIDDEN"


def test_left_user_sees_nothing_after_leaving(alice: MatrixHttp, bob: MatrixHttp) -> None:
    room = alice.create_room(invite=[bob.user_id])
    bob.join(room)
    alice.send(room, "before")
    bob.call("POST", f"/_matrix/client/v3/rooms/{room}/leave", {})
    alice.send(room, "after")
    page = bob.call("GET", f"/_matrix/client/v3/rooms/{room}/messages", params={"dir": "b", "limit": 50})
    bodies = [e["content"].get("body") for e in page["chunk"] if e["type"] == "m.room.message"]
    assert "before" in bodies and "after" not in bodies
    state = bob.call("GET", f"/_matrix/client/v3/rooms/{room}/state")
    assert {e["state_key"]: e["content"]["membership"] for e in state if e["type"] == "m.room.member"}[bob.user_id] == "leave"
    with pytest.raises(MatrixError):
        bob.send(room, "let me in")


def test_kick_ban_unban_and_power_denial(alice: MatrixHttp, bob: MatrixHttp, server: ServerProcess) -> None:
    carol = server.client().register()
    room = alice.create_room(invite=[bob.user_id, carol.user_id])
    bob.join(room)
    carol.join(room)
    # bob (power 0) may not kick carol or change the name
    with pytest.raises(MatrixError) as err:
        bob.call("POST", f"/_matrix/client/v3/rooms/{room}/kick", {"user_id": carol.user_id})
    assert err.value.status == 403
    with pytest.raises(MatrixError) as err:
        bob.call("PUT", f"/_matrix/client/v3/rooms/{room}/state/m.room.name/", {"name": "bob's"})
    assert err.value.status == 403 and "power level" in err.value.body["error"]
    alice.call("POST", f"/_matrix/client/v3/rooms/{room}/kick", {"user_id": carol.user_id, "reason": "bye"})
    members = alice.call("GET", f"/_matrix/client/v3/rooms/{room}/joined_members")["joined"]
    assert carol.user_id not in members
    alice.call("POST", f"/_matrix/client/v3/rooms/{room}/ban", {"user_id": bob.user_id})
    with pytest.raises(MatrixError):
        bob.join(room)
    with pytest.raises(MatrixError) as err:
        alice.call("POST", f"/_matrix/client/v3/rooms/{room}/unban", {"user_id": carol.user_id})
    assert err.value.errcode == "M_BAD_STATE"
    alice.call("POST", f"/_matrix/client/v3/rooms/{room}/unban", {"user_id": bob.user_id})
    alice.invite(room, bob.user_id)
    bob.join(room)


def test_redaction(alice: MatrixHttp, bob: MatrixHttp) -> None:
    room = alice.create_room(invite=[bob.user_id])
    bob.join(room)
    event_id = bob.send(room, "oops")
    other = alice.send(room, "alice's")
    with pytest.raises(MatrixError) as err:
        bob.call("PUT", f"/_matrix/client/v3/rooms/{room}/redact/{other}/r1", {})
    assert err.value.status == 403
    redaction = bob.call("PUT", f"/_matrix/client/v3/rooms/{room}/redact/{event_id}/r2", {"reason": "typo"})["event_id"]
    event = alice.call("GET", f"/_matrix/client/v3/rooms/{room}/event/{event_id}")
    assert event["content"] == {}
    assert event["unsigned"]["redacted_because"]["event_id"] == redaction
    # Admins (power 100 >= redact 50) may redact others' events.
    alice.call("PUT", f"/_matrix/client/v3/rooms/{room}/redact/{other}/r3", {})


def test_errors_are_matrix_errors(alice: MatrixHttp, server: ServerProcess) -> None:
    anon = server.client()
    resp = anon.raw("GET", "/_matrix/client/v3/sync")
    assert resp.status_code == 401 and resp.json()["errcode"] == "M_MISSING_TOKEN"
    anon.token = "bst_nope"
    resp = anon.raw("GET", "/_matrix/client/v3/sync")
    assert resp.status_code == 401 and resp.json()["errcode"] == "M_UNKNOWN_TOKEN"
    resp = alice.raw("POST", "/_matrix/client/v3/createRoom", content=b"{not json")
    assert resp.status_code == 400 and resp.json()["errcode"] == "M_NOT_JSON"
    resp = alice.raw("POST", "/_matrix/client/v3/createRoom", content=b"[1,2]")
    assert resp.status_code == 400 and resp.json()["errcode"] == "M_BAD_JSON"
    resp = alice.raw("GET", "/_matrix/client/v3/no/such/endpoint")
    assert resp.status_code == 404 and resp.json()["errcode"] == "M_UNRECOGNIZED"
    resp = alice.raw("DELETE", "/_matrix/client/v3/createRoom")
    assert resp.status_code == 405 and resp.json()["errcode"] == "M_UNRECOGNIZED"
    resp = alice.raw("POST", "/_matrix/client/v3/createRoom", content=b'{"name":"' + b"x" * 2_000_000 + b'"}')
    assert resp.status_code == 413 and resp.json()["errcode"] == "M_TOO_LARGE"
    room = alice.create_room()
    resp = alice.raw("PUT", f"/_matrix/client/v3/rooms/{room}/send/m.room.message/f1", json={"body": 1.5})
    assert resp.status_code == 400 and resp.json()["errcode"] == "M_BAD_JSON"
    resp = alice.raw("PUT", f"/_matrix/client/v3/rooms/{room}/send/m.room.message/f2", json={"body": "x" * 70000})
    assert resp.status_code == 413 and resp.json()["errcode"] == "M_TOO_LARGE"
    resp = alice.raw("OPTIONS", "/_matrix/client/v3/sync")
    assert resp.headers["access-control-allow-origin"] == "*"


def test_state_key_with_slash_round_trips(alice: MatrixHttp) -> None:
    room = alice.create_room()
    alice.call("PUT", f"/_matrix/client/v3/rooms/{room}/state/org.example.thing/a%2Fb", {"v": 1})
    assert alice.call("GET", f"/_matrix/client/v3/rooms/{room}/state/org.example.thing/a%2Fb") == {"v": 1}
    event = alice.call("GET", f"/_matrix/client/v3/rooms/{room}/state/org.example.thing/a%2Fb", params={"format": "event"})
    assert event["state_key"] == "a/b"


@pytest.mark.skipif(cluster_workers() > 1, reason="nginx in front refuses NUL in URLs itself (400, before Bastion)")
def test_nul_characters_are_refused_not_crashing(alice: MatrixHttp) -> None:
    """PostgreSQL text cannot hold NUL; every entry point refuses it with a 4xx."""
    room = alice.create_room()
    cases = [
        ("PUT", f"/_matrix/client/v3/rooms/{room}/send/m.room.message%00/t1", {"body": "x"}),
        ("PUT", f"/_matrix/client/v3/rooms/{room}/state/m.room.topic/%00", {"topic": "x"}),
        ("GET", f"/_matrix/client/v3/rooms/{room}/event/$abc%00def", None),
        ("GET", "/_matrix/client/v3/directory/room/%23a%00b:localhost", None),
        ("POST", "/_matrix/client/v3/createRoom", {"initial_state": [{"type": "a\u0000b", "content": {}}]}),
        ("POST", "/_matrix/client/v3/createRoom", {"invite": ["@a\u0000:localhost"]}),
        ("PUT", f"/_matrix/client/v3/profile/{alice.user_id}/displayname", {"displayname": "a\u0000b"}),
        ("PUT", "/_matrix/client/v3/directory/room/%23nul:localhost", {"room_id": "!a\u0000:localhost"}),
    ]
    for method, path, body in cases:
        resp = alice.raw(method, path, json=body)
        assert 400 <= resp.status_code < 500, (path, resp.status_code, resp.text)
        assert resp.json()["errcode"].startswith("M_")
    resp = alice.raw("GET", "/_matrix/client/v3/sync", params={"since": "s1\x00"})
    assert resp.status_code == 400
    # Numbers in tokens and IDs written with digits int() refuses (Unicode "²", or more
    # than 4,300 of them): a clear 4xx, never a 500.
    import base64
    for bad in ("\u00b2", "9" * 5000):
        directory_since = base64.urlsafe_b64encode(f"o{bad}".encode()).decode().rstrip("=")
        cases_get = [
            ("/_matrix/client/v3/sync", {"since": "s" + bad}, 400, "M_INVALID_PARAM"),
            (f"/_matrix/client/v3/rooms/{room}/messages", {"from": "t" + bad}, 400, "M_INVALID_PARAM"),
            (f"/_matrix/client/v3/user/{alice.user_id}/filter/{bad}", {}, 400, "M_INVALID_PARAM"),
            ("/_matrix/client/v3/notifications", {"from": bad}, 400, "M_INVALID_PARAM"),
            (f"/_matrix/client/v3/room_keys/version/{bad}", {}, 404, "M_NOT_FOUND"),
            (f"/_matrix/client/v1/rooms/{room}/threads", {"from": "th" + bad}, 400, "M_INVALID_PARAM"),
            ("/_matrix/client/v3/publicRooms", {"since": directory_since}, 400, "M_INVALID_PARAM"),
        ]
        for path, params, status, errcode in cases_get:
            resp = alice.raw("GET", path, params=params)
            assert (resp.status_code, resp.json().get("errcode")) == (status, errcode), (path[:80], resp.text[:200])
        resp = alice.raw("POST", "/_matrix/client/v3/search", params={"next_batch": "rank:" + bad},
                         json={"search_categories": {"room_events": {"search_term": "x"}}})
        assert (resp.status_code, resp.json().get("errcode")) == (400, "M_INVALID_PARAM"), resp.text[:200]
    # NUL inside message content is fine: it is data, stored in the event blob.
    event_id = alice.send(room, "before\u0000after")
    assert alice.call("GET", f"/_matrix/client/v3/rooms/{room}/event/{event_id}")["content"]["body"] == "before\u0000after"
    relation = {"msgtype": "m.text", "body": "r", "m.relates_to": {"rel_type": "m.thread\u0000", "event_id": "$x\u0000"}}
    assert alice.send(room, relation)


def test_deeply_nested_and_wrongly_typed_bodies_are_refused(alice: MatrixHttp) -> None:
    room = alice.create_room()
    nested: dict = {}
    cursor = nested
    for _ in range(300):
        cursor["a"] = {}
        cursor = cursor["a"]
    for method, path in [
        ("PUT", f"/_matrix/client/v3/rooms/{room}/send/m.room.message/deep"),
        ("PUT", f"/_matrix/client/v3/user/{alice.user_id}/account_data/org.example.deep"),
        ("POST", "/_matrix/client/v3/createRoom"),
    ]:
        resp = alice.raw(method, path, json={"nested": nested})
        assert resp.status_code == 400 and resp.json()["errcode"] == "M_BAD_JSON", (path, resp.text)
    for preset in ({"x": 1}, [1], 5):
        resp = alice.raw("POST", "/_matrix/client/v3/createRoom", json={"preset": preset})
        assert resp.status_code == 400 and resp.json()["errcode"] == "M_BAD_JSON"
    members = alice.call("GET", f"/_matrix/client/v3/rooms/{room}/joined_members")["joined"][alice.user_id]
    assert members == {"display_name": alice.user_id.split(":")[0][1:]}  # no avatar set: the key is omitted


def _exchange_start(sock: socket.socket, conn: h11.Connection, server: ServerProcess, token: str, method: str,
                    target: str, length: int = 0, extra: tuple[tuple[str, str], ...] = ()) -> None:
    headers = [("host", f"127.0.0.1:{server.port}"), ("authorization", f"Bearer {token}"),
               ("content-type", "application/json"), ("content-length", str(length)), *extra]
    sock.sendall(conn.send(h11.Request(method=method, target=target, headers=headers)))


def _read_response(sock: socket.socket, conn: h11.Connection) -> tuple[h11.Response, bytes, bool]:
    """The next response on ``sock``: head, body, and whether the server closed the connection after it."""
    response: h11.Response | None = None
    body = b""
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            conn.receive_data(sock.recv(65536))
        elif isinstance(event, h11.Response):
            response = event
        elif isinstance(event, h11.Data):
            body += event.data
        elif isinstance(event, h11.EndOfMessage):
            break
    assert response is not None
    closed = False
    if conn.their_state is h11.MUST_CLOSE:
        sock.settimeout(10)
        closed = sock.recv(1) == b""
    return response, body, closed


def test_refused_oversized_body_leaves_the_connection_usable(alice: MatrixHttp, server: ServerProcess) -> None:
    """A 413 for a body over the limit, and the client's next request on the same
    connection is answered: the server reads the rest of a moderately oversized body
    before answering, so neither it nor a proxy in front closes a connection the
    answer said was kept alive (nginx does when the answer ends while it is still
    forwarding the body)."""
    assert alice.token is not None
    limit = 1024 * 1024
    body = b'{"name":"' + b"x" * (limit + 200_000) + b'"}'
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
        conn = h11.Connection(h11.CLIENT)
        _exchange_start(sock, conn, server, alice.token, "POST", "/_matrix/client/v3/createRoom", len(body))
        sock.sendall(conn.send(h11.Data(data=body[: limit + 100_000])))
        time.sleep(0.5)  # the server has seen more than its limit; the rest is still to come
        sock.sendall(conn.send(h11.Data(data=body[limit + 100_000:])))
        sock.sendall(conn.send(h11.EndOfMessage()))
        response, answer, closed = _read_response(sock, conn)
        assert response.status_code == 413 and orjson.loads(answer)["errcode"] == "M_TOO_LARGE"
        assert not closed
        conn.start_next_cycle()
        _exchange_start(sock, conn, server, alice.token, "GET", "/_matrix/client/v3/account/whoami")
        sock.sendall(conn.send(h11.EndOfMessage()))
        response, answer, _ = _read_response(sock, conn)
        assert response.status_code == 200 and orjson.loads(answer)["user_id"] == alice.user_id


@pytest.mark.parametrize(("length", "extra"), [
    (21 * 1024 * 1024, ()),
    (1024 * 1024 + 1000, (("expect", "100-continue"),)),
], ids=["far-over", "expect-continue"])
def test_oversized_body_is_refused_without_being_read(alice: MatrixHttp, server: ServerProcess, length: int,
                                                      extra: tuple[tuple[str, str], ...]) -> None:
    """A body declared 20 MiB past the limit, or over it by a client waiting for
    ``100 Continue``, is refused at once, before the client sends it; talking to
    the server directly, the answer closes the connection (the client must not send
    the body on it). Through nginx only the 413 is checked: nginx itself answers
    ``Expect`` and decides about the client's connection."""
    assert alice.token is not None
    if extra and isinstance(server, ClusterProcess):
        pytest.skip("nginx answers Expect: 100-continue itself")
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
        conn = h11.Connection(h11.CLIENT)
        _exchange_start(sock, conn, server, alice.token, "POST", "/_matrix/client/v3/createRoom", length, extra)
        response, answer, closed = _read_response(sock, conn)
        assert response.status_code == 413 and orjson.loads(answer)["errcode"] == "M_TOO_LARGE"
        if not isinstance(server, ClusterProcess):
            assert (b"connection", b"close") in response.headers
            assert closed
