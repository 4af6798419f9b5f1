"""Relations: edits, threads, references, /relations and /threads."""

from __future__ import annotations

import json

import pytest

from tests.harness import MatrixError, MatrixHttp, ServerProcess


def edit(original: str, text: str) -> dict:
    return {"msgtype": "m.text", "body": f"* {text}", "m.new_content": {"msgtype": "m.text", "body": text},
            "m.relates_to": {"rel_type": "m.replace", "event_id": original}}


def thread_reply(root: str, text: str) -> dict:
    return {"msgtype": "m.text", "body": text, "m.relates_to": {"rel_type": "m.thread", "event_id": root}}


def test_edits_are_bundled_not_applied(room_pair) -> None:
    alice, bob, room = room_pair
    original = alice.send(room, "I like cake")
    alice.send(room, edit(original, "I like chocolate cake"))
    latest = alice.send(room, edit(original, "I like lemon cake"))
    bob.send(room, edit(original, "bob cannot edit alice"))  # invalid: other sender, ignored
    event = bob.call("GET", f"/_matrix/client/v3/rooms/{room}/event/{original}")
    assert event["content"]["body"] == "I like cake"  # content is left intact
    replace = event["unsigned"]["m.relations"]["m.replace"]
    assert replace["event_id"] == latest and replace["content"]["m.new_content"]["body"] == "I like lemon cake"
    page = bob.call("GET", f"/_matrix/client/v3/rooms/{room}/messages", params={"dir": "b", "limit": 20})
    in_page = {e["event_id"]: e for e in page["chunk"]}
    assert in_page[original]["unsigned"]["m.relations"]["m.replace"]["event_id"] == latest
    # Redacting the original drops the edit aggregation.
    alice.call("PUT", f"/_matrix/client/v3/rooms/{room}/redact/{original}/r1", {})
    event = bob.call("GET", f"/_matrix/client/v3/rooms/{room}/event/{original}")
    assert "m.relations" not in event["unsigned"]


def test_a_redacted_child_is_de_aggregated(room_pair) -> None:
    """Spec: when a child event is redacted the relationship is broken — the edit reverts,
    the thread loses the reply, /relations no longer lists it."""
    alice, bob, room = room_pair
    original = alice.send(room, "draft")
    first = alice.send(room, edit(original, "better draft"))
    second = alice.send(room, edit(original, "best draft"))
    reply = bob.send(room, thread_reply(original, "looks good"))
    alice.call("PUT", f"/_matrix/client/v3/rooms/{room}/redact/{second}/undo-edit", {})
    bob.call("PUT", f"/_matrix/client/v3/rooms/{room}/redact/{reply}/undo-reply", {})
    event = bob.call("GET", f"/_matrix/client/v3/rooms/{room}/event/{original}")
    relations = event["unsigned"]["m.relations"]
    assert relations["m.replace"]["event_id"] == first  # back to the edit before the redacted one
    assert "m.thread" not in relations
    listed = bob.call("GET", f"/_matrix/client/v1/rooms/{room}/relations/{original}")["chunk"]
    assert [e["event_id"] for e in listed] == [first]


def test_thread_summary_relations_and_threads_list(room_pair) -> None:
    alice, bob, room = room_pair
    root = alice.send(room, "thread root")
    other_root = bob.send(room, "bob's root")
    replies = [bob.send(room, thread_reply(root, f"reply {i}")) for i in range(3)]
    alice.send(room, thread_reply(other_root, "alice replies to bob"))
    summary = alice.call("GET", f"/_matrix/client/v3/rooms/{room}/event/{root}")["unsigned"]["m.relations"]["m.thread"]
    assert summary["count"] == 3 and summary["current_user_participated"] is True
    assert summary["latest_event"]["event_id"] == replies[-1]
    third = MatrixHttp(alice.base_url, alice.server_name).register()
    alice.invite(room, third.user_id)
    third.join(room)
    assert third.call("GET", f"/_matrix/client/v3/rooms/{room}/event/{root}")["unsigned"]["m.relations"]["m.thread"]["current_user_participated"] is False

    rel = alice.call("GET", f"/_matrix/client/v1/rooms/{room}/relations/{root}")
    assert [e["event_id"] for e in rel["chunk"]] == replies[::-1]
    paged = alice.call("GET", f"/_matrix/client/v1/rooms/{room}/relations/{root}/m.thread", params={"limit": 2})
    assert [e["event_id"] for e in paged["chunk"]] == replies[:0:-1]
    rest = alice.call("GET", f"/_matrix/client/v1/rooms/{room}/relations/{root}/m.thread", params={"from": paged["next_batch"]})
    assert [e["event_id"] for e in rest["chunk"]] == [replies[0]]
    forward = alice.call("GET", f"/_matrix/client/v1/rooms/{room}/relations/{root}/m.thread/m.room.message", params={"dir": "f"})
    assert [e["event_id"] for e in forward["chunk"]] == replies
    assert alice.call("GET", f"/_matrix/client/v1/rooms/{room}/relations/{root}/m.replace")["chunk"] == []

    all_threads = alice.call("GET", f"/_matrix/client/v1/rooms/{room}/threads")
    assert [e["event_id"] for e in all_threads["chunk"]] == [other_root, root]  # most recent activity first
    assert all_threads["chunk"][1]["unsigned"]["m.relations"]["m.thread"]["count"] == 3
    mine = third.call("GET", f"/_matrix/client/v1/rooms/{room}/threads", params={"include": "participated"})
    assert mine["chunk"] == []
    page = alice.call("GET", f"/_matrix/client/v1/rooms/{room}/threads", params={"limit": 1})
    assert len(page["chunk"]) == 1
    page2 = alice.call("GET", f"/_matrix/client/v1/rooms/{room}/threads", params={"limit": 1, "from": page["next_batch"]})
    assert [e["event_id"] for e in page2["chunk"]] == [root]


def test_thread_from_a_relation_is_refused(room_pair) -> None:
    alice, _, room = room_pair
    root = alice.send(room, "root")
    reply = alice.send(room, thread_reply(root, "in thread"))
    with pytest.raises(MatrixError) as err:
        alice.send(room, thread_reply(reply, "thread off a thread reply"))
    assert err.value.status == 400 and err.value.errcode == "M_UNKNOWN"


def test_duplicate_annotation_is_refused_until_the_first_is_redacted(room_pair) -> None:
    alice, bob, room = room_pair
    target = alice.send(room, "vote")

    def react(key: str, event_type: str = "m.reaction") -> str:
        return bob.send(room, {"m.relates_to": {"rel_type": "m.annotation", "event_id": target, "key": key}}, event_type)

    first = react("👍")
    with pytest.raises(MatrixError) as err:
        react("👍")
    assert err.value.status == 400 and err.value.errcode == "M_DUPLICATE_ANNOTATION"
    react("👍", "org.example.vote")  # same key, another event type: a different annotation
    bob.call("PUT", f"/_matrix/client/v3/rooms/{room}/redact/{first}/undo", {})
    react("👍")  # taken back, so it may be given again
    with pytest.raises(MatrixError) as err:
        react("👍")
    assert err.value.errcode == "M_DUPLICATE_ANNOTATION"


def test_references_and_recursion(room_pair) -> None:
    alice, _, room = room_pair
    root = alice.send(room, "poll")
    ref = alice.send(room, {"msgtype": "m.text", "body": "vote", "m.relates_to": {"rel_type": "m.reference", "event_id": root}})
    edit_of_ref = alice.send(room, edit(ref, "vote!"))
    event = alice.call("GET", f"/_matrix/client/v3/rooms/{room}/event/{root}")
    assert event["unsigned"]["m.relations"]["m.reference"] == {"chunk": [{"event_id": ref}]}
    flat = alice.call("GET", f"/_matrix/client/v1/rooms/{room}/relations/{root}")
    assert [e["event_id"] for e in flat["chunk"]] == [ref]
    deep = alice.call("GET", f"/_matrix/client/v1/rooms/{room}/relations/{root}", params={"recurse": "true"})
    assert {e["event_id"] for e in deep["chunk"]} == {ref, edit_of_ref} and deep["recursion_depth"] >= 1


def test_relations_need_access(room_pair, server: ServerProcess) -> None:
    alice, _, room = room_pair
    root = alice.send(room, "private")
    outsider = server.client().register()
    with pytest.raises(MatrixError) as err:
        outsider.call("GET", f"/_matrix/client/v1/rooms/{room}/relations/{root}")
    assert err.value.status == 403
    with pytest.raises(MatrixError) as err:
        alice.call("GET", f"/_matrix/client/v1/rooms/{room}/relations/$missing")
    assert err.value.status == 404


def test_limited_sync_carries_bundles(room_pair) -> None:
    alice, bob, room = room_pair
    root = alice.send(room, "root")
    for i in range(2):
        bob.send(room, thread_reply(root, f"r{i}"))
    for i in range(12):
        bob.send(room, f"filler {i}")
    data = alice.sync(filter=json.dumps({"room": {"timeline": {"limit": 20}}}))["rooms"]["join"][room]
    assert data["timeline"]["limited"] is True
    root_event = next(e for e in data["timeline"]["events"] if e["event_id"] == root)
    assert root_event["unsigned"]["m.relations"]["m.thread"]["count"] == 2


@pytest.mark.parametrize("target", [{}, [], {"a": 1}, 5, None])
def test_a_relation_whose_event_id_is_not_a_string_does_not_break_sync(room_pair, target) -> None:
    """``m.relates_to`` is the sender's content: a member could send one whose
    ``event_id`` is an object or a list. It relates to nothing, and /sync (limited,
    with that event in the timeline) must keep answering for every member of the room."""
    alice, bob, room = room_pair
    before = alice.sync()["next_batch"]
    for i in range(12):
        alice.send(room, f"filler {i}")
    odd = bob.send(room, {"msgtype": "m.text", "body": "odd", "m.relates_to": {"rel_type": "m.thread", "event_id": target}})
    for user in (alice, bob):
        for params in ({}, {"since": before}, {"full_state": "true", "since": before}):
            data = user.sync(**params)["rooms"]["join"][room]
            assert data["timeline"]["limited"] is True
            assert data["timeline"]["events"][-1]["event_id"] == odd
    thread = alice.call("GET", f"/_matrix/client/v1/rooms/{room}/threads")
    assert thread["chunk"] == []
