"""/sync details: filters, lazy loading, state deltas, sections, summaries, unread counts."""

from __future__ import annotations

import json

import pytest

from tests.harness import MatrixError, MatrixHttp, ServerProcess


@pytest.fixture
def pair(server: ServerProcess) -> tuple[MatrixHttp, MatrixHttp]:
    return server.client().register(), server.client().register()


def joined(sync: dict, room: str) -> dict:
    return sync["rooms"]["join"][room]


def test_stored_filter_round_trip_and_use(pair) -> None:
    alice, _ = pair
    body = {"room": {"timeline": {"limit": 2, "types": ["m.room.message"]}}, "presence": {"not_types": ["*"]}}
    filter_id = alice.call("POST", f"/_matrix/client/v3/user/{alice.user_id}/filter", body)["filter_id"]
    assert alice.call("GET", f"/_matrix/client/v3/user/{alice.user_id}/filter/{filter_id}") == body
    room = alice.create_room()
    for i in range(4):
        alice.send(room, f"f{i}")
    timeline = joined(alice.sync(filter=filter_id), room)["timeline"]
    assert [e["content"]["body"] for e in timeline["events"]] == ["f2", "f3"]
    assert timeline["limited"] is True
    with pytest.raises(MatrixError) as err:
        alice.call("POST", f"/_matrix/client/v3/user/{alice.user_id}/filter", {"room": {"timeline": {"limit": -1}}})
    assert err.value.errcode == "M_BAD_JSON"
    with pytest.raises(MatrixError) as err:
        alice.call("GET", "/_matrix/client/v3/user/@someone:localhost/filter/0")
    assert err.value.status == 403
    with pytest.raises(MatrixError) as err:
        alice.sync(filter="999999")
    assert err.value.status == 400


def test_timeline_type_filter_finds_a_message_behind_many_other_events(pair) -> None:
    """A filter for m.room.message in a room whose newest hundreds of events are of other
    types (a big room's joins, say) still finds the room's message, and the timeline is
    not limited when there is nothing more to find: the types are selected in the
    database query, not by reading a bounded number of every kind of event."""
    alice, _ = pair
    room = alice.create_room()
    alice.send(room, "the one message")
    for i in range(260):  # more than the recent events in memory and five scan rounds of 30
        alice.send(room, {"n": i}, event_type="org.example.noise")
    flt = json.dumps({"room": {"timeline": {"limit": 10, "types": ["m.room.message"]}}})
    timeline = joined(alice.sync(filter=flt), room)["timeline"]
    assert [e["content"]["body"] for e in timeline["events"]] == ["the one message"]
    assert timeline["limited"] is False


def test_initial_sync_state_is_at_start_of_timeline(pair) -> None:
    alice, _ = pair
    room = alice.create_room(name="old name")
    alice.call("PUT", f"/_matrix/client/v3/rooms/{room}/state/m.room.name/", {"name": "new name"})
    alice.send(room, "after rename")
    sync = alice.sync(filter=json.dumps({"room": {"timeline": {"limit": 2}}}))
    data = joined(sync, room)
    timeline_types = [e["type"] for e in data["timeline"]["events"]]
    assert timeline_types == ["m.room.name", "m.room.message"]
    state_names = [e["content"]["name"] for e in data["state"]["events"] if e["type"] == "m.room.name"]
    assert state_names == ["old name"]  # the state before the timeline, not after
    renamed = data["timeline"]["events"][0]
    assert renamed["unsigned"]["prev_content"] == {"name": "old name"}


def test_use_state_after(pair) -> None:
    alice, _ = pair
    room = alice.create_room(name="one")
    alice.call("PUT", f"/_matrix/client/v3/rooms/{room}/state/m.room.name/", {"name": "two"})
    sync = alice.sync(use_state_after="true", filter=json.dumps({"room": {"timeline": {"limit": 1}}}))
    data = joined(sync, room)
    assert "state" not in data
    names = [e["content"]["name"] for e in data["state_after"]["events"] if e["type"] == "m.room.name"]
    assert names == ["two"]


def test_limited_incremental_sync_carries_state_delta(pair) -> None:
    alice, bob = pair
    room = alice.create_room(invite=[bob.user_id])
    bob.join(room)
    since = bob.sync()["next_batch"]
    alice.call("PUT", f"/_matrix/client/v3/rooms/{room}/state/m.room.topic/", {"topic": "in the gap"})
    for i in range(10):
        alice.send(room, f"g{i}")
    data = joined(bob.sync(since=since, filter=json.dumps({"room": {"timeline": {"limit": 3}}})), room)
    assert data["timeline"]["limited"] is True
    topics = [e["content"]["topic"] for e in data["state"]["events"] if e["type"] == "m.room.topic"]
    assert topics == ["in the gap"]


def test_lazy_loading_members(server: ServerProcess) -> None:
    users = [server.client().register() for _ in range(8)]
    alice, carol = users[0], users[2]
    room = alice.create_room(name="named", invite=[u.user_id for u in users[1:]])
    for u in users[1:]:
        u.join(room)
    carol.send(room, "only carol speaks")
    lazy = json.dumps({"room": {"state": {"lazy_load_members": True}, "timeline": {"limit": 1}}})
    data = joined(alice.sync(filter=lazy), room)
    members = {e["state_key"] for e in data["state"]["events"] if e["type"] == "m.room.member"}
    assert members == {alice.user_id, carol.user_id}  # the sender and the syncing user only
    assert data["summary"]["m.joined_member_count"] == 8
    full = joined(alice.sync(filter=json.dumps({"room": {"timeline": {"limit": 1}}})), room)
    assert {e["state_key"] for e in full["state"]["events"] if e["type"] == "m.room.member"} == {u.user_id for u in users}
    # /members gives the full list when a lazy client needs it.
    chunk = alice.call("GET", f"/_matrix/client/v3/rooms/{room}/members")["chunk"]
    assert {e["state_key"] for e in chunk} == {u.user_id for u in users}
    only_joined = alice.call("GET", f"/_matrix/client/v3/rooms/{room}/members", params={"membership": "join"})["chunk"]
    assert len(only_joined) == 8
    # Incremental lazy sync: a new sender's membership arrives with their first message, once.
    since = alice.sync(filter=lazy)["next_batch"]
    users[5].send(room, "hello from dave")
    data = joined(alice.sync(since=since, filter=lazy), room)
    assert [e["content"]["body"] for e in data["timeline"]["events"]] == ["hello from dave"]
    assert [e["state_key"] for e in data["state"]["events"]] == [users[5].user_id]
    since = alice.sync(since=since, filter=lazy)["next_batch"]
    users[5].send(room, "dave again")
    data = joined(alice.sync(since=since, filter=lazy), room)
    assert data["state"]["events"] == []  # already sent: redundant members are skipped
    # An unnamed room lists heroes, and their member events come with lazy loading.
    unnamed = alice.create_room(invite=[users[1].user_id])
    users[1].join(unnamed)
    data = joined(alice.sync(filter=lazy), unnamed)
    assert data["summary"]["m.heroes"] == [users[1].user_id]
    assert users[1].user_id in {e["state_key"] for e in data["state"]["events"] if e["type"] == "m.room.member"}


def test_leave_section_and_include_leave(pair) -> None:
    alice, bob = pair
    room = alice.create_room(invite=[bob.user_id])
    bob.join(room)
    since = bob.sync()["next_batch"]
    alice.send(room, "bye bob")
    alice.call("POST", f"/_matrix/client/v3/rooms/{room}/kick", {"user_id": bob.user_id})
    alice.send(room, "he is gone")
    sync = bob.sync(since=since)
    left = sync["rooms"]["leave"][room]
    bodies = [e["content"].get("body") for e in left["timeline"]["events"] if e["type"] == "m.room.message"]
    assert bodies == ["bye bob"]
    assert left["timeline"]["events"][-1]["type"] == "m.room.member"
    assert room not in sync["rooms"].get("join", {})
    fresh = bob.sync()
    assert room not in fresh["rooms"].get("leave", {})
    with_leave = bob.sync(filter=json.dumps({"room": {"include_leave": True}}))
    assert room in with_leave["rooms"]["leave"]
    bob.call("POST", f"/_matrix/client/v3/rooms/{room}/forget", {})
    assert room not in bob.sync(filter=json.dumps({"room": {"include_leave": True}}))["rooms"].get("leave", {})


def test_forget_requires_leaving_first(pair) -> None:
    alice, _ = pair
    room = alice.create_room()
    with pytest.raises(MatrixError) as err:
        alice.call("POST", f"/_matrix/client/v3/rooms/{room}/forget", {})
    assert err.value.status == 400


def test_summary_heroes_and_unread_counts(pair, server: ServerProcess) -> None:
    alice, bob = pair
    room = alice.create_room(invite=[bob.user_id])
    bob.join(room)
    since = alice.sync()["next_batch"]
    bob.send(room, "one")
    bob.send(room, "two")
    bob.send(room, {"msgtype": "m.text", "body": "hey alice", "m.mentions": {"user_ids": [alice.user_id]}})
    bob.send(room, {"msgtype": "m.notice", "body": "bot notice"})
    data = joined(alice.sync(since=since), room)
    assert data["summary"]["m.heroes"] == [bob.user_id]
    assert data["unread_notifications"] == {"notification_count": 3, "highlight_count": 1}
    since = alice.sync()["next_batch"]
    alice.send(room, "read it all")
    data = joined(alice.sync(since=since), room)
    assert data["unread_notifications"] == {"notification_count": 0, "highlight_count": 0}


def test_account_data_in_sync(pair) -> None:
    alice, _ = pair
    since = alice.sync()["next_batch"]
    room = alice.create_room()
    alice.call("PUT", f"/_matrix/client/v3/user/{alice.user_id}/account_data/m.direct", {"@x:localhost": [room]})
    alice.call("PUT", f"/_matrix/client/v3/user/{alice.user_id}/rooms/{room}/account_data/org.example.pref", {"v": 1})
    sync = alice.sync(since=since)
    assert {"type": "m.direct", "content": {"@x:localhost": [room]}} in sync["account_data"]["events"]
    assert joined(sync, room)["account_data"]["events"] == [{"type": "org.example.pref", "content": {"v": 1}}]
    assert alice.call("GET", f"/_matrix/client/v3/user/{alice.user_id}/account_data/m.direct") == {"@x:localhost": [room]}
    assert alice.sync()["account_data"]["events"][0]["type"] == "m.direct"  # initial sync includes it
    with pytest.raises(MatrixError) as err:
        alice.call("GET", f"/_matrix/client/v3/user/{alice.user_id}/account_data/never.set")
    assert err.value.status == 404


def test_full_state_and_newly_joined_room(pair) -> None:
    alice, bob = pair
    room = alice.create_room(name="full", invite=[bob.user_id])
    for i in range(3):
        alice.send(room, f"pre{i}")
    since = bob.sync()["next_batch"]
    bob.join(room)
    data = joined(bob.sync(since=since), room)
    names = [e for e in data["state"]["events"] + data["timeline"]["events"] if e["type"] == "m.room.name"]
    assert names, "a newly joined room must come with its state"
    # shared history: bob sees what was said before he joined
    assert any(e.get("content", {}).get("body") == "pre2" for e in data["timeline"]["events"])
    since = bob.sync()["next_batch"]
    full = bob.sync(since=since, full_state="true")
    assert any(e["type"] == "m.room.create" for e in joined(full, room)["state"]["events"])


def test_history_visibility_joined_hides_earlier_messages(pair) -> None:
    alice, bob = pair
    room = alice.create_room(invite=[bob.user_id], initial_state=[
        {"type": "m.room.history_visibility", "content": {"history_visibility": "joined"}}])
    alice.send(room, "before bob")
    bob.join(room)
    alice.send(room, "after bob")
    page = bob.call("GET", f"/_matrix/client/v3/rooms/{room}/messages", params={"dir": "b", "limit": 50})
    bodies = [e["content"].get("body") for e in page["chunk"] if e["type"] == "m.room.message"]
    assert bodies == ["after bob"]
    sync_bodies = [e["content"].get("body") for e in joined(bob.sync(), room)["timeline"]["events"] if e["type"] == "m.room.message"]
    assert sync_bodies == ["after bob"]


def test_context_and_event_fields(pair) -> None:
    alice, _ = pair
    room = alice.create_room()
    ids = [alice.send(room, f"c{i}") for i in range(7)]
    ctx = alice.call("GET", f"/_matrix/client/v3/rooms/{room}/context/{ids[3]}", params={"limit": 4})
    assert ctx["event"]["content"]["body"] == "c3"
    assert [e["content"]["body"] for e in ctx["events_before"]] == ["c2", "c1"]
    assert [e["content"]["body"] for e in ctx["events_after"]] == ["c4", "c5"]
    after = alice.call("GET", f"/_matrix/client/v3/rooms/{room}/messages", params={"dir": "f", "from": ctx["end"], "limit": 10})
    assert [e["content"]["body"] for e in after["chunk"]] == ["c6"]
    trimmed = alice.sync(filter=json.dumps({"event_fields": ["type", "content.body"], "room": {"timeline": {"limit": 1}}}))
    assert joined(trimmed, room)["timeline"]["events"] == [{"type": "m.room.message", "content": {"body": "c6"}}]


def test_profile_changes_propagate_to_member_events(pair) -> None:
    alice, bob = pair
    room = alice.create_room(invite=[bob.user_id])
    bob.join(room)
    since = bob.sync()["next_batch"]
    alice.call("PUT", f"/_matrix/client/v3/profile/{alice.user_id}/displayname", {"displayname": "Alice A."})
    assert alice.call("GET", f"/_matrix/client/v3/profile/{alice.user_id}") == {"displayname": "Alice A."}
    events = joined(bob.sync(since=since), room)["timeline"]["events"]
    member = [e for e in events if e["type"] == "m.room.member" and e["state_key"] == alice.user_id][-1]
    assert member["content"]["displayname"] == "Alice A." and member["content"]["membership"] == "join"
    with pytest.raises(MatrixError) as err:
        bob.call("PUT", f"/_matrix/client/v3/profile/{alice.user_id}/displayname", {"displayname": "hacked"})
    assert err.value.status == 403


def test_aliases(pair) -> None:
    alice, bob = pair
    room = alice.create_room(room_alias_name="team-chat", preset="private_chat")
    assert alice.call("GET", "/_matrix/client/v3/directory/room/%23team-chat:localhost")["room_id"] == room
    with pytest.raises(MatrixError) as err:
        alice.create_room(room_alias_name="team-chat")
    assert err.value.errcode == "M_ROOM_IN_USE"
    alice.call("PUT", "/_matrix/client/v3/directory/room/%23second:localhost", {"room_id": room})
    assert alice.call("GET", f"/_matrix/client/v3/rooms/{room}/aliases")["aliases"] == ["#second:localhost", "#team-chat:localhost"]
    with pytest.raises(MatrixError) as err:
        alice.call("PUT", f"/_matrix/client/v3/rooms/{room}/state/m.room.canonical_alias/", {"alias": "#nope:localhost"})
    assert err.value.errcode == "M_BAD_ALIAS"
    alice.call("PUT", f"/_matrix/client/v3/rooms/{room}/state/m.room.canonical_alias/", {"alias": "#second:localhost"})
    with pytest.raises(MatrixError) as err:
        bob.call("DELETE", "/_matrix/client/v3/directory/room/%23second:localhost")
    assert err.value.status == 403
    alice.call("DELETE", "/_matrix/client/v3/directory/room/%23second:localhost")
    with pytest.raises(MatrixError) as err:
        alice.call("GET", "/_matrix/client/v3/directory/room/%23second:localhost")
    assert err.value.status == 404
    # join by alias
    pub = alice.create_room(room_alias_name="lobby", initial_state=[{"type": "m.room.join_rules", "content": {"join_rule": "public"}}])
    assert bob.call("POST", "/_matrix/client/v3/join/%23lobby:localhost", {})["room_id"] == pub


def test_ignored_users(server: ServerProcess) -> None:
    alice, troll, friend = (server.client().register() for _ in range(3))
    room = alice.create_room(invite=[troll.user_id, friend.user_id], power_level_content_override={"state_default": 0})
    troll.join(room)
    friend.join(room)
    alice.call("PUT", f"/_matrix/client/v3/user/{alice.user_id}/account_data/m.ignored_user_list",
               {"ignored_users": {troll.user_id: {}}})
    since = alice.sync()["next_batch"]
    troll.send(room, "noise")
    friend.send(room, "signal")
    troll.call("PUT", f"/_matrix/client/v3/rooms/{room}/state/org.example.note/{troll.user_id}", {"x": 1})
    events = joined(alice.sync(since=since), room)["timeline"]["events"]
    assert [e.get("content", {}).get("body") for e in events if e["type"] == "m.room.message"] == ["signal"]
    assert any(e["type"] == "org.example.note" for e in events)  # state events still arrive
    page = alice.call("GET", f"/_matrix/client/v3/rooms/{room}/messages", params={"dir": "b", "limit": 5})
    assert "noise" not in [e["content"].get("body") for e in page["chunk"]]
    counts = joined(alice.sync(since=since), room)["unread_notifications"]
    assert counts["notification_count"] == 1
    other = troll.create_room(invite=[alice.user_id])
    assert other not in alice.sync(since=since)["rooms"].get("invite", {})  # invites from ignored users are dropped
    alice.call("PUT", f"/_matrix/client/v3/user/{alice.user_id}/account_data/m.ignored_user_list", {"ignored_users": {}})
    since = alice.sync()["next_batch"]
    troll.send(room, "heard again")
    assert [e["content"]["body"] for e in joined(alice.sync(since=since), room)["timeline"]["events"]] == ["heard again"]
