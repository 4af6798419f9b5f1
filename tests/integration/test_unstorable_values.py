"""Values a database cannot store, from requests: a clean answer, never a 500 or a 503.

PostgreSQL is stricter than SQLite: text cannot hold a NUL character (JSON can), an
index row cannot pass ~2.7 KB, a BIGINT column stops at 2^63 - 1 (sqlite3 cannot bind
a larger integer either). Content that is legitimate Matrix — a message with a NUL in
it — must be stored on both; a value that cannot be anything valid gets a 400, and the
same input gives the same answer on both databases where the server checks it itself.
These tests run on whichever database the suite runs on (CI: both); they were written
from a fuzzing pass against PostgreSQL (2026-12-07).
"""

from __future__ import annotations

import secrets

import pytest

from tests.harness import MatrixError, MatrixHttp, ServerProcess


def _random_text(n: int) -> str:
    """Text that does not compress (an index row is compressed before its size check)."""
    return secrets.token_urlsafe(n)[:n]


def _still_readable(user: MatrixHttp, room: str, since: str) -> dict:
    user.sync()
    user.sync(since=since)
    page = user.call("GET", f"/_matrix/client/v3/rooms/{room}/messages", params={"dir": "b", "limit": 50})
    return {e["event_id"]: e for e in page["chunk"]}


@pytest.mark.parametrize("encryption", [True, False])
def test_a_message_with_a_nul_character_is_stored_and_searchable(make_server, encryption) -> None:
    """JSON allows "\\u0000" in a string. With encryption at rest off, PostgreSQL's search
    index got the raw text and refused it: the send answered 500."""
    srv: ServerProcess = make_server(encryption={"enabled": encryption})
    alice = srv.client().register()
    room = alice.create_room(name="nul\x00name", topic="nul\x00topic")
    since = alice.sync()["next_batch"]
    body = "hello nul\x00world"
    event_id = alice.send(room, body)
    events = _still_readable(alice, room, since)
    assert events[event_id]["content"]["body"] == body
    state = alice.call("GET", f"/_matrix/client/v3/rooms/{room}/state/m.room.name/")
    assert state["name"] == "nul\x00name"
    found = alice.call("POST", "/_matrix/client/v3/search", {"search_categories": {"room_events": {"search_term": "hello"}}})
    assert [r["result"]["event_id"] for r in found["search_categories"]["room_events"]["results"]] == [event_id]


@pytest.mark.parametrize(
    "relation",
    [
        {"rel_type": "m.thread", "event_id": "$" + _random_text(2800)},
        {"rel_type": "m.annotation", "event_id": "$" + _random_text(2800), "key": "k"},
        {"rel_type": "m.reference", "event_id": "$" + _random_text(2800)},
        {"m.in_reply_to": {"event_id": "$" + _random_text(2800)}},
        {"rel_type": "m.thread", "event_id": "$a\x00b"},
        {"rel_type": "m.annotation", "event_id": "$a\x00b", "key": "k"},
        {"rel_type": _random_text(2800), "event_id": "$" + _random_text(40)},
    ],
    ids=["long thread", "long annotation", "long reference", "long reply", "nul thread", "nul annotation", "long rel_type"],
)
def test_a_relation_to_something_that_cannot_be_an_event_relates_to_nothing(room_pair, relation) -> None:
    """An event ID is at most 255 bytes and has no NUL: a longer target overflowed
    PostgreSQL's relations index (500), a NUL one failed the thread and annotation
    checks' look-ups (500). Such a relation now relates to nothing, on both databases."""
    alice, bob, room = room_pair
    since = bob.sync()["next_batch"]
    event_id = alice.send(room, {"msgtype": "m.text", "body": "odd relation", "m.relates_to": relation})
    state_id = alice.call(
        "PUT", f"/_matrix/client/v3/rooms/{room}/state/m.custom/k", {"m.relates_to": relation}
    )["event_id"]
    events = _still_readable(bob, room, since)
    assert event_id in events and state_id in events
    assert bob.call("GET", f"/_matrix/client/v1/rooms/{room}/threads")["chunk"] == []


def test_a_to_device_message_to_a_device_id_that_cannot_exist_is_refused(room_pair) -> None:
    """A device ID over 255 characters overflowed PostgreSQL's inbox index, and the
    error was taken for a lost connection: three retries, then 503 "the database is
    unavailable". Login accepts no such device ID, so the request is refused (400) on
    both databases, and nothing of it is delivered."""
    alice, bob, _ = room_pair
    since = bob.sync()["next_batch"]
    for device_id in (_random_text(2800), "a\x00b"):
        with pytest.raises(MatrixError) as err:
            alice.call(
                "PUT", f"/_matrix/client/v3/sendToDevice/m.test/{secrets.token_hex(4)}",
                {"messages": {bob.user_id: {device_id: {"a": 1}, bob.device_id: {"a": 2}}}},
            )
        assert err.value.status == 400 and err.value.errcode == "M_INVALID_PARAM"
    assert bob.sync(since=since)["to_device"]["events"] == []
    alice.call("PUT", f"/_matrix/client/v3/sendToDevice/m.test/{secrets.token_hex(4)}",
               {"messages": {bob.user_id: {bob.device_id: {"a": 3}}}})
    assert [e["content"] for e in bob.sync(since=since)["to_device"]["events"]] == [{"a": 3}]


def test_a_join_rule_with_a_nul_character_is_kept_as_invite(room_pair, server: ServerProcess) -> None:
    """The room's join rule is copied into a column for the user directory; a NUL in it
    made that write fail (500) on PostgreSQL. The state event is stored as sent; the
    directory treats the unknown rule as "invite", as the auth rules do: the members of
    the room stay hidden from users who share no room with them."""
    alice, bob, room = room_pair
    outsider = server.client().register()
    term = {"search_term": bob.user_id.split(":")[0][1:]}
    alice.call("PUT", f"/_matrix/client/v3/rooms/{room}/state/m.room.join_rules/", {"join_rule": "public"})
    assert [r["user_id"] for r in outsider.call("POST", "/_matrix/client/v3/user_directory/search", term)["results"]] == [bob.user_id]
    alice.call("PUT", f"/_matrix/client/v3/rooms/{room}/state/m.room.join_rules/", {"join_rule": "a\x00b"})
    got = bob.call("GET", f"/_matrix/client/v3/rooms/{room}/state/m.room.join_rules/")
    assert got == {"join_rule": "a\x00b"}
    assert outsider.call("POST", "/_matrix/client/v3/user_directory/search", term)["results"] == []


@pytest.mark.parametrize("value", [2**63, 2**64 - 1])
def test_a_number_beyond_a_64_bit_integer_is_refused_not_a_500(server: ServerProcess, value) -> None:
    """A room-key backup's counters are stored in BIGINT columns: 2^63 and above made
    psycopg (out of range) and sqlite3 (OverflowError) fail with a 500. Any statement
    the database refuses for such a value is now a 400 M_INVALID_PARAM, and nothing of
    the request is kept."""
    user = server.client().register()
    info = {"algorithm": "m.megolm_backup.v1.curve25519-aes-sha2", "auth_data": {"public_key": "abc", "signatures": {}}}
    version = user.call("POST", "/_matrix/client/v3/room_keys/version", info)["version"]
    session = {"first_message_index": value, "forwarded_count": 0, "is_verified": False,
               "session_data": {"ciphertext": "c", "ephemeral": "e", "mac": "m"}}
    room = "!room:localhost"
    with pytest.raises(MatrixError) as err:
        user.call("PUT", "/_matrix/client/v3/room_keys/keys",
                  {"rooms": {room: {"sessions": {"sid": session, "other": {**session, "first_message_index": 1}}}}},
                  params={"version": version})
    assert err.value.status == 400 and err.value.errcode == "M_INVALID_PARAM"
    assert user.call("GET", "/_matrix/client/v3/room_keys/keys", params={"version": version}) == {"rooms": {}}
    assert user.call("GET", "/_matrix/client/v3/room_keys/version")["count"] == 0
