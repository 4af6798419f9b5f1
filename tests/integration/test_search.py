"""POST /search over the database's full-text index."""

from __future__ import annotations

import pytest

from tests.harness import MatrixError, MatrixHttp, ServerProcess


def search(user: MatrixHttp, term: str, **extra) -> dict:
    body = {"search_categories": {"room_events": {"search_term": term, **extra}}}
    return user.call("POST", "/_matrix/client/v3/search", body)["search_categories"]["room_events"]


def test_search_ranked_recent_filters_and_context(server: ServerProcess) -> None:
    alice, bob = server.client().register(), server.client().register()
    room = alice.create_room(name="Quarterly planning", invite=[bob.user_id])
    bob.join(room)
    other = alice.create_room(name="Elsewhere")
    alice.send(room, "the budget meeting is on Tuesday")
    bob.send(room, "Budget numbers attached; budget is tight")
    alice.send(other, "budget talk in another room")
    alice.send(room, "lunch?")
    enc = {"algorithm": "m.megolm.v1.aes-sha2", "ciphertext": "budget budget", "sender_key": "x", "session_id": "y", "device_id": "D"}
    alice.send(room, enc, event_type="m.room.encrypted")

    found = search(alice, "budget")
    bodies = [r["result"]["content"]["body"] for r in found["results"]]
    assert found["count"] == 3 and len(bodies) == 3
    assert "budget" in found["highlights"]
    assert bodies[0] == "Budget numbers attached; budget is tight"  # two hits rank first
    recent = search(alice, "budget", order_by="recent")
    assert recent["results"][0]["result"]["content"]["body"] == "budget talk in another room"
    only_room = search(alice, "budget", filter={"rooms": [room], "senders": [bob.user_id]})
    assert [r["result"]["sender"] for r in only_room["results"]] == [bob.user_id]
    # bob is not in the other room: he never finds what was said there
    assert all(r["result"]["room_id"] == room for r in search(bob, "budget")["results"])
    assert search(alice, "ciphertext budget budget budget")["results"] == []
    assert search(alice, "quarterly", keys=["content.name"])["results"][0]["result"]["type"] == "m.room.name"
    with_context = search(alice, "lunch", event_context={"before_limit": 1, "after_limit": 1, "include_profile": True})
    ctx = with_context["results"][0]["context"]
    assert [e["content"]["body"] for e in ctx["events_before"]] == ["Budget numbers attached; budget is tight"]
    assert alice.user_id in ctx["profile_info"]
    grouped = search(alice, "budget", groupings={"group_by": [{"key": "room_id"}]}, include_state=True)
    assert set(grouped["groups"]["room_id"]) == {room, other}
    assert room in grouped["state"]


def test_search_pagination_and_redaction(server: ServerProcess) -> None:
    alice = server.client().register()
    room = alice.create_room()
    ids = [alice.send(room, f"needle number {i}") for i in range(5)]
    first = search(alice, "needle", order_by="recent", filter={"limit": 2})
    assert len(first["results"]) == 2 and "next_batch" in first
    seen = [r["result"]["event_id"] for r in first["results"]]
    token = first["next_batch"]
    while token:
        page = alice.call("POST", "/_matrix/client/v3/search", {"search_categories": {"room_events": {
            "search_term": "needle", "order_by": "recent", "filter": {"limit": 2}}}}, params={"next_batch": token})
        data = page["search_categories"]["room_events"]
        seen += [r["result"]["event_id"] for r in data["results"]]
        token = data.get("next_batch")
    assert seen == ids[::-1]
    alice.call("PUT", f"/_matrix/client/v3/rooms/{room}/redact/{ids[0]}/r", {})
    assert ids[0] not in [r["result"]["event_id"] for r in search(alice, "needle", filter={"limit": 10})["results"]]


def test_search_history_visibility_and_bad_input(server: ServerProcess) -> None:
    alice, bob = server.client().register(), server.client().register()
    room = alice.create_room(invite=[bob.user_id], initial_state=[
        {"type": "m.room.history_visibility", "content": {"history_visibility": "joined"}}])
    alice.send(room, "secret before bob joined")
    bob.join(room)
    alice.send(room, "secret after bob joined")
    assert [r["result"]["content"]["body"] for r in search(bob, "secret")["results"]] == ["secret after bob joined"]
    for body in ({}, {"search_categories": {"room_events": {}}}, {"search_categories": {"room_events": {"search_term": "x", "order_by": "random"}}},
                 {"search_categories": {"room_events": {"search_term": "x", "keys": ["content.other"]}}}):
        with pytest.raises(MatrixError) as err:
            alice.call("POST", "/_matrix/client/v3/search", body)
        assert err.value.status == 400
    # Query syntax is not interpreted
    assert search(alice, '"unbalanced AND OR NEAR( * -')["results"] == []
