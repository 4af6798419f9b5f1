"""Push rules (CRUD and evaluation), /notifications, and pushers to a real HTTP gateway."""

from __future__ import annotations

import json
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import quote

import pytest

from tests.harness import MatrixError, ServerProcess, free_port


def test_default_ruleset_and_crud(server: ServerProcess) -> None:
    user = server.client().register()
    rules = user.call("GET", "/_matrix/client/v3/pushrules/")["global"]
    assert [r["rule_id"] for r in rules["override"]][:2] == [".m.rule.master", ".m.rule.suppress_notices"]
    assert rules["underride"][-1]["rule_id"] == ".m.rule.encrypted"
    assert user.call("GET", "/_matrix/client/v3/pushrules/global/") == rules
    since = user.sync()["next_batch"]
    cond = [{"kind": "event_match", "key": "content.body", "pattern": "deploy*"}]
    user.call("PUT", "/_matrix/client/v3/pushrules/global/override/deploys",
              {"conditions": cond, "actions": ["notify", {"set_tweak": "highlight"}]})
    user.call("PUT", "/_matrix/client/v3/pushrules/global/override/first", {"conditions": [], "actions": []},
              params={"before": "deploys"})
    override = user.call("GET", "/_matrix/client/v3/pushrules/global/")["override"]
    assert [r["rule_id"] for r in override][:3] == [".m.rule.master", "first", "deploys"]  # user rules beat defaults
    rule = user.call("GET", "/_matrix/client/v3/pushrules/global/override/deploys")
    assert rule["conditions"] == cond and rule["default"] is False and rule["enabled"] is True
    user.call("PUT", "/_matrix/client/v3/pushrules/global/override/deploys/enabled", {"enabled": False})
    assert user.call("GET", "/_matrix/client/v3/pushrules/global/override/deploys/enabled") == {"enabled": False}
    user.call("PUT", "/_matrix/client/v3/pushrules/global/override/deploys/actions", {"actions": ["notify"]})
    assert user.call("GET", "/_matrix/client/v3/pushrules/global/override/deploys/actions") == {"actions": ["notify"]}
    user.call("PUT", "/_matrix/client/v3/pushrules/global/underride/.m.rule.message/enabled", {"enabled": False})
    assert user.call("GET", "/_matrix/client/v3/pushrules/global/underride/.m.rule.message")["enabled"] is False
    events = user.sync(since=since)["account_data"]["events"]
    assert any(e["type"] == "m.push_rules" for e in events)  # clients learn of changes through sync
    user.call("DELETE", "/_matrix/client/v3/pushrules/global/override/first")
    for method, path, body, status in [
        ("DELETE", "/_matrix/client/v3/pushrules/global/override/.m.rule.master", None, 400),
        ("GET", "/_matrix/client/v3/pushrules/global/override/nope", None, 404),
        ("PUT", "/_matrix/client/v3/pushrules/global/override/.mine", {"actions": []}, 400),
        ("PUT", "/_matrix/client/v3/pushrules/global/weird/x", {"actions": []}, 400),
        ("PUT", "/_matrix/client/v3/pushrules/global/content/x", {"actions": ["notify"]}, 400),
        ("PUT", "/_matrix/client/v3/pushrules/global/override/x", {"actions": ["explode"]}, 400),
        ("PUT", "/_matrix/client/v3/pushrules/global/override/y", {"actions": []}, None),
    ]:
        if status is None:
            resp = user.raw("PUT", path, json=body, params={"after": "missing-rule"})
            assert resp.status_code == 400
            continue
        with pytest.raises(MatrixError) as err:
            user.call(method, path, body)
        assert err.value.status == status, path


def test_rules_drive_unread_counts_and_notifications(server: ServerProcess) -> None:
    alice, bob = server.client().register(), server.client().register()
    room = alice.create_room(invite=[bob.user_id])
    bob.join(room)
    quiet = alice.create_room(invite=[bob.user_id])
    bob.join(quiet)
    bob.call("PUT", f"/_matrix/client/v3/pushrules/global/room/{quiet}", {"actions": []})  # mute a room
    bob.call("PUT", "/_matrix/client/v3/pushrules/global/content/release",
             {"pattern": "release", "actions": ["notify", {"set_tweak": "highlight"}]})
    since = bob.sync()["next_batch"]
    alice.send(room, "hello")
    alice.send(room, "the release is out")
    alice.send(room, {"msgtype": "m.text", "body": "edit", "m.new_content": {"body": "x"},
                      "m.relates_to": {"rel_type": "m.replace", "event_id": "$whatever"}})
    alice.send(quiet, "shh")
    sync = bob.sync(since=since)["rooms"]["join"]
    assert sync[room]["unread_notifications"] == {"notification_count": 2, "highlight_count": 1}
    assert sync[quiet]["unread_notifications"] == {"notification_count": 0, "highlight_count": 0}
    notes = bob.call("GET", "/_matrix/client/v3/notifications")["notifications"]
    # newest first; the invites that brought bob in notified him too (.m.rule.invite_for_me)
    assert [n["event"]["content"].get("body", n["event"]["type"]) for n in notes] == [
        "the release is out", "hello", "m.room.member", "m.room.member"]
    assert notes[0]["read"] is False and notes[0]["room_id"] == room and "notify" in notes[0]["actions"]
    highlights = bob.call("GET", "/_matrix/client/v3/notifications", params={"only": "highlight"})["notifications"]
    assert [n["event"]["content"]["body"] for n in highlights] == ["the release is out"]
    page = bob.call("GET", "/_matrix/client/v3/notifications", params={"limit": 1})
    rest = bob.call("GET", "/_matrix/client/v3/notifications", params={"from": page["next_token"], "limit": 1})
    assert [n["event"]["content"]["body"] for n in rest["notifications"]] == ["hello"]
    # master rule: nothing notifies from now on. What bob was already notified of stays
    # in his counts until he reads it (rules are applied when an event arrives; see
    # test_unread_highlight_is_not_recounted_when_rules_change in test_nio_messaging.py).
    bob.call("PUT", "/_matrix/client/v3/pushrules/global/override/.m.rule.master/enabled", {"enabled": True})
    since = bob.sync()["next_batch"]
    alice.send(room, "anyone?")
    counts = bob.sync(since=since)["rooms"]["join"][room]["unread_notifications"]
    assert counts == {"notification_count": 2, "highlight_count": 1}  # "anyone?" added nothing


def test_notifications_read_flag_follows_threads(server: ServerProcess) -> None:
    """/notifications' ``read``: a reply in a thread is read once bob posts in that
    thread (sending an event updates the sender's read receipt), a main-timeline
    message only once he writes outside threads."""
    alice, bob = server.client().register(), server.client().register()
    room = alice.create_room(invite=[bob.user_id])
    bob.join(room)
    root = alice.send(room, "root")
    in_thread = {"msgtype": "m.text", "body": "reply", "m.relates_to": {"rel_type": "m.thread", "event_id": root}}
    reply = alice.send(room, in_thread)
    main = alice.send(room, "main")

    def read_flags() -> dict[str, bool]:
        notes = bob.call("GET", "/_matrix/client/v3/notifications")["notifications"]
        return {n["event"]["event_id"]: n["read"] for n in notes if n["event"]["event_id"] in (root, reply, main)}

    assert read_flags() == {root: False, reply: False, main: False}
    bob.send(room, {**in_thread, "body": "bob in the thread"})
    assert read_flags() == {root: False, reply: True, main: False}
    bob.send(room, "bob outside threads")
    assert read_flags() == {root: True, reply: True, main: True}


class Gateway:
    """A real HTTP push gateway on localhost that records what it receives."""

    def __init__(self) -> None:
        self.received: list[dict] = []
        self.rejected: set[str] = set()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                outer.received.append(body)
                keys = [d["pushkey"] for d in body["notification"]["devices"] if d["pushkey"] in outer.rejected]
                payload = json.dumps({"rejected": keys}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, *args: object) -> None:
                pass

        self.port = free_port()
        self.httpd = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/_matrix/push/v1/notify"

    def wait(self, count: int, timeout: float = 10) -> list[dict]:
        deadline = time.monotonic() + timeout
        while len(self.received) < count and time.monotonic() < deadline:
            time.sleep(0.05)
        return self.received

    def close(self) -> None:
        self.httpd.shutdown()


def test_pushers_deliver_to_gateway(make_server) -> None:
    gateway = Gateway()
    try:
        srv: ServerProcess = make_server(push={"gateway_url_prefixes": [f"http://127.0.0.1:{gateway.port}/"],
                                               "full_notifications": True})
        alice, bob = srv.client().register(), srv.client().register()
        room = alice.create_room(name="Pushy", invite=[bob.user_id])
        bob.join(room)
        pusher = {"pushkey": "device-token-1", "kind": "http", "app_id": "org.example.app", "app_display_name": "App",
                  "device_display_name": "Phone", "lang": "en", "data": {"url": gateway.url}}
        bob.call("POST", "/_matrix/client/v3/pushers/set", pusher)
        listed = bob.call("GET", "/_matrix/client/v3/pushers")["pushers"]
        assert listed[0]["pushkey"] == "device-token-1" and listed[0]["data"]["url"] == gateway.url
        alice.send(room, "ping bob")
        received = gateway.wait(1)
        assert len(received) == 1
        note = received[0]["notification"]
        assert note["room_id"] == room and note["sender"] == alice.user_id and note["content"]["body"] == "ping bob"
        assert note["room_name"] == "Pushy" and note["counts"]["unread"] == 1
        assert note["devices"][0]["pushkey"] == "device-token-1" and "url" not in note["devices"][0]["data"]
        bob.send(room, "bob's own message does not push to bob")
        time.sleep(0.5)
        assert len(gateway.received) == 1
        # event_id_only keeps content off the gateway
        bob.call("POST", "/_matrix/client/v3/pushers/set", {**pusher, "data": {"url": gateway.url, "format": "event_id_only"}})
        alice.send(room, "private words")
        note = gateway.wait(2)[1]["notification"]
        assert "content" not in note and "sender" not in note and note["event_id"]
        # a gateway that rejects the pushkey removes the pusher
        gateway.rejected.add("device-token-1")
        alice.send(room, "last one")
        gateway.wait(3)
        deadline = time.monotonic() + 5
        while bob.call("GET", "/_matrix/client/v3/pushers")["pushers"] and time.monotonic() < deadline:
            time.sleep(0.1)
        assert bob.call("GET", "/_matrix/client/v3/pushers")["pushers"] == []
        # kind null deletes; gateways outside the configured prefixes are refused
        with pytest.raises(MatrixError) as err:
            bob.call("POST", "/_matrix/client/v3/pushers/set", {**pusher, "data": {"url": "http://10.0.0.1/_matrix/push/v1/notify"}})
        assert err.value.status == 403
    finally:
        gateway.close()


def test_by_default_nothing_of_a_message_reaches_the_gateway(make_server) -> None:
    """Without ``push.full_notifications`` a pusher asking for full notifications gets
    event_id_only ones: the gateway — and the phone vendor's push service behind it —
    learns which event to fetch, not what it says, who sent it or where."""
    gateway = Gateway()
    try:
        srv: ServerProcess = make_server(push={"gateway_url_prefixes": [f"http://127.0.0.1:{gateway.port}/"]})
        alice, bob = srv.client().register(), srv.client().register()
        alice.call("PUT", f"/_matrix/client/v3/profile/{quote(alice.user_id)}/displayname", {"displayname": "Alice Secret"})
        room = alice.create_room(name="Merger Talks", invite=[bob.user_id])
        bob.join(room)
        bob.call("POST", "/_matrix/client/v3/pushers/set", {
            "pushkey": "device-token-2", "kind": "http", "app_id": "org.example.app", "app_display_name": "App",
            "device_display_name": "Phone", "lang": "en",
            "data": {"url": gateway.url, "default_payload": {"aps": {"mutable-content": 1}}}})
        plain = alice.send(room, "the offer is 42 million")
        mention = alice.send(room, {"msgtype": "m.text", "body": "bob, please read", "m.mentions": {"user_ids": [bob.user_id]}})
        received = gateway.wait(2)
        assert len(received) == 2
        raw = json.dumps(received)
        for secret in ("42 million", "please read", "Alice Secret", "Merger Talks", alice.user_id, "m.room.message"):
            assert secret not in raw, secret
        # (with several workers the two may arrive in either order)
        by_event = {r["notification"]["event_id"]: r["notification"] for r in received}
        first, second = by_event[plain], by_event[mention]
        assert first["room_id"] == room and first["counts"] == {"unread": 1} and first["prio"] == "low"
        assert second["counts"] == {"unread": 2} and second["prio"] == "high"  # a mention: a highlight
        device = first["devices"][0]
        assert device["pushkey"] == "device-token-2" and device["data"] == {
            "format": "event_id_only", "default_payload": {"aps": {"mutable-content": 1}}}
        # what the client registered is what it reads back
        listed = bob.call("GET", "/_matrix/client/v3/pushers")["pushers"][0]
        assert "format" not in listed["data"]
    finally:
        gateway.close()


def test_pushers_refused_without_configured_gateway(server: ServerProcess) -> None:
    user = server.client().register()
    with pytest.raises(MatrixError) as err:
        user.call("POST", "/_matrix/client/v3/pushers/set", {
            "pushkey": "k", "kind": "http", "app_id": "a", "app_display_name": "A", "device_display_name": "D",
            "lang": "en", "data": {"url": "https://push.example.org/_matrix/push/v1/notify"}})
    assert err.value.status == 403


def _stored_push_actions(srv: ServerProcess) -> list[tuple[int | None, str | None]]:
    query = ("SELECT actions_preset, actions FROM event_push_actions "
             "UNION ALL SELECT actions_preset, actions FROM event_push_actions_staging")
    if srv.database_url.startswith("sqlite:///"):
        import sqlite3

        with sqlite3.connect(srv.database_url[len("sqlite:///"):]) as conn:
            return list(conn.execute(query).fetchall())
    import psycopg

    with psycopg.connect(srv.database_url) as conn:
        return list(conn.execute(query).fetchall())


def test_notifications_keep_the_actions_of_the_time_without_storing_user_rules_in_clear(make_server) -> None:
    """/notifications shows the actions that applied when the event arrived. Those of a
    user's own rule can hold what the user wrote (rules are encrypted at rest), so they
    are stored sealed; the server-default action lists are stored as a number."""
    srv: ServerProcess = make_server()
    alice, bob = srv.client().register(), srv.client().register()
    room = alice.create_room(invite=[bob.user_id])
    bob.join(room)
    tweak = "chime-" + uuid.uuid4().hex
    bob.call("PUT", "/_matrix/client/v3/pushrules/global/override/lunch", {
        "conditions": [{"kind": "event_match", "key": "content.body", "pattern": "*lunch*"}],
        "actions": ["notify", {"set_tweak": "sound", "value": tweak}]})
    alice.send(room, "lunch?")
    alice.send(room, "or later")
    bob.call("DELETE", "/_matrix/client/v3/pushrules/global/override/lunch")
    notified = bob.call("GET", "/_matrix/client/v3/notifications")["notifications"]
    assert [(n["event"]["content"]["body"], n["actions"]) for n in notified[:2]] == [
        ("or later", ["notify", {"set_tweak": "sound", "value": "default"}]),  # .m.rule.room_one_to_one
        ("lunch?", ["notify", {"set_tweak": "sound", "value": tweak}]),  # the rule is gone, its decision stays
    ]
    assert srv.stop() == 0
    stored = _stored_push_actions(srv)
    assert not any(tweak in (actions or "") for _, actions in stored)
    assert [a for _, a in stored if a is not None] and all(a.startswith("enc:") for _, a in stored if a is not None)
    assert any(preset is not None and actions is None for preset, actions in stored)
