"""What users outside a room learn about it: only what history visibility grants.

Found by an access-control audit (2026-12-07) that planted a unique marker in every
secret and scanned every answer for markers the user must not see:

- the leave section of ``/sync`` sent a room's whole state to users who were never in
  it (an invite rejected, a ban before joining), while ``GET /state`` refused them;
- ``device_lists.left`` named the room's current members when the user left it —
  including people who joined after, and everyone when the user had only been
  invited;
- ``/search`` counted matches the user may not see (``"count": 1, "results": []`` for a
  word in messages sent before they joined a ``joined`` room): an oracle on hidden
  history.
"""

from __future__ import annotations

import json

import pytest

from tests.harness import MatrixHttp, ServerProcess

INCLUDE_LEAVE = json.dumps({"room": {"include_leave": True}})


def _private_room(owner: MatrixHttp, *members: MatrixHttp, visibility: str = "shared") -> str:
    room = owner.create_room(
        preset="private_chat", name="SECRET-NAME", topic="SECRET-TOPIC",
        initial_state=[
            {"type": "m.room.history_visibility", "content": {"history_visibility": visibility}},
            {"type": "com.example.custom", "state_key": "", "content": {"v": "SECRET-CUSTOM"}},
        ],
    )
    for member in members:
        owner.invite(room, member.user_id)
        member.join(room)
    return room


def _leave_section(user: MatrixHttp, room: str, **params: str) -> str:
    """The room's leave section of an initial sync, as text (to look for markers)."""
    return json.dumps(user.sync(filter=INCLUDE_LEAVE, **params)["rooms"].get("leave", {}).get(room, {}))


@pytest.mark.parametrize("params", [{}, {"use_state_after": "true"}], ids=["state", "state_after"])
def test_the_leave_section_shows_no_room_state_to_someone_who_never_joined(server: ServerProcess, params) -> None:
    alice, bob, dave, frank = (server.client().register() for _ in range(4))
    room = _private_room(alice, bob)
    bob.call("PUT", f"/_matrix/client/v3/rooms/{room}/state/m.room.member/{bob.user_id}",
             {"membership": "join", "displayname": "SECRET-NICK"})
    alice.invite(room, dave.user_id)
    dave.call("POST", f"/_matrix/client/v3/rooms/{room}/leave", {})  # rejects the invite
    alice.call("POST", f"/_matrix/client/v3/rooms/{room}/ban", {"user_id": frank.user_id})  # never joined
    for outsider, membership in ((dave, "leave"), (frank, "ban")):
        section = _leave_section(outsider, room, **params)
        for secret in ("SECRET-NAME", "SECRET-TOPIC", "SECRET-CUSTOM", "SECRET-NICK", bob.user_id):
            assert secret not in section, (outsider.user_id, secret)
        # Their own membership is there: it is how a client sees the room leave its list.
        state = json.loads(section)["state_after" if params else "state"]["events"]
        assert [(e["type"], e["state_key"], e["content"]["membership"]) for e in state] == [
            ("m.room.member", outsider.user_id, membership)
        ]


@pytest.mark.parametrize("params", [{}, {"use_state_after": "true"}], ids=["state", "state_after"])
def test_the_leave_section_shows_the_state_of_the_users_last_stay_and_nothing_newer(server: ServerProcess, params) -> None:
    """A member who left keeps the room's state as it was when they left (they saw it
    while in the room); what changed after — seen when invited back and declining — is
    not theirs."""
    alice, carol = (server.client().register() for _ in range(2))
    room = _private_room(alice, carol)
    carol.call("POST", f"/_matrix/client/v3/rooms/{room}/leave", {})
    section = _leave_section(carol, room, **params)
    assert "SECRET-NAME" in section and "SECRET-TOPIC" in section and "SECRET-CUSTOM" in section
    alice.call("PUT", f"/_matrix/client/v3/rooms/{room}/state/m.room.topic/", {"topic": "NEWER-TOPIC"})
    for i in range(12):  # the topic change falls out of the timeline, into the state
        alice.send(room, f"later {i}")
    alice.invite(room, carol.user_id)
    carol.call("POST", f"/_matrix/client/v3/rooms/{room}/leave", {})  # declines this time
    section = _leave_section(carol, room, **params)
    assert "SECRET-NAME" in section and "NEWER-TOPIC" not in section


def test_device_lists_left_names_only_the_members_shared_when_leaving(server: ServerProcess) -> None:
    alice, carol, hank, xavier, dave = (server.client().register() for _ in range(5))
    room = _private_room(alice, carol, hank)
    shared = alice.create_room()  # carol still shares a room with alice ...
    alice.invite(shared, carol.user_id)
    carol.join(shared)  # ... through this one
    carol_since = carol.sync()["next_batch"]
    dave_since = dave.sync()["next_batch"]
    carol.call("POST", f"/_matrix/client/v3/rooms/{room}/leave", {})
    alice.invite(room, xavier.user_id)
    xavier.join(room)  # joins after carol left: carol never shared the room with him
    alice.invite(room, dave.user_id)
    dave.call("POST", f"/_matrix/client/v3/rooms/{room}/leave", {})  # dave was only invited
    token = carol.sync()["next_batch"]
    assert carol.sync(since=carol_since)["device_lists"]["left"] == [hank.user_id]
    changes = carol.call("GET", "/_matrix/client/v3/keys/changes", params={"from": carol_since, "to": token})
    assert changes["left"] == [hank.user_id]
    assert dave.sync(since=dave_since)["device_lists"]["left"] == []


@pytest.mark.parametrize("encryption", [True, False], ids=["blind index", "full-text index"])
def test_search_neither_returns_nor_counts_what_the_user_may_not_see(make_server, encryption) -> None:
    srv: ServerProcess = make_server(encryption={"enabled": encryption})
    alice, erin, carol = (srv.client().register() for _ in range(3))  # carol: a second member
    room = _private_room(alice, carol, visibility="joined")
    alice.send(room, "needle before erin")
    alice.invite(room, erin.user_id)
    alice.send(room, "needle while erin is invited")
    erin.join(room)
    seen = alice.send(room, "needle after erin joined")
    carol.call("POST", f"/_matrix/client/v3/rooms/{room}/leave", {})
    later = alice.send(room, "needle after carol left")

    def search(user: MatrixHttp, term: str) -> tuple[int, list[str]]:
        found = user.call("POST", "/_matrix/client/v3/search", {"search_categories": {"room_events": {"search_term": term}}})
        events = found["search_categories"]["room_events"]
        return events["count"], [r["result"]["event_id"] for r in events["results"]]

    count, found = search(erin, "needle")
    assert (count, sorted(found)) == (2, sorted([seen, later]))
    assert search(erin, "before") == (0, [])
    assert search(erin, "invited") == (0, [])
    assert search(alice, "needle")[0] == 4
