"""Contract tests: real scenarios over HTTP, every response checked against the spec.

Each test drives one or more operations of the Matrix client-server API against a
running server and validates every response body with ``jsonschema`` (Draft 2020-12)
against the spec's schema for that operation and status code (bundled by
:mod:`tests.contract.spec_loader`); error responses are also checked against the
standard error schema (``errcode`` and ``error`` strings). A failure names the
operation (``operationId`` and path), the status, the schema violation with its JSON
path, and the request and response.

``@covers(...)`` records which operations a test exercises;
``test_every_implemented_operation_has_a_contract_test`` fails when the server gains a
spec'd route no test covers.

Tests for open server bugs are marked with ``known_bugs.xfail("BUG-n")`` (see
``known_bugs.py``); the tests for bugs found and fixed stay as ordinary regressions.
"""

from __future__ import annotations

import base64
import http.server
import json
import os
import struct
import sys
import threading
import uuid
import zlib
from collections.abc import Callable
from typing import Any
from urllib.parse import quote

import pytest
import signedjson.key
import signedjson.sign

from tests.contract import spec_loader
from tests.contract.validate import check_response, standard_error_schema, violations
from tests.harness import MatrixHttp, ServerProcess

pytestmark = pytest.mark.integration

V3 = "/_matrix/client/v3"


def covers(*operation_ids: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Declare the spec operations a test exercises (checked against the bundle at import)."""
    for operation_id in operation_ids:
        spec_loader.operation_by_id(operation_id)

    def mark(fn: Callable[..., Any]) -> Callable[..., Any]:
        fn.covers = operation_ids  # type: ignore[attr-defined]
        return fn

    return mark


def q(identifier: str) -> str:
    """Percent-encode an ID for a path segment ('#' and '/' must not reach the URL raw)."""
    return quote(identifier, safe="!@:$")


def expect(op: str, client: MatrixHttp, method: str, path: str, status: int = 200, **kwargs: Any) -> Any:
    """Send a request and validate its response for ``op``; return the parsed body."""
    return check_response(op, client.raw(method, path, **kwargs), status)


# -- fixtures ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def alice(server: ServerProcess) -> MatrixHttp:
    return server.client().register()


@pytest.fixture(scope="module")
def bob(server: ServerProcess) -> MatrixHttp:
    return server.client().register()


@pytest.fixture
def carol(server: ServerProcess) -> MatrixHttp:
    return server.client().register()


@pytest.fixture(scope="module")
def room(alice: MatrixHttp, bob: MatrixHttp) -> str:
    """A public room alice created, bob joined, with a few messages and state changes."""
    room_id = alice.create_room(preset="public_chat", name="Contract", topic="Schemas")
    bob.join(room_id)
    alice.send(room_id, "first")
    bob.send(room_id, {"msgtype": "m.notice", "body": "second"})
    alice.call("PUT", f"{V3}/rooms/{room_id}/state/m.room.topic/", {"topic": "Schemas, revised"})
    alice.send(room_id, "third")
    return room_id


def anonymous(server: ServerProcess) -> MatrixHttp:
    return server.client()


# -- discovery -----------------------------------------------------------------------------------


@covers("getVersions")
def test_versions(server: ServerProcess, alice: MatrixHttp) -> None:
    body = expect("getVersions", anonymous(server), "GET", "/_matrix/client/versions")
    assert "v1.1" in body["versions"]
    # Authentication is optional on /versions: a token must not change the shape.
    expect("getVersions", alice, "GET", "/_matrix/client/versions")


@covers("getWellknown")
def test_well_known_client(server: ServerProcess) -> None:
    body = expect("getWellknown", anonymous(server), "GET", "/.well-known/matrix/client")
    assert body["m.homeserver"]["base_url"].startswith("http")


@covers("getCapabilities")
def test_capabilities(server: ServerProcess, alice: MatrixHttp) -> None:
    body = expect("getCapabilities", alice, "GET", f"{V3}/capabilities")
    assert body["capabilities"]["m.room_versions"]["default"] in body["capabilities"]["m.room_versions"]["available"]
    err = expect("getCapabilities", anonymous(server), "GET", f"{V3}/capabilities", 401)
    assert err["errcode"] == "M_MISSING_TOKEN"


# -- login, logout, whoami ------------------------------------------------------------------------


def _password_login(user: MatrixHttp, **extra: Any) -> dict[str, Any]:
    return {
        "type": "m.login.password",
        "identifier": {"type": "m.id.user", "user": user.user_id},
        "password": user.password,
        **extra,
    }


@covers("getLoginFlows", "login")
def test_login(server: ServerProcess, alice: MatrixHttp) -> None:
    anon = anonymous(server)
    flows = expect("getLoginFlows", anon, "GET", f"{V3}/login")
    assert {"type": "m.login.password"} in flows["flows"]
    body = expect("login", anon, "POST", f"{V3}/login", json=_password_login(alice, initial_device_display_name="contract"))
    assert body["user_id"] == alice.user_id
    # Deprecated top-level "user" with a bare localpart, and a chosen device ID.
    localpart = alice.user_id[1:].split(":")[0]
    body = expect(
        "login", anon, "POST", f"{V3}/login",
        json={"type": "m.login.password", "user": localpart, "password": alice.password, "device_id": "CONTRACTDEV"},
    )
    assert body["device_id"] == "CONTRACTDEV"
    wrong = expect("login", anon, "POST", f"{V3}/login", 403, json={**_password_login(alice), "password": "wrong password"})
    assert wrong["errcode"] == "M_FORBIDDEN"
    unknown_type = expect("login", anon, "POST", f"{V3}/login", 400, json={"type": "m.login.bogus"})
    assert unknown_type["errcode"] in ("M_UNKNOWN", "M_BAD_JSON", "M_INVALID_PARAM")
    not_json = expect("login", anon, "POST", f"{V3}/login", 400, content=b"{not json")
    assert not_json["errcode"] == "M_NOT_JSON"


@covers("getTokenOwner")
def test_whoami(server: ServerProcess, alice: MatrixHttp) -> None:
    body = expect("getTokenOwner", alice, "GET", f"{V3}/account/whoami")
    assert body["user_id"] == alice.user_id and body["device_id"] == alice.device_id
    missing = expect("getTokenOwner", anonymous(server), "GET", f"{V3}/account/whoami", 401)
    assert missing["errcode"] == "M_MISSING_TOKEN"
    bogus = expect("getTokenOwner", anonymous(server), "GET", f"{V3}/account/whoami", 401, headers={"Authorization": "Bearer nope"})
    assert bogus["errcode"] == "M_UNKNOWN_TOKEN"


@covers("logout", "logout_all")
def test_logout_and_logout_all(server: ServerProcess) -> None:
    user = server.client().register()
    second = MatrixHttp(user.base_url, user.server_name, token=user.call("POST", f"{V3}/login", _password_login(user), token=False)["access_token"])
    expect("logout", second, "POST", f"{V3}/logout", json={})
    gone = expect("getTokenOwner", second, "GET", f"{V3}/account/whoami", 401)
    assert gone["errcode"] == "M_UNKNOWN_TOKEN"
    third = MatrixHttp(user.base_url, user.server_name, token=user.call("POST", f"{V3}/login", _password_login(user), token=False)["access_token"])
    expect("logout_all", user, "POST", f"{V3}/logout/all", json={})
    for client in (user, third):
        expect("getTokenOwner", client, "GET", f"{V3}/account/whoami", 401)
    expect("logout", third, "POST", f"{V3}/logout", 401, json={})


# -- registration and passwords -------------------------------------------------------------------


@covers("register")
def test_register_user_interactive(server: ServerProcess) -> None:
    anon = anonymous(server)
    username = "c" + uuid.uuid4().hex[:10]
    request = {"username": username, "password": "a long enough password", "initial_device_display_name": "contract"}
    # First stage: 401 with the flows (the UIA response, not an error body).
    uia = expect("register", anon, "POST", f"{V3}/register", 401, json=request)
    assert uia["flows"] and uia["session"]
    body = expect("register", anon, "POST", f"{V3}/register", json={**request, "auth": {"type": "m.login.dummy", "session": uia["session"]}})
    assert body["user_id"].startswith(f"@{username}:") and body["access_token"] and body["device_id"]
    taken = expect("register", anon, "POST", f"{V3}/register", 400, json=request)
    assert taken["errcode"] == "M_USER_IN_USE"
    invalid = expect("register", anon, "POST", f"{V3}/register", 400, json={**request, "username": "Not Valid!"})
    assert invalid["errcode"] == "M_INVALID_USERNAME"


@covers("register")
def test_register_inhibit_login(server: ServerProcess) -> None:
    anon = anonymous(server)
    request = {"username": "c" + uuid.uuid4().hex[:10], "password": "a long enough password", "inhibit_login": True}
    session = anon.raw("POST", f"{V3}/register", json=request).json()["session"]
    body = expect("register", anon, "POST", f"{V3}/register", json={**request, "auth": {"type": "m.login.dummy", "session": session}})
    assert "access_token" not in body and "device_id" not in body


@covers("checkUsernameAvailability")
def test_register_available(server: ServerProcess, alice: MatrixHttp) -> None:
    anon = anonymous(server)
    body = expect("checkUsernameAvailability", anon, "GET", f"{V3}/register/available", params={"username": "free" + uuid.uuid4().hex[:8]})
    assert body == {"available": True}
    taken = expect("checkUsernameAvailability", anon, "GET", f"{V3}/register/available", 400, params={"username": alice.user_id[1:].split(":")[0]})
    assert taken["errcode"] == "M_USER_IN_USE"
    invalid = expect("checkUsernameAvailability", anon, "GET", f"{V3}/register/available", 400, params={"username": "NOT VALID"})
    assert invalid["errcode"] == "M_INVALID_USERNAME"


@covers("registrationTokenValidity")
def test_registration_token_validity_with_tokens(make_server: Callable[..., ServerProcess]) -> None:
    srv = make_server(registration={"enabled": True, "require_token": True})
    created = srv.cli("registration-token", "create", "--uses", "1")
    assert created.returncode == 0, created.stderr
    token = created.stdout.strip().splitlines()[-1]
    path = "/_matrix/client/v1/register/m.login.registration_token/validity"
    anon = anonymous(srv)
    assert expect("registrationTokenValidity", anon, "GET", path, params={"token": token}) == {"valid": True}
    assert expect("registrationTokenValidity", anon, "GET", path, params={"token": "unknownToken"}) == {"valid": False}


@covers("registrationTokenValidity")
def test_registration_token_validity_when_registration_is_closed(make_server: Callable[..., ServerProcess]) -> None:
    srv = make_server(registration={"enabled": False, "require_token": True})
    path = "/_matrix/client/v1/register/m.login.registration_token/validity"
    body = expect("registrationTokenValidity", anonymous(srv), "GET", path, 403, params={"token": "abc"})
    assert body["errcode"] == "M_FORBIDDEN"


@covers("registrationTokenValidity")
def test_registration_token_validity_when_tokens_are_not_required(server: ServerProcess) -> None:
    # Open registration without tokens: the spec reserves 403 for "does not permit
    # registration"; an unrecognised token is simply not valid (was BUG-6).
    path = "/_matrix/client/v1/register/m.login.registration_token/validity"
    assert expect("registrationTokenValidity", anonymous(server), "GET", path, params={"token": "abc"}) == {"valid": False}


@covers("changePassword")
def test_change_password(server: ServerProcess) -> None:
    user = server.client().register()
    other_device = MatrixHttp(user.base_url, user.server_name, token=user.call("POST", f"{V3}/login", _password_login(user), token=False)["access_token"])
    new_password = "another long password"
    uia = expect("changePassword", user, "POST", f"{V3}/account/password", 401, json={"new_password": new_password})
    assert any("m.login.password" in flow["stages"] for flow in uia["flows"])
    wrong = expect(
        "changePassword", user, "POST", f"{V3}/account/password", 401,
        json={"new_password": new_password, "auth": {"type": "m.login.password", "session": uia["session"], "identifier": {"type": "m.id.user", "user": user.user_id}, "password": "wrong"}},
    )
    assert wrong.get("errcode") == "M_FORBIDDEN"  # a failed stage: UIA body plus errcode/error
    expect(
        "changePassword", user, "POST", f"{V3}/account/password",
        json={"new_password": new_password, "logout_devices": True, "auth": {"type": "m.login.password", "session": uia["session"], "identifier": {"type": "m.id.user", "user": user.user_id}, "password": user.password}},
    )
    expect("getTokenOwner", other_device, "GET", f"{V3}/account/whoami", 401)  # logged out
    expect("getTokenOwner", user, "GET", f"{V3}/account/whoami")  # the requesting device survives


# -- rooms: create, join, invite, leave, forget -----------------------------------------------------


@covers("createRoom")
def test_create_room(alice: MatrixHttp, bob: MatrixHttp) -> None:
    body = expect(
        "createRoom", alice, "POST", f"{V3}/createRoom",
        json={
            "preset": "private_chat", "name": "Made", "topic": "For the contract", "invite": [bob.user_id],
            "room_alias_name": "made" + uuid.uuid4().hex[:8], "is_direct": False, "room_version": "11",
            "initial_state": [{"type": "m.room.guest_access", "state_key": "", "content": {"guest_access": "forbidden"}}],
            "power_level_content_override": {"events_default": 10}, "creation_content": {"m.federate": False},
        },
    )
    assert body["room_id"].startswith("!")
    unsupported = expect("createRoom", alice, "POST", f"{V3}/createRoom", 400, json={"room_version": "1"})
    assert unsupported["errcode"] == "M_UNSUPPORTED_ROOM_VERSION"
    bad_alias = expect("createRoom", alice, "POST", f"{V3}/createRoom", 400, json={"room_alias_name": "has:colon"})
    assert bad_alias["errcode"] in ("M_INVALID_PARAM", "M_BAD_JSON")
    bad_state = expect("createRoom", alice, "POST", f"{V3}/createRoom", 400, json={"power_level_content_override": {"users_default": "high"}})
    assert bad_state["errcode"] in ("M_INVALID_ROOM_STATE", "M_BAD_JSON")


@covers("createRoom")
@pytest.mark.parametrize("preset", [{}, [], ["public_chat"]], ids=["object", "empty-array", "array"])
def test_create_room_rejects_non_string_preset(alice: MatrixHttp, preset: Any) -> None:
    # Was BUG-1: 500 (TypeError: unhashable type) for objects and arrays.
    err = expect("createRoom", alice, "POST", f"{V3}/createRoom", 400, json={"preset": preset})
    assert err["errcode"] in ("M_BAD_JSON", "M_INVALID_PARAM")


@covers("joinRoom", "joinRoomById", "leaveRoom", "forgetRoom", "getJoinedRooms")
def test_join_leave_forget(alice: MatrixHttp, carol: MatrixHttp) -> None:
    alias_local = "jl" + uuid.uuid4().hex[:8]
    room_id = alice.create_room(preset="public_chat", room_alias_name=alias_local)
    alias = f"#{alias_local}:{alice.server_name}"
    assert expect("joinRoom", carol, "POST", f"{V3}/join/{q(alias)}", json={"reason": "hello"}) == {"room_id": room_id}
    assert room_id in expect("getJoinedRooms", carol, "GET", f"{V3}/joined_rooms")["joined_rooms"]
    expect("leaveRoom", carol, "POST", f"{V3}/rooms/{room_id}/leave", json={"reason": "bye"})
    assert room_id not in expect("getJoinedRooms", carol, "GET", f"{V3}/joined_rooms")["joined_rooms"]
    assert expect("joinRoomById", carol, "POST", f"{V3}/rooms/{room_id}/join", json={}) == {"room_id": room_id}
    # Forgetting a room one is still in is refused.
    still_in = expect("forgetRoom", carol, "POST", f"{V3}/rooms/{room_id}/forget", 400, json={})
    assert still_in["errcode"] in ("M_UNKNOWN", "M_BAD_STATE")
    expect("leaveRoom", carol, "POST", f"{V3}/rooms/{room_id}/leave", json={})
    expect("forgetRoom", carol, "POST", f"{V3}/rooms/{room_id}/forget", json={})
    private = alice.create_room(preset="private_chat")
    denied = expect("joinRoomById", carol, "POST", f"{V3}/rooms/{private}/join", 403, json={})
    assert denied["errcode"] == "M_FORBIDDEN"
    no_alias = expect("joinRoom", carol, "POST", f"{V3}/join/{q('#nowhere' + uuid.uuid4().hex[:6] + ':' + alice.server_name)}", 404, json={})
    assert no_alias["errcode"] == "M_NOT_FOUND"


@covers("inviteUser")
def test_invite(alice: MatrixHttp, bob: MatrixHttp, carol: MatrixHttp) -> None:
    room_id = alice.create_room(preset="private_chat")
    expect("inviteUser", alice, "POST", f"{V3}/rooms/{room_id}/invite", json={"user_id": carol.user_id, "reason": "welcome"})
    expect("joinRoomById", carol, "POST", f"{V3}/rooms/{room_id}/join", json={})
    outsider = expect("inviteUser", bob, "POST", f"{V3}/rooms/{room_id}/invite", 403, json={"user_id": carol.user_id})
    assert outsider["errcode"] == "M_FORBIDDEN"
    missing = expect("inviteUser", alice, "POST", f"{V3}/rooms/{room_id}/invite", 400, json={})
    assert missing["errcode"] in ("M_MISSING_PARAM", "M_BAD_JSON")


@covers("kick", "ban", "unban")
def test_kick_ban_unban(alice: MatrixHttp, bob: MatrixHttp, carol: MatrixHttp) -> None:
    room_id = alice.create_room(preset="public_chat")
    bob.join(room_id)
    carol.join(room_id)
    expect("kick", alice, "POST", f"{V3}/rooms/{room_id}/kick", json={"user_id": carol.user_id, "reason": "out"})
    expect("ban", alice, "POST", f"{V3}/rooms/{room_id}/ban", json={"user_id": carol.user_id, "reason": "and stay out"})
    banned = expect("joinRoomById", carol, "POST", f"{V3}/rooms/{room_id}/join", 403, json={})
    assert banned["errcode"] == "M_FORBIDDEN"
    expect("unban", alice, "POST", f"{V3}/rooms/{room_id}/unban", json={"user_id": carol.user_id})
    expect("joinRoomById", carol, "POST", f"{V3}/rooms/{room_id}/join", json={})
    for op in ("kick", "ban"):
        err = expect(op, bob, "POST", f"{V3}/rooms/{room_id}/{op}", 403, json={"user_id": alice.user_id})
        assert err["errcode"] == "M_FORBIDDEN"
    expect("ban", alice, "POST", f"{V3}/rooms/{room_id}/ban", json={"user_id": carol.user_id})
    err = expect("unban", bob, "POST", f"{V3}/rooms/{room_id}/unban", 403, json={"user_id": carol.user_id})
    assert err["errcode"] == "M_FORBIDDEN"
    not_banned = expect("unban", alice, "POST", f"{V3}/rooms/{room_id}/unban", 400, json={"user_id": bob.user_id})
    assert not_banned["errcode"]
    bad = expect("kick", alice, "POST", f"{V3}/rooms/{room_id}/kick", 400, json={"user_id": "not-a-user-id"})
    assert bad["errcode"] in ("M_BAD_JSON", "M_INVALID_PARAM")


# -- reading rooms ------------------------------------------------------------------------------


@covers("getRoomState", "getRoomStateWithKey")
def test_state(alice: MatrixHttp, room: str, carol: MatrixHttp) -> None:
    events = expect("getRoomState", alice, "GET", f"{V3}/rooms/{room}/state")
    assert {e["type"] for e in events} >= {"m.room.create", "m.room.member", "m.room.power_levels"}
    content = check_response(
        "getRoomStateWithKey", alice.raw("GET", f"{V3}/rooms/{room}/state/m.room.topic/"), 200, one_of=0
    )
    assert content == {"topic": "Schemas, revised"}
    # format=event returns the whole client event (the second branch of the spec's oneOf).
    event = check_response(
        "getRoomStateWithKey", alice.raw("GET", f"{V3}/rooms/{room}/state/m.room.member/{q(alice.user_id)}", params={"format": "event"}), 200, one_of=1
    )
    assert event["state_key"] == alice.user_id
    missing = expect("getRoomStateWithKey", alice, "GET", f"{V3}/rooms/{room}/state/m.room.nothing/", 404)
    assert missing["errcode"] == "M_NOT_FOUND"
    outsider = expect("getRoomState", carol, "GET", f"{V3}/rooms/{room}/state", 403)
    assert outsider["errcode"] == "M_FORBIDDEN"


@covers("setRoomStateWithKey")
def test_put_state(alice: MatrixHttp, bob: MatrixHttp, room: str) -> None:
    body = expect("setRoomStateWithKey", alice, "PUT", f"{V3}/rooms/{room}/state/org.example.contract/a%2Fkey", json={"v": 1})
    assert body["event_id"].startswith("$")
    content = check_response("getRoomStateWithKey", alice.raw("GET", f"{V3}/rooms/{room}/state/org.example.contract/a%2Fkey"), 200, one_of=0)
    assert content == {"v": 1}
    denied = expect("setRoomStateWithKey", bob, "PUT", f"{V3}/rooms/{room}/state/m.room.name/", 403, json={"name": "nope"})
    assert denied["errcode"] == "M_FORBIDDEN"
    not_json = expect("setRoomStateWithKey", alice, "PUT", f"{V3}/rooms/{room}/state/m.room.name/", 400, content=b"[1]")
    assert not_json["errcode"] in ("M_BAD_JSON", "M_NOT_JSON")


@covers("getMembersByRoom")
def test_members(alice: MatrixHttp, bob: MatrixHttp, room: str) -> None:
    chunk = expect("getMembersByRoom", alice, "GET", f"{V3}/rooms/{room}/members")["chunk"]
    assert {e["state_key"] for e in chunk} >= {alice.user_id, bob.user_id}
    joined = expect("getMembersByRoom", alice, "GET", f"{V3}/rooms/{room}/members", params={"membership": "join"})["chunk"]
    assert all(e["content"]["membership"] == "join" for e in joined)
    not_joined = expect("getMembersByRoom", alice, "GET", f"{V3}/rooms/{room}/members", params={"not_membership": "join"})["chunk"]
    assert all(e["content"]["membership"] != "join" for e in not_joined)
    since = alice.sync()["next_batch"]
    expect("getMembersByRoom", alice, "GET", f"{V3}/rooms/{room}/members", params={"at": since})
    bad = expect("getMembersByRoom", alice, "GET", f"{V3}/rooms/{room}/members", 400, params={"membership": "bogus"})
    assert bad["errcode"] == "M_INVALID_PARAM"


@covers("getJoinedMembersByRoom")
def test_joined_members_with_profiles(alice: MatrixHttp, carol: MatrixHttp) -> None:
    for user in (alice, carol):
        user.call("PUT", f"{V3}/profile/{q(user.user_id)}/displayname", {"displayname": "Name " + user.user_id[1:5]})
        user.call("PUT", f"{V3}/profile/{q(user.user_id)}/avatar_url", {"avatar_url": "mxc://example.org/avatar"})
    room_id = alice.create_room(preset="public_chat")
    carol.join(room_id)
    joined = expect("getJoinedMembersByRoom", alice, "GET", f"{V3}/rooms/{room_id}/joined_members")["joined"]
    assert set(joined) == {alice.user_id, carol.user_id}
    assert joined[carol.user_id]["avatar_url"] == "mxc://example.org/avatar"
    outsider = alice.create_room(preset="private_chat")
    err = expect("getJoinedMembersByRoom", carol, "GET", f"{V3}/rooms/{outsider}/joined_members", 403)
    assert err["errcode"] == "M_FORBIDDEN"


@covers("getJoinedMembersByRoom")
def test_joined_members_without_avatar(server: ServerProcess) -> None:
    # A fresh user has no avatar: RoomMember.avatar_url must then be absent, not null (was BUG-2).
    user = server.client().register()
    room_id = user.create_room()
    expect("getJoinedMembersByRoom", user, "GET", f"{V3}/rooms/{room_id}/joined_members")


@covers("getOneRoomEvent", "sendMessage")
def test_send_and_get_event(alice: MatrixHttp, bob: MatrixHttp, room: str, carol: MatrixHttp) -> None:
    txn = uuid.uuid4().hex
    sent = expect("sendMessage", alice, "PUT", f"{V3}/rooms/{room}/send/m.room.message/{txn}", json={"msgtype": "m.text", "body": "hi"})
    again = expect("sendMessage", alice, "PUT", f"{V3}/rooms/{room}/send/m.room.message/{txn}", json={"msgtype": "m.text", "body": "hi"})
    assert sent == again
    event = expect("getOneRoomEvent", bob, "GET", f"{V3}/rooms/{room}/event/{q(sent['event_id'])}")
    assert event["content"]["body"] == "hi" and event["sender"] == alice.user_id
    missing = expect("getOneRoomEvent", bob, "GET", f"{V3}/rooms/{room}/event/{q('$nope')}", 404)
    assert missing["errcode"] == "M_NOT_FOUND"
    outsider = expect("sendMessage", carol, "PUT", f"{V3}/rooms/{room}/send/m.room.message/{txn}", 403, json={"body": "x"})
    assert outsider["errcode"] == "M_FORBIDDEN"
    too_big = expect("sendMessage", alice, "PUT", f"{V3}/rooms/{room}/send/m.room.message/{uuid.uuid4().hex}", 413, json={"body": "x" * 70_000})
    assert too_big["errcode"] == "M_TOO_LARGE"
    floats = expect("sendMessage", alice, "PUT", f"{V3}/rooms/{room}/send/m.room.message/{uuid.uuid4().hex}", 400, content=b'{"body":1.5}')
    assert floats["errcode"] == "M_BAD_JSON"


@covers("redactEvent")
def test_redact(alice: MatrixHttp, bob: MatrixHttp, room: str) -> None:
    target = bob.send(room, "regrettable")
    body = expect("redactEvent", bob, "PUT", f"{V3}/rooms/{room}/redact/{q(target)}/{uuid.uuid4().hex}", json={"reason": "oops"})
    assert body["event_id"].startswith("$")
    redacted = expect("getOneRoomEvent", alice, "GET", f"{V3}/rooms/{room}/event/{q(target)}")
    assert redacted["content"] == {}
    assert redacted["unsigned"]["redacted_because"]["event_id"] == body["event_id"]
    mine = alice.send(room, "alice's own")
    denied = expect("redactEvent", bob, "PUT", f"{V3}/rooms/{room}/redact/{q(mine)}/{uuid.uuid4().hex}", 403, json={})
    assert denied["errcode"] == "M_FORBIDDEN"


@covers("getRoomEvents")
def test_messages(alice: MatrixHttp, room: str, carol: MatrixHttp) -> None:
    back = expect("getRoomEvents", alice, "GET", f"{V3}/rooms/{room}/messages", params={"dir": "b", "limit": 3})
    assert len(back["chunk"]) == 3 and back["end"]
    more = expect("getRoomEvents", alice, "GET", f"{V3}/rooms/{room}/messages", params={"dir": "b", "from": back["end"], "limit": 100})
    assert "end" not in more or more["chunk"]
    forward = expect("getRoomEvents", alice, "GET", f"{V3}/rooms/{room}/messages", params={"dir": "f", "limit": 50})
    assert forward["chunk"][0]["type"] == "m.room.create"
    lazy = expect(
        "getRoomEvents", alice, "GET", f"{V3}/rooms/{room}/messages",
        params={"dir": "b", "filter": json.dumps({"lazy_load_members": True, "types": ["m.room.message"]})},
    )
    assert all(e["type"] == "m.room.message" for e in lazy["chunk"])
    assert all(e["type"] == "m.room.member" for e in lazy.get("state", []))
    window = expect("getRoomEvents", alice, "GET", f"{V3}/rooms/{room}/messages", params={"dir": "f", "from": back["end"], "to": back["start"]})
    assert window["chunk"]
    bad_dir = expect("getRoomEvents", alice, "GET", f"{V3}/rooms/{room}/messages", 400, params={"dir": "sideways"})
    assert bad_dir["errcode"] == "M_INVALID_PARAM"
    bad_token = expect("getRoomEvents", alice, "GET", f"{V3}/rooms/{room}/messages", 400, params={"dir": "b", "from": "garbage"})
    assert bad_token["errcode"] == "M_INVALID_PARAM"
    outsider = expect("getRoomEvents", carol, "GET", f"{V3}/rooms/{room}/messages", 403, params={"dir": "b"})
    assert outsider["errcode"] == "M_FORBIDDEN"


@covers("getEventContext")
def test_context(alice: MatrixHttp, room: str) -> None:
    middle = alice.send(room, "middle")
    alice.send(room, "after")
    body = expect("getEventContext", alice, "GET", f"{V3}/rooms/{room}/context/{q(middle)}", params={"limit": 4})
    assert body["event"]["event_id"] == middle and body["events_after"] and body["events_before"]
    filtered = expect(
        "getEventContext", alice, "GET", f"{V3}/rooms/{room}/context/{q(middle)}",
        params={"filter": json.dumps({"types": ["m.room.message"], "lazy_load_members": True})},
    )
    assert all(e["type"] == "m.room.message" for e in filtered["events_before"] + filtered["events_after"])
    missing = expect("getEventContext", alice, "GET", f"{V3}/rooms/{room}/context/{q('$nope')}", 404)
    assert missing["errcode"] == "M_NOT_FOUND"


# -- aliases ---------------------------------------------------------------------------------------


@covers("setRoomAlias", "getRoomIdByAlias", "getLocalAliases", "deleteRoomAlias")
def test_aliases(server: ServerProcess, alice: MatrixHttp, bob: MatrixHttp, room: str) -> None:
    alias = f"#contract{uuid.uuid4().hex[:8]}:{alice.server_name}"
    path = f"{V3}/directory/room/{q(alias)}"
    expect("setRoomAlias", alice, "PUT", path, json={"room_id": room})
    taken = expect("setRoomAlias", alice, "PUT", path, 409, json={"room_id": room})
    assert taken["errcode"]
    resolved = expect("getRoomIdByAlias", anonymous(server), "GET", path)
    assert resolved["room_id"] == room and resolved["servers"]
    assert alias in expect("getLocalAliases", bob, "GET", f"{V3}/rooms/{room}/aliases")["aliases"]
    denied = expect("deleteRoomAlias", bob, "DELETE", path, 403)
    assert denied["errcode"] == "M_FORBIDDEN"
    expect("deleteRoomAlias", alice, "DELETE", path)
    gone = expect("getRoomIdByAlias", anonymous(server), "GET", path, 404)
    assert gone["errcode"] == "M_NOT_FOUND"
    expect("deleteRoomAlias", alice, "DELETE", path, 404)
    invalid = expect("setRoomAlias", alice, "PUT", f"{V3}/directory/room/not-an-alias", 400, json={"room_id": room})
    assert invalid["errcode"] in ("M_INVALID_PARAM", "M_BAD_JSON")
    bad_room = expect("setRoomAlias", alice, "PUT", path, 400, json={"room_id": "nope"})
    assert bad_room["errcode"] in ("M_INVALID_PARAM", "M_BAD_JSON")


# -- sync and filters -------------------------------------------------------------------------------


@covers("sync")
def test_sync(server: ServerProcess, alice: MatrixHttp, carol: MatrixHttp, room: str) -> None:
    alice.call("PUT", f"{V3}/user/{q(alice.user_id)}/account_data/org.example.sync", {"x": 1})
    alice.call("PUT", f"{V3}/user/{q(alice.user_id)}/rooms/{room}/account_data/org.example.sync", {"y": 2})
    initial = expect("sync", alice, "GET", f"{V3}/sync", params={"timeout": 0})
    assert room in initial["rooms"]["join"]
    # Something of every kind for carol: an invite, a left room, a joined room, account data.
    invited = alice.create_room(preset="private_chat", invite=[carol.user_id])
    left = alice.create_room(preset="public_chat")
    carol.join(left)
    carol.call("POST", f"{V3}/rooms/{left}/leave", {})
    joined = alice.create_room(preset="public_chat")
    carol.join(joined)
    carol.call("PUT", f"{V3}/user/{q(carol.user_id)}/account_data/org.example.sync", {"z": 3})
    first = expect("sync", carol, "GET", f"{V3}/sync", params={"filter": json.dumps({"room": {"include_leave": True}})})
    assert invited in first["rooms"]["invite"] and left in first["rooms"]["leave"] and joined in first["rooms"]["join"]
    alice.send(joined, "incremental")
    alice.call("POST", f"{V3}/rooms/{joined}/kick", {"user_id": carol.user_id, "reason": "bye"})
    incremental = expect("sync", carol, "GET", f"{V3}/sync", params={"since": first["next_batch"], "timeout": 0})
    assert joined in incremental["rooms"].get("leave", {})
    expect("sync", carol, "GET", f"{V3}/sync", params={"since": first["next_batch"], "full_state": "true", "set_presence": "offline"})
    expect("sync", carol, "GET", f"{V3}/sync", params={"use_state_after": "true"})
    # Long-poll that times out with nothing new.
    expect("sync", carol, "GET", f"{V3}/sync", params={"since": incremental["next_batch"], "timeout": 50})
    bad = expect("sync", carol, "GET", f"{V3}/sync", 400, params={"since": "garbage"})
    assert bad["errcode"] == "M_INVALID_PARAM"
    expect("sync", anonymous(server), "GET", f"{V3}/sync", 401)


@covers("defineFilter", "getFilter", "sync")
def test_filters(alice: MatrixHttp, bob: MatrixHttp, room: str) -> None:
    definition = {
        # Trimming events with event_fields makes them fail the event schema by design;
        # keep the fields the schema requires.
        "event_fields": ["type", "content", "sender", "event_id", "origin_server_ts", "state_key"],
        "event_format": "client",
        "presence": {"types": ["m.presence"], "limit": 1},
        "account_data": {"not_types": ["m.push_rules"]},
        "room": {
            "rooms": [room],
            "include_leave": False,
            "timeline": {"limit": 2, "types": ["m.room.*"], "not_senders": ["@nobody:example.org"], "lazy_load_members": True},
            "state": {"lazy_load_members": True, "include_redundant_members": False},
            "ephemeral": {"types": []},
            "account_data": {"limit": 5},
        },
    }
    created = expect("defineFilter", alice, "POST", f"{V3}/user/{q(alice.user_id)}/filter", json=definition)
    stored = expect("getFilter", alice, "GET", f"{V3}/user/{q(alice.user_id)}/filter/{created['filter_id']}")
    assert stored["room"]["timeline"]["limit"] == 2
    synced = expect("sync", alice, "GET", f"{V3}/sync", params={"filter": created["filter_id"]})
    timeline = synced["rooms"]["join"][room]["timeline"]["events"]
    assert 0 < len(timeline) <= 2 and all("unsigned" not in e for e in timeline)
    other = expect("getFilter", bob, "GET", f"{V3}/user/{q(alice.user_id)}/filter/{created['filter_id']}", 403)
    assert other["errcode"] == "M_FORBIDDEN"
    missing = expect("getFilter", alice, "GET", f"{V3}/user/{q(alice.user_id)}/filter/999999", 404)
    assert missing["errcode"] == "M_NOT_FOUND"
    invalid = expect("defineFilter", alice, "POST", f"{V3}/user/{q(alice.user_id)}/filter", 400, json={"room": {"timeline": {"limit": "ten"}}})
    assert invalid["errcode"] in ("M_BAD_JSON", "M_INVALID_PARAM")
    denied = expect("defineFilter", bob, "POST", f"{V3}/user/{q(alice.user_id)}/filter", 403, json={})
    assert denied["errcode"] == "M_FORBIDDEN"


# -- profile, account data, push rules ---------------------------------------------------------------


@covers("getUserProfile", "getProfileField", "setProfileField")
def test_profile(server: ServerProcess, bob: MatrixHttp, carol: MatrixHttp) -> None:
    user_path = f"{V3}/profile/{q(carol.user_id)}"
    expect("setProfileField", carol, "PUT", f"{user_path}/displayname", json={"displayname": "Carol"})
    expect("setProfileField", carol, "PUT", f"{user_path}/avatar_url", json={"avatar_url": "mxc://example.org/carol"})
    profile = expect("getUserProfile", bob, "GET", user_path)
    assert profile["displayname"] == "Carol" and profile["avatar_url"] == "mxc://example.org/carol"
    assert expect("getProfileField", bob, "GET", f"{user_path}/displayname") == {"displayname": "Carol"}
    not_mine = expect("setProfileField", bob, "PUT", f"{user_path}/displayname", 403, json={"displayname": "Mallory"})
    assert not_mine["errcode"] == "M_FORBIDDEN"
    missing_key = expect("setProfileField", carol, "PUT", f"{user_path}/displayname", 400, json={"avatar_url": "mxc://a/b"})
    assert missing_key["errcode"] in ("M_MISSING_PARAM", "M_BAD_JSON")
    nobody = expect("getUserProfile", bob, "GET", f"{V3}/profile/{q('@nobody' + uuid.uuid4().hex[:6] + ':' + carol.server_name)}", 404)
    assert nobody["errcode"] == "M_NOT_FOUND"
    unset = server.client().register()
    expect("getProfileField", bob, "GET", f"{V3}/profile/{q(unset.user_id)}/avatar_url", 404)
    # Deliberate difference (docs/architecture.md): profiles are readable by signed-in
    # users only. The spec defines no security here; the 401 must still be a Matrix error.
    anon = expect("getUserProfile", anonymous(server), "GET", user_path, 401)
    assert anon["errcode"] == "M_MISSING_TOKEN"


@covers("setProfileField", "getProfileField", "deleteProfileField", "getUserProfile")
def test_extended_profile_fields(server: ServerProcess, bob: MatrixHttp) -> None:
    # m.tz and namespaced custom keys are profile fields since v1.16, which /versions
    # advertises (m.tz was refused before da92548: BUG-5).
    user = server.client().register()
    base = f"{V3}/profile/{q(user.user_id)}"
    expect("setProfileField", user, "PUT", f"{base}/m.tz", json={"m.tz": "Europe/London"})
    expect("setProfileField", user, "PUT", f"{base}/org.example.job_title", json={"org.example.job_title": {"title": "Tester", "level": 3}})
    assert expect("getProfileField", bob, "GET", f"{base}/m.tz") == {"m.tz": "Europe/London"}
    profile = expect("getUserProfile", bob, "GET", base)
    assert profile["org.example.job_title"] == {"title": "Tester", "level": 3}
    expect("deleteProfileField", user, "DELETE", f"{base}/org.example.job_title")
    expect("getProfileField", bob, "GET", f"{base}/org.example.job_title", 404)
    expect("deleteProfileField", user, "DELETE", f"{base}/m.tz")
    assert "m.tz" not in expect("getUserProfile", bob, "GET", base)
    denied = expect("deleteProfileField", bob, "DELETE", f"{base}/displayname", 403)
    assert denied["errcode"] == "M_FORBIDDEN"
    bad_key = expect("setProfileField", user, "PUT", f"{base}/NotNamespaced", 400, json={"NotNamespaced": 1})
    assert bad_key["errcode"] in ("M_INVALID_PARAM", "M_BAD_JSON", "M_UNRECOGNIZED")
    too_large = expect("setProfileField", user, "PUT", f"{base}/org.example.big", 400, json={"org.example.big": "x" * 70_000})
    assert too_large["errcode"] in ("M_PROFILE_TOO_LARGE", "M_TOO_LARGE")


@covers("setAccountData", "getAccountData", "setAccountDataPerRoom", "getAccountDataPerRoom")
def test_account_data(alice: MatrixHttp, bob: MatrixHttp, room: str) -> None:
    base = f"{V3}/user/{q(alice.user_id)}"
    expect("setAccountData", alice, "PUT", f"{base}/account_data/org.example.contract", json={"a": [1, 2]})
    assert expect("getAccountData", alice, "GET", f"{base}/account_data/org.example.contract") == {"a": [1, 2]}
    expect("setAccountDataPerRoom", alice, "PUT", f"{base}/rooms/{room}/account_data/org.example.contract", json={"b": True})
    assert expect("getAccountDataPerRoom", alice, "GET", f"{base}/rooms/{room}/account_data/org.example.contract") == {"b": True}
    missing = expect("getAccountData", alice, "GET", f"{base}/account_data/org.example.missing", 404)
    assert missing["errcode"] == "M_NOT_FOUND"
    missing_room = expect("getAccountDataPerRoom", alice, "GET", f"{base}/rooms/{room}/account_data/org.example.missing", 404)
    assert missing_room["errcode"] == "M_NOT_FOUND"
    for op, method, path in (
        ("getAccountData", "GET", f"{base}/account_data/org.example.contract"),
        ("setAccountData", "PUT", f"{base}/account_data/org.example.contract"),
        ("getAccountDataPerRoom", "GET", f"{base}/rooms/{room}/account_data/org.example.contract"),
        ("setAccountDataPerRoom", "PUT", f"{base}/rooms/{room}/account_data/org.example.contract"),
    ):
        err = expect(op, bob, method, path, 403, json={} if method == "PUT" else None)
        assert err["errcode"] == "M_FORBIDDEN"
    fully_read = expect("setAccountData", alice, "PUT", f"{base}/account_data/m.fully_read", 405, json={})
    assert fully_read["errcode"] == "M_BAD_JSON"
    bad_room = expect("setAccountDataPerRoom", alice, "PUT", f"{base}/rooms/not-a-room/account_data/org.example.x", 400, json={})
    assert bad_room["errcode"] in ("M_INVALID_PARAM", "M_BAD_JSON")


@covers("getPushRules", "getPushRulesGlobal")
def test_push_rules(alice: MatrixHttp) -> None:
    rules = expect("getPushRules", alice, "GET", f"{V3}/pushrules/")
    assert any(r["rule_id"] == ".m.rule.master" for r in rules["global"]["override"])
    glob = expect("getPushRulesGlobal", alice, "GET", f"{V3}/pushrules/global/")
    assert glob == rules["global"]


# -- devices, account deactivation -----------------------------------------------------------------


def _uia_password(user: MatrixHttp, session: str, password: str | None = None) -> dict[str, Any]:
    return {
        "type": "m.login.password",
        "session": session,
        "identifier": {"type": "m.id.user", "user": user.user_id},
        "password": password if password is not None else user.password,
    }


@covers("getDevices", "getDevice", "updateDevice", "deleteDevice", "deleteDevices")
def test_devices(server: ServerProcess, bob: MatrixHttp) -> None:
    user = server.client().register()
    logins = [user.call("POST", f"{V3}/login", _password_login(user), token=False) for _ in range(3)]
    devices = expect("getDevices", user, "GET", f"{V3}/devices")["devices"]
    assert {d["device_id"] for d in devices} == {user.device_id, *(login["device_id"] for login in logins)}
    expect("updateDevice", user, "PUT", f"{V3}/devices/{user.device_id}", json={"display_name": "Contract phone"})
    device = expect("getDevice", user, "GET", f"{V3}/devices/{user.device_id}")
    assert device["display_name"] == "Contract phone"
    expect("getDevice", user, "GET", f"{V3}/devices/NOSUCHDEVICE", 404)
    expect("updateDevice", user, "PUT", f"{V3}/devices/NOSUCHDEVICE", 404, json={"display_name": "x"})
    expect("getDevice", bob, "GET", f"{V3}/devices/{user.device_id}", 404)  # someone else's device
    first = logins[0]["device_id"]
    uia = expect("deleteDevice", user, "DELETE", f"{V3}/devices/{first}", 401, json={})
    wrong = expect("deleteDevice", user, "DELETE", f"{V3}/devices/{first}", 401, json={"auth": _uia_password(user, uia["session"], "wrong")})
    assert wrong.get("errcode") == "M_FORBIDDEN"
    expect("deleteDevice", user, "DELETE", f"{V3}/devices/{first}", json={"auth": _uia_password(user, uia["session"])})
    rest = [login["device_id"] for login in logins[1:]]
    uia = expect("deleteDevices", user, "POST", f"{V3}/delete_devices", 401, json={"devices": rest})
    expect("deleteDevices", user, "POST", f"{V3}/delete_devices", json={"devices": rest, "auth": _uia_password(user, uia["session"])})
    remaining = expect("getDevices", user, "GET", f"{V3}/devices")["devices"]
    assert [d["device_id"] for d in remaining] == [user.device_id]
    bad = expect("deleteDevices", user, "POST", f"{V3}/delete_devices", 400, json={"devices": "not a list"})
    assert bad["errcode"] in ("M_BAD_JSON", "M_INVALID_PARAM")


@covers("deactivateAccount")
def test_deactivate_account(server: ServerProcess) -> None:
    user = server.client().register()
    uia = expect("deactivateAccount", user, "POST", f"{V3}/account/deactivate", 401, json={})
    body = expect("deactivateAccount", user, "POST", f"{V3}/account/deactivate", json={"auth": _uia_password(user, uia["session"]), "erase": False})
    assert body["id_server_unbind_result"] in ("success", "no-support")
    expect("getTokenOwner", user, "GET", f"{V3}/account/whoami", 401)
    expect("login", anonymous(server), "POST", f"{V3}/login", 403, json=_password_login(user))


# -- room directory, user directory, upgrades -----------------------------------------------------


@pytest.fixture(scope="module")
def admin(server: ServerProcess) -> MatrixHttp:
    name = "admin" + uuid.uuid4().hex[:8]
    password = "an administrator password"
    created = server.cli("user", "add", name, "--admin", "--password-file", "-", input=password)
    assert created.returncode == 0, created.stderr
    client = server.client()
    body = client.call("POST", f"{V3}/login", {"type": "m.login.password", "identifier": {"type": "m.id.user", "user": name}, "password": password}, token=False)
    client.token, client.user_id, client.password = body["access_token"], body["user_id"], password
    return client


@covers("getRoomVisibilityOnDirectory", "setRoomVisibilityOnDirectory", "getPublicRooms", "queryPublicRooms")
def test_room_directory(server: ServerProcess, admin: MatrixHttp, alice: MatrixHttp, bob: MatrixHttp) -> None:
    # GET /publicRooms needs a token unless room_directory.public_without_auth is set
    # (a deliberate default, like Synapse's allow_public_rooms_without_auth).
    name = "Directory " + uuid.uuid4().hex[:8]
    room_id = admin.create_room(preset="public_chat", name=name, topic="Listed", room_alias_name="dir" + uuid.uuid4().hex[:8])
    bob.join(room_id)
    path = f"{V3}/directory/list/room/{room_id}"
    assert expect("getRoomVisibilityOnDirectory", anonymous(server), "GET", path) == {"visibility": "private"}
    denied = expect("setRoomVisibilityOnDirectory", alice, "PUT", path, 403, json={"visibility": "public"})
    assert denied["errcode"] == "M_FORBIDDEN"
    expect("setRoomVisibilityOnDirectory", admin, "PUT", path, json={"visibility": "public"})
    assert expect("getRoomVisibilityOnDirectory", anonymous(server), "GET", path) == {"visibility": "public"}
    listed = expect("getPublicRooms", alice, "GET", f"{V3}/publicRooms", params={"limit": 100})
    entry = next(r for r in listed["chunk"] if r["room_id"] == room_id)
    assert entry["name"] == name and entry["num_joined_members"] == 2
    first = expect("getPublicRooms", alice, "GET", f"{V3}/publicRooms", params={"limit": 1})
    if first.get("next_batch"):
        expect("getPublicRooms", alice, "GET", f"{V3}/publicRooms", params={"limit": 1, "since": first["next_batch"]})
    anon = expect("getPublicRooms", anonymous(server), "GET", f"{V3}/publicRooms", 401)
    assert anon["errcode"] == "M_MISSING_TOKEN"
    found = expect("queryPublicRooms", alice, "POST", f"{V3}/publicRooms", json={"limit": 10, "filter": {"generic_search_term": name}})
    assert [r["room_id"] for r in found["chunk"]] == [room_id]
    expect("queryPublicRooms", alice, "POST", f"{V3}/publicRooms", json={"include_all_networks": True, "filter": {"room_types": [None]}})
    expect("setRoomVisibilityOnDirectory", admin, "PUT", path, json={"visibility": "private"})
    unknown = expect("getRoomVisibilityOnDirectory", anonymous(server), "GET", f"{V3}/directory/list/room/{q('!nosuchroom:' + alice.server_name)}", 404)
    assert unknown["errcode"] == "M_NOT_FOUND"
    bad = expect("setRoomVisibilityOnDirectory", admin, "PUT", path, 400, json={"visibility": "everyone"})
    assert bad["errcode"] in ("M_BAD_JSON", "M_INVALID_PARAM")


@covers("getPublicRooms")
def test_public_rooms_without_auth(make_server: Callable[..., ServerProcess]) -> None:
    srv = make_server(room_directory={"public_without_auth": True})
    body = expect("getPublicRooms", anonymous(srv), "GET", f"{V3}/publicRooms")
    assert body["chunk"] == []


@covers("searchUserDirectory")
def test_user_directory(alice: MatrixHttp, carol: MatrixHttp, room: str) -> None:
    carol.call("PUT", f"{V3}/profile/{q(carol.user_id)}/displayname", {"displayname": "Searchable Carol"})
    carol.call("PUT", f"{V3}/profile/{q(carol.user_id)}/avatar_url", {"avatar_url": "mxc://example.org/carol"})
    carol.join(room)  # sharing a room makes users visible to each other
    by_id = expect("searchUserDirectory", alice, "POST", f"{V3}/user_directory/search", json={"search_term": carol.user_id[1:8]})
    entries = [r for r in by_id["results"] if r["user_id"] == carol.user_id]
    assert entries == [{"user_id": carol.user_id, "display_name": "Searchable Carol", "avatar_url": "mxc://example.org/carol"}]
    found = expect("searchUserDirectory", alice, "POST", f"{V3}/user_directory/search", json={"search_term": "Searchable Carol", "limit": 5})
    assert carol.user_id in {r["user_id"] for r in found["results"]}
    expect("searchUserDirectory", alice, "POST", f"{V3}/user_directory/search", json={"search_term": "", "limit": 1})
    bad = expect("searchUserDirectory", alice, "POST", f"{V3}/user_directory/search", 400, json={"limit": 5})
    assert bad["errcode"] in ("M_MISSING_PARAM", "M_BAD_JSON")


@covers("upgradeRoom")
def test_upgrade_room(alice: MatrixHttp, bob: MatrixHttp) -> None:
    room_id = alice.create_room(preset="private_chat", name="Old", invite=[bob.user_id])
    body = expect("upgradeRoom", alice, "POST", f"{V3}/rooms/{room_id}/upgrade", json={"new_version": "11"})
    replacement = body["replacement_room"]
    tombstone = check_response("getRoomStateWithKey", alice.raw("GET", f"{V3}/rooms/{room_id}/state/m.room.tombstone/"), 200, one_of=0)
    assert tombstone["replacement_room"] == replacement
    unsupported = expect("upgradeRoom", alice, "POST", f"{V3}/rooms/{replacement}/upgrade", 400, json={"new_version": "1"})
    assert unsupported["errcode"] == "M_UNSUPPORTED_ROOM_VERSION"
    not_member = expect("upgradeRoom", bob, "POST", f"{V3}/rooms/{replacement}/upgrade", 403, json={"new_version": "11"})
    assert not_member["errcode"] == "M_FORBIDDEN"


# -- receipts, read markers, typing, presence, tags ---------------------------------------------------


@covers("postReceipt", "setReadMarker", "setTyping")
def test_receipts_markers_typing(alice: MatrixHttp, bob: MatrixHttp, room: str, carol: MatrixHttp) -> None:
    event = alice.send(room, "read me")
    since = bob.sync()["next_batch"]
    expect("postReceipt", bob, "POST", f"{V3}/rooms/{room}/receipt/m.read/{q(event)}", json={})
    expect("postReceipt", bob, "POST", f"{V3}/rooms/{room}/receipt/m.read.private/{q(event)}", json={"thread_id": "main"})
    expect("setReadMarker", bob, "POST", f"{V3}/rooms/{room}/read_markers", json={"m.fully_read": event, "m.read": event})
    expect("setTyping", bob, "PUT", f"{V3}/rooms/{room}/typing/{q(bob.user_id)}", json={"typing": True, "timeout": 10000})
    synced = expect("sync", bob, "GET", f"{V3}/sync", params={"since": since, "timeout": 0})
    ephemeral = {e["type"] for e in synced["rooms"]["join"][room]["ephemeral"]["events"]}
    assert {"m.receipt", "m.typing"} <= ephemeral
    expect("setTyping", bob, "PUT", f"{V3}/rooms/{room}/typing/{q(bob.user_id)}", json={"typing": False})
    bad_type = expect("postReceipt", bob, "POST", f"{V3}/rooms/{room}/receipt/m.bogus/{q(event)}", 400, json={})
    assert bad_type["errcode"] in ("M_INVALID_PARAM", "M_BAD_JSON")
    other = expect("setTyping", bob, "PUT", f"{V3}/rooms/{room}/typing/{q(alice.user_id)}", 403, json={"typing": True})
    assert other["errcode"] == "M_FORBIDDEN"
    outsider = expect("postReceipt", carol, "POST", f"{V3}/rooms/{room}/receipt/m.read/{q(event)}", 403, json={})
    assert outsider["errcode"] == "M_FORBIDDEN"


@covers("getPresence", "setPresence")
def test_presence(alice: MatrixHttp, bob: MatrixHttp, room: str) -> None:
    expect("setPresence", alice, "PUT", f"{V3}/presence/{q(alice.user_id)}/status", json={"presence": "online", "status_msg": "Contract testing"})
    status = expect("getPresence", bob, "GET", f"{V3}/presence/{q(alice.user_id)}/status")
    assert status["presence"] == "online" and status["status_msg"] == "Contract testing"
    expect("setPresence", alice, "PUT", f"{V3}/presence/{q(alice.user_id)}/status", json={"presence": "unavailable"})
    denied = expect("setPresence", bob, "PUT", f"{V3}/presence/{q(alice.user_id)}/status", 403, json={"presence": "offline"})
    assert denied["errcode"] == "M_FORBIDDEN"
    bad = expect("setPresence", alice, "PUT", f"{V3}/presence/{q(alice.user_id)}/status", 400, json={"presence": "busy"})
    assert bad["errcode"] in ("M_BAD_JSON", "M_INVALID_PARAM")


@covers("getRoomTags", "setRoomTag", "deleteRoomTag")
def test_tags(alice: MatrixHttp, bob: MatrixHttp, room: str) -> None:
    base = f"{V3}/user/{q(alice.user_id)}/rooms/{room}/tags"
    expect("setRoomTag", alice, "PUT", f"{base}/u.work", json={"order": 0.25})
    expect("setRoomTag", alice, "PUT", f"{base}/m.favourite", json={})
    tags = expect("getRoomTags", alice, "GET", base)["tags"]
    assert tags["u.work"] == {"order": 0.25} and "m.favourite" in tags
    expect("deleteRoomTag", alice, "DELETE", f"{base}/u.work")
    assert "u.work" not in expect("getRoomTags", alice, "GET", base)["tags"]
    denied = expect("getRoomTags", bob, "GET", base, 403)
    assert denied["errcode"] == "M_FORBIDDEN"
    bad = expect("setRoomTag", alice, "PUT", f"{base}/u.work", 400, json={"order": "first"})
    assert bad["errcode"] in ("M_BAD_JSON", "M_INVALID_PARAM")


# -- relations, threads, search ----------------------------------------------------------------------


@covers("getRelatingEvents", "getRelatingEventsWithRelType", "getRelatingEventsWithRelTypeAndEventType", "getThreadRoots")
def test_relations_and_threads(alice: MatrixHttp, bob: MatrixHttp, carol: MatrixHttp) -> None:
    room_id = alice.create_room(preset="public_chat")
    bob.join(room_id)
    root = alice.send(room_id, "thread root")
    alice.send(room_id, {"msgtype": "m.text", "body": "* edited", "m.new_content": {"msgtype": "m.text", "body": "edited"}, "m.relates_to": {"rel_type": "m.replace", "event_id": root}})
    replies = [bob.send(room_id, {"msgtype": "m.text", "body": f"reply {i}", "m.relates_to": {"rel_type": "m.thread", "event_id": root}}) for i in range(3)]
    bob.send(room_id, {"m.relates_to": {"rel_type": "m.annotation", "event_id": root, "key": "+1"}}, event_type="m.reaction")
    v1 = "/_matrix/client/v1"
    everything = expect("getRelatingEvents", alice, "GET", f"{v1}/rooms/{room_id}/relations/{q(root)}")
    assert len(everything["chunk"]) == 5
    page = expect("getRelatingEventsWithRelType", alice, "GET", f"{v1}/rooms/{room_id}/relations/{q(root)}/m.thread", params={"limit": 2})
    assert len(page["chunk"]) == 2 and page["next_batch"]
    rest = expect("getRelatingEventsWithRelType", alice, "GET", f"{v1}/rooms/{room_id}/relations/{q(root)}/m.thread", params={"from": page["next_batch"]})
    assert {e["event_id"] for e in page["chunk"] + rest["chunk"]} == set(replies)
    reactions = expect("getRelatingEventsWithRelTypeAndEventType", alice, "GET", f"{v1}/rooms/{room_id}/relations/{q(root)}/m.annotation/m.reaction")
    assert [e["type"] for e in reactions["chunk"]] == ["m.reaction"]
    expect("getRelatingEvents", alice, "GET", f"{v1}/rooms/{room_id}/relations/{q(root)}", params={"dir": "f", "recurse": "true"})
    threads = expect("getThreadRoots", alice, "GET", f"{v1}/rooms/{room_id}/threads")
    assert [e["event_id"] for e in threads["chunk"]] == [root]
    assert threads["chunk"][0]["unsigned"]["m.relations"]["m.thread"]["count"] == 3
    expect("getThreadRoots", bob, "GET", f"{v1}/rooms/{room_id}/threads", params={"include": "participated", "limit": 1})
    event = expect("getOneRoomEvent", alice, "GET", f"{V3}/rooms/{room_id}/event/{q(root)}")
    assert "m.thread" in event["unsigned"]["m.relations"]
    outsider = expect("getRelatingEvents", carol, "GET", f"{v1}/rooms/{room_id}/relations/{q(root)}", 403)
    assert outsider["errcode"] == "M_FORBIDDEN"
    bad = expect("getThreadRoots", alice, "GET", f"{v1}/rooms/{room_id}/threads", 400, params={"include": "some"})
    assert bad["errcode"] == "M_INVALID_PARAM"


@covers("search")
def test_search(alice: MatrixHttp, bob: MatrixHttp, room: str) -> None:
    word = "quokka" + uuid.uuid4().hex[:6]
    alice.send(room, f"the {word} is a marsupial")
    bob.send(room, f"a {word} smiles")
    ranked = expect("search", alice, "POST", f"{V3}/search", json={"search_categories": {"room_events": {"search_term": word}}})
    assert ranked["search_categories"]["room_events"]["count"] == 2
    request = {
        "search_categories": {
            "room_events": {
                "search_term": word,
                "keys": ["content.body"],
                "order_by": "recent",
                "filter": {"limit": 1, "rooms": [room]},
                "event_context": {"before_limit": 2, "after_limit": 1, "include_profile": True},
                "include_state": True,
                "groupings": {"group_by": [{"key": "room_id"}, {"key": "sender"}]},
            }
        }
    }
    first = expect("search", alice, "POST", f"{V3}/search", json=request)
    results = first["search_categories"]["room_events"]
    assert len(results["results"]) == 1 and results["next_batch"]
    expect("search", alice, "POST", f"{V3}/search", params={"next_batch": results["next_batch"]}, json=request)
    bad = expect("search", alice, "POST", f"{V3}/search", 400, json={"search_categories": {"room_events": {"search_term": word, "order_by": "random"}}})
    assert bad["errcode"] in ("M_BAD_JSON", "M_INVALID_PARAM")


# -- push rules, notifications, pushers ----------------------------------------------------------------


@covers(
    "getPushRule", "setPushRule", "deletePushRule", "isPushRuleEnabled", "setPushRuleEnabled",
    "getPushRuleActions", "setPushRuleActions",
)
def test_push_rule_management(server: ServerProcess) -> None:
    user = server.client().register()
    base = f"{V3}/pushrules/global"
    master = expect("getPushRule", user, "GET", f"{base}/override/.m.rule.master")
    assert master["rule_id"] == ".m.rule.master" and master["default"] is True
    rule = {"actions": ["notify", {"set_tweak": "highlight"}], "conditions": [{"kind": "event_match", "key": "content.body", "pattern": "urgent"}]}
    expect("setPushRule", user, "PUT", f"{base}/override/org.example.urgent", json=rule)
    expect("setPushRule", user, "PUT", f"{base}/content/org.example.word", json={"actions": ["notify"], "pattern": "deploy"})
    expect("setPushRule", user, "PUT", f"{base}/room/{q('!someroom:' + user.server_name)}", json={"actions": []})
    expect("setPushRule", user, "PUT", f"{base}/override/org.example.second", params={"before": "org.example.urgent"}, json=rule)
    stored = expect("getPushRule", user, "GET", f"{base}/override/org.example.urgent")
    assert stored["conditions"] == rule["conditions"] and stored["default"] is False
    assert expect("isPushRuleEnabled", user, "GET", f"{base}/override/org.example.urgent/enabled") == {"enabled": True}
    expect("setPushRuleEnabled", user, "PUT", f"{base}/override/org.example.urgent/enabled", json={"enabled": False})
    assert expect("isPushRuleEnabled", user, "GET", f"{base}/override/org.example.urgent/enabled") == {"enabled": False}
    expect("setPushRuleActions", user, "PUT", f"{base}/override/org.example.urgent/actions", json={"actions": ["notify"]})
    assert expect("getPushRuleActions", user, "GET", f"{base}/override/org.example.urgent/actions") == {"actions": ["notify"]}
    expect("setPushRuleEnabled", user, "PUT", f"{base}/override/.m.rule.master/enabled", json={"enabled": True})
    ruleset = expect("getPushRules", user, "GET", f"{V3}/pushrules/")
    override_ids = [r["rule_id"] for r in ruleset["global"]["override"]]
    assert override_ids.index("org.example.second") < override_ids.index("org.example.urgent")
    expect("deletePushRule", user, "DELETE", f"{base}/override/org.example.urgent")
    missing = expect("getPushRule", user, "GET", f"{base}/override/org.example.urgent", 404)
    assert missing["errcode"] == "M_NOT_FOUND"
    expect("deletePushRule", user, "DELETE", f"{base}/override/org.example.urgent", 404)
    server_default = expect("deletePushRule", user, "DELETE", f"{base}/override/.m.rule.master", 400)
    assert server_default["errcode"]
    bad_kind = expect("getPushRule", user, "GET", f"{base}/nonsense/org.example.x", 400)
    assert bad_kind["errcode"]
    bad_rule = expect("setPushRule", user, "PUT", f"{base}/override/org.example.bad", 400, json={"actions": "notify"})
    assert bad_rule["errcode"]
    reserved = expect("setPushRule", user, "PUT", f"{base}/override/.m.rule.custom", 400, json={"actions": []})
    assert reserved["errcode"]


@covers("getNotifications")
def test_notifications(server: ServerProcess) -> None:
    sender, receiver = server.client().register(), server.client().register()
    room_id = sender.create_room(preset="public_chat")
    receiver.join(room_id)
    localpart = receiver.user_id[1:].split(":")[0]
    sender.send(room_id, f"hello {localpart}")  # mentions the display name (the localpart) -> highlight
    for i in range(3):
        sender.send(room_id, f"message {i}")
    body = expect("getNotifications", receiver, "GET", f"{V3}/notifications")
    assert body["notifications"] and all(n["room_id"] == room_id for n in body["notifications"])
    page = expect("getNotifications", receiver, "GET", f"{V3}/notifications", params={"limit": 1})
    if page.get("next_token"):
        expect("getNotifications", receiver, "GET", f"{V3}/notifications", params={"limit": 1, "from": page["next_token"]})
    expect("getNotifications", receiver, "GET", f"{V3}/notifications", params={"only": "highlight"})
    bad = expect("getNotifications", receiver, "GET", f"{V3}/notifications", 400, params={"from": "garbage"})
    assert bad["errcode"] == "M_INVALID_PARAM"


@covers("getPushers", "postPusher")
def test_pushers(make_server: Callable[..., ServerProcess]) -> None:
    srv = make_server(push={"gateway_url_prefixes": ["https://push.example.org/"]})
    user = srv.client().register()
    pusher = {
        "pushkey": "contract-key", "kind": "http", "app_id": "org.example.app", "app_display_name": "Example",
        "device_display_name": "Phone", "lang": "en", "data": {"url": "https://push.example.org/_matrix/push/v1/notify", "format": "event_id_only"},
    }
    assert expect("getPushers", user, "GET", f"{V3}/pushers") == {"pushers": []}
    expect("postPusher", user, "POST", f"{V3}/pushers/set", json=pusher)
    listed = expect("getPushers", user, "GET", f"{V3}/pushers")["pushers"]
    assert [p["pushkey"] for p in listed] == ["contract-key"]
    expect("postPusher", user, "POST", f"{V3}/pushers/set", json={"pushkey": "contract-key", "app_id": "org.example.app", "kind": None})
    assert expect("getPushers", user, "GET", f"{V3}/pushers") == {"pushers": []}
    missing = expect("postPusher", user, "POST", f"{V3}/pushers/set", 400, json={"kind": "http", "app_id": "org.example.app"})
    assert missing["errcode"] in ("M_MISSING_PARAM", "M_BAD_JSON")
    no_url = expect("postPusher", user, "POST", f"{V3}/pushers/set", 400, json={**pusher, "data": {}})
    assert no_url["errcode"] in ("M_MISSING_PARAM", "M_BAD_JSON", "M_INVALID_PARAM")
    elsewhere = {**pusher, "data": {"url": "https://elsewhere.example.com/_matrix/push/v1/notify"}}
    denied = expect("postPusher", user, "POST", f"{V3}/pushers/set", 403, json=elsewhere)
    assert denied["errcode"] == "M_FORBIDDEN"


# -- end-to-end encryption: device keys, one-time keys, cross-signing, to-device ----------------------


def _b64(size: int = 32) -> str:
    return base64.b64encode(os.urandom(size)).decode().rstrip("=")


def _signing_key(version: str = "k") -> tuple[Any, str]:
    """An Ed25519 signing key and its unpadded base64 public key (used as its key ID)."""
    key = signedjson.key.generate_signing_key(version)
    public = signedjson.key.encode_verify_key_base64(signedjson.key.get_verify_key(key))
    return key, public


def _upload_device_keys(user: MatrixHttp, one_time: int = 3) -> Any:
    """Upload signed device keys, one-time keys and a fallback key for ``user``'s device."""
    device_key = signedjson.key.generate_signing_key(user.device_id)
    public = signedjson.key.encode_verify_key_base64(signedjson.key.get_verify_key(device_key))
    device_keys = signedjson.sign.sign_json(
        {
            "user_id": user.user_id, "device_id": user.device_id,
            "algorithms": ["m.olm.v1.curve25519-aes-sha2", "m.megolm.v1.aes-sha2"],
            "keys": {f"curve25519:{user.device_id}": _b64(), f"ed25519:{user.device_id}": public},
        },
        user.user_id, device_key,
    )
    one_time_keys = {f"signed_curve25519:OTK{i}": signedjson.sign.sign_json({"key": _b64()}, user.user_id, device_key) for i in range(one_time)}
    fallback = {"signed_curve25519:FB": signedjson.sign.sign_json({"key": _b64(), "fallback": True}, user.user_id, device_key)}
    counts = expect("uploadKeys", user, "POST", f"{V3}/keys/upload", json={"device_keys": device_keys, "one_time_keys": one_time_keys, "fallback_keys": fallback})
    assert counts["one_time_key_counts"]["signed_curve25519"] == one_time
    return device_keys


@covers("uploadKeys", "queryKeys", "claimKeys", "getKeysChanges")
def test_device_and_one_time_keys(server: ServerProcess) -> None:
    alice, bob = server.client().register(), server.client().register()
    room_id = alice.create_room(preset="public_chat")
    bob.join(room_id)
    since = bob.sync()["next_batch"]
    device_keys = _upload_device_keys(alice, one_time=2)
    assert expect("uploadKeys", alice, "POST", f"{V3}/keys/upload", json={}) == {"one_time_key_counts": {"signed_curve25519": 2}}
    queried = expect("queryKeys", bob, "POST", f"{V3}/keys/query", json={"device_keys": {alice.user_id: []}, "timeout": 1000})
    assert queried["device_keys"][alice.user_id][alice.device_id]["keys"] == device_keys["keys"]
    unknown = expect("queryKeys", bob, "POST", f"{V3}/keys/query", json={"device_keys": {f"@nobody:{alice.server_name}": []}})
    assert unknown["device_keys"].get(f"@nobody:{alice.server_name}", {}) == {}
    claimed = [
        expect("claimKeys", bob, "POST", f"{V3}/keys/claim", json={"one_time_keys": {alice.user_id: {alice.device_id: "signed_curve25519"}}})
        for _ in range(3)
    ]
    key_ids = [next(iter(c["one_time_keys"][alice.user_id][alice.device_id])) for c in claimed]
    assert key_ids[0] != key_ids[1] and key_ids[2] == "signed_curve25519:FB"  # then the fallback key
    changes = expect("getKeysChanges", bob, "GET", f"{V3}/keys/changes", params={"from": since, "to": bob.sync()["next_batch"]})
    assert alice.user_id in changes["changed"]
    missing = expect("getKeysChanges", bob, "GET", f"{V3}/keys/changes", 400, params={"from": since})
    assert missing["errcode"] in ("M_INVALID_PARAM", "M_MISSING_PARAM")
    forged = {**device_keys, "keys": {**device_keys["keys"], f"curve25519:{alice.device_id}": _b64()}}
    bad_signature = expect("uploadKeys", alice, "POST", f"{V3}/keys/upload", 400, json={"device_keys": forged})
    assert bad_signature["errcode"] in ("M_INVALID_SIGNATURE", "M_BAD_JSON", "M_INVALID_PARAM")
    wrong_user = expect("uploadKeys", bob, "POST", f"{V3}/keys/upload", 400, json={"device_keys": device_keys})
    assert wrong_user["errcode"]


def _cross_signing_keys(user: MatrixHttp) -> tuple[dict[str, Any], Any]:
    master_key, master_pub = _signing_key()
    master_key.version = master_pub
    self_key, self_pub = _signing_key()
    self_key.version = self_pub
    _, user_pub = _signing_key()
    body = {
        "master_key": {"user_id": user.user_id, "usage": ["master"], "keys": {f"ed25519:{master_pub}": master_pub}},
        "self_signing_key": signedjson.sign.sign_json({"user_id": user.user_id, "usage": ["self_signing"], "keys": {f"ed25519:{self_pub}": self_pub}}, user.user_id, master_key),
        "user_signing_key": signedjson.sign.sign_json({"user_id": user.user_id, "usage": ["user_signing"], "keys": {f"ed25519:{user_pub}": user_pub}}, user.user_id, master_key),
    }
    return body, self_key


@covers("uploadCrossSigningKeys", "uploadCrossSigningSignatures", "queryKeys")
def test_cross_signing(server: ServerProcess) -> None:
    user, other = server.client().register(), server.client().register()
    device_keys = _upload_device_keys(user)
    keys, self_signing = _cross_signing_keys(user)
    expect("uploadCrossSigningKeys", user, "POST", f"{V3}/keys/device_signing/upload", json=keys)
    signed = signedjson.sign.sign_json(dict(device_keys), user.user_id, self_signing)
    result = expect("uploadCrossSigningSignatures", user, "POST", f"{V3}/keys/signatures/upload", json={user.user_id: {user.device_id: signed}})
    assert result["failures"] == {}
    unknown = expect("uploadCrossSigningSignatures", user, "POST", f"{V3}/keys/signatures/upload", json={user.user_id: {"NOSUCHDEVICE": signed}})
    assert unknown["failures"][user.user_id]["NOSUCHDEVICE"]["errcode"]
    queried = expect("queryKeys", other, "POST", f"{V3}/keys/query", json={"device_keys": {user.user_id: []}})
    assert queried["master_keys"][user.user_id]["usage"] == ["master"]
    assert queried["self_signing_keys"][user.user_id]["usage"] == ["self_signing"]
    assert user.user_id not in queried.get("user_signing_keys", {})  # only for the user themselves
    # Replacing the keys needs user-interactive auth (a UIA 401, which the spec omits here).
    replacement, _ = _cross_signing_keys(user)
    uia = expect("uploadCrossSigningKeys", user, "POST", f"{V3}/keys/device_signing/upload", 401, json=replacement)
    expect(
        "uploadCrossSigningKeys", user, "POST", f"{V3}/keys/device_signing/upload",
        json={**replacement, "auth": {"type": "m.login.password", "session": uia["session"], "identifier": {"type": "m.id.user", "user": user.user_id}, "password": user.password}},
    )
    unsigned = {**replacement, "self_signing_key": {**replacement["self_signing_key"], "signatures": {}}}
    bad = expect("uploadCrossSigningKeys", other, "POST", f"{V3}/keys/device_signing/upload", 400, json={**unsigned, "master_key": {**unsigned["master_key"], "user_id": other.user_id}})
    assert bad["errcode"]


@covers("uploadCrossSigningKeys")
def test_cross_signing_reupload_of_the_same_keys_needs_no_auth(server: ServerProcess) -> None:
    # The spec: no UIA when "there is an existing master signing key and it exactly matches
    # the master signing key provided in the request body" (and any other keys match) —
    # so a client can retry an upload whose response was lost (was BUG-8).
    user = server.client().register()
    keys, _ = _cross_signing_keys(user)
    expect("uploadCrossSigningKeys", user, "POST", f"{V3}/keys/device_signing/upload", json=keys)
    expect("uploadCrossSigningKeys", user, "POST", f"{V3}/keys/device_signing/upload", json=keys)
    expect("uploadCrossSigningKeys", user, "POST", f"{V3}/keys/device_signing/upload", json={"master_key": keys["master_key"]})


@covers("sendToDevice")
def test_send_to_device(server: ServerProcess) -> None:
    sender, receiver = server.client().register(), server.client().register()
    since = receiver.sync()["next_batch"]
    content = {"action": "request_cancellation", "request_id": "r1", "requesting_device_id": sender.device_id}
    txn = uuid.uuid4().hex
    expect("sendToDevice", sender, "PUT", f"{V3}/sendToDevice/m.room_key_request/{txn}", json={"messages": {receiver.user_id: {"*": content}}})
    expect("sendToDevice", sender, "PUT", f"{V3}/sendToDevice/m.room_key_request/{txn}", json={"messages": {receiver.user_id: {"*": content}}})
    expect("sendToDevice", sender, "PUT", f"{V3}/sendToDevice/m.room_key_request/{uuid.uuid4().hex}", json={"messages": {receiver.user_id: {receiver.device_id: {**content, "request_id": "r2"}}}})
    synced = expect("sync", receiver, "GET", f"{V3}/sync", params={"since": since})
    events = synced["to_device"]["events"]
    assert [e["content"]["request_id"] for e in events] == ["r1", "r2"]  # the retried txn delivered once
    assert all(e["sender"] == sender.user_id for e in events)
    again = expect("sync", receiver, "GET", f"{V3}/sync", params={"since": synced["next_batch"]})
    assert not again.get("to_device", {}).get("events")
    bad = expect("sendToDevice", sender, "PUT", f"{V3}/sendToDevice/m.room_key_request/{uuid.uuid4().hex}", 400, json={"messages": {receiver.user_id: {"*": "not an object"}}})
    assert bad["errcode"] in ("M_BAD_JSON", "M_INVALID_PARAM")


# -- server-side key backup ---------------------------------------------------------------------------


@covers(
    "postRoomKeysVersion", "getRoomKeysVersionCurrent", "getRoomKeysVersion", "putRoomKeysVersion", "deleteRoomKeysVersion",
    "putRoomKeys", "putRoomKeysByRoomId", "putRoomKeyBySessionId", "getRoomKeys", "getRoomKeysByRoomId",
    "getRoomKeyBySessionId", "deleteRoomKeys", "deleteRoomKeysByRoomId", "deleteRoomKeyBySessionId",
)
def test_key_backup(server: ServerProcess) -> None:
    user = server.client().register()
    room_id = user.create_room()
    algorithm = "m.megolm_backup.v1.curve25519-aes-sha2"
    none_yet = expect("getRoomKeysVersionCurrent", user, "GET", f"{V3}/room_keys/version", 404)
    assert none_yet["errcode"] == "M_NOT_FOUND"
    version = expect("postRoomKeysVersion", user, "POST", f"{V3}/room_keys/version", json={"algorithm": algorithm, "auth_data": {"public_key": _b64()}})["version"]
    current = expect("getRoomKeysVersionCurrent", user, "GET", f"{V3}/room_keys/version")
    assert current["version"] == version and current["count"] == 0
    expect("putRoomKeysVersion", user, "PUT", f"{V3}/room_keys/version/{version}", json={"algorithm": algorithm, "auth_data": {"public_key": _b64()}, "version": version})
    expect("getRoomKeysVersion", user, "GET", f"{V3}/room_keys/version/{version}")
    session = {"first_message_index": 0, "forwarded_count": 0, "is_verified": False, "session_data": {"ephemeral": _b64(), "ciphertext": _b64(64), "mac": _b64(8)}}
    keys = f"{V3}/room_keys/keys"
    params = {"version": version}
    assert expect("putRoomKeys", user, "PUT", keys, params=params, json={"rooms": {room_id: {"sessions": {"S1": session}}}})["count"] == 1
    expect("putRoomKeysByRoomId", user, "PUT", f"{keys}/{room_id}", params=params, json={"sessions": {"S2": session}})
    assert expect("putRoomKeyBySessionId", user, "PUT", f"{keys}/{room_id}/S3", params=params, json=session)["count"] == 3
    assert set(expect("getRoomKeys", user, "GET", keys, params=params)["rooms"][room_id]["sessions"]) == {"S1", "S2", "S3"}
    assert set(expect("getRoomKeysByRoomId", user, "GET", f"{keys}/{room_id}", params=params)["sessions"]) == {"S1", "S2", "S3"}
    assert expect("getRoomKeyBySessionId", user, "GET", f"{keys}/{room_id}/S1", params=params)["first_message_index"] == 0
    expect("getRoomKeyBySessionId", user, "GET", f"{keys}/{room_id}/NOSUCHSESSION", 404, params=params)
    assert expect("deleteRoomKeyBySessionId", user, "DELETE", f"{keys}/{room_id}/S1", params=params)["count"] == 2
    assert expect("deleteRoomKeysByRoomId", user, "DELETE", f"{keys}/{room_id}", params=params)["count"] == 0
    expect("deleteRoomKeys", user, "DELETE", keys, params=params)
    wrong = expect("putRoomKeys", user, "PUT", keys, 403, params={"version": "999999"}, json={"rooms": {}})
    assert wrong["errcode"] == "M_WRONG_ROOM_KEYS_VERSION" and wrong["current_version"] == version
    bad = expect("postRoomKeysVersion", user, "POST", f"{V3}/room_keys/version", 400, json={"algorithm": algorithm})
    assert bad["errcode"] in ("M_BAD_JSON", "M_MISSING_PARAM", "M_INVALID_PARAM")
    expect("deleteRoomKeysVersion", user, "DELETE", f"{V3}/room_keys/version/{version}")
    expect("getRoomKeysVersion", user, "GET", f"{V3}/room_keys/version/{version}", 404)


# -- media -------------------------------------------------------------------------------------------


def _png(width: int, height: int) -> bytes:
    """A red RGB PNG, built by hand."""
    rows = b"".join(b"\x00" + b"\xff\x00\x00" * width for _ in range(height))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")


def _mxc(uri: str) -> str:
    assert uri.startswith("mxc://")
    return uri[len("mxc://"):]


@covers("getConfigAuthed", "getConfig", "uploadContent", "getContentAuthed", "getContentOverrideNameAuthed", "getContentThumbnailAuthed")
def test_media_upload_download_thumbnail(server: ServerProcess, alice: MatrixHttp, bob: MatrixHttp) -> None:
    config = expect("getConfigAuthed", alice, "GET", "/_matrix/client/v1/media/config")
    assert config["m.upload.size"] > 0
    assert expect("getConfig", alice, "GET", "/_matrix/media/v3/config") == config
    image = _png(64, 48)
    uploaded = expect("uploadContent", alice, "POST", "/_matrix/media/v3/upload", params={"filename": "red dot.png"}, content=image, headers={"Content-Type": "image/png"})
    media = _mxc(uploaded["content_uri"])
    download = bob.raw("GET", f"/_matrix/client/v1/media/download/{media}")
    assert check_response("getContentAuthed", download) == image
    assert download.headers["content-type"] == "image/png" and "red%20dot.png" in download.headers["content-disposition"]
    renamed = bob.raw("GET", f"/_matrix/client/v1/media/download/{media}/other.png")
    assert check_response("getContentOverrideNameAuthed", renamed) == image and "other.png" in renamed.headers["content-disposition"]
    for method in ("scale", "crop"):
        thumb = bob.raw("GET", f"/_matrix/client/v1/media/thumbnail/{media}", params={"width": 32, "height": 32, "method": method})
        assert check_response("getContentThumbnailAuthed", thumb)
    text = expect("uploadContent", alice, "POST", "/_matrix/media/v3/upload", content=b"plain text", headers={"Content-Type": "text/plain"})
    not_image = expect("getContentThumbnailAuthed", bob, "GET", f"/_matrix/client/v1/media/thumbnail/{_mxc(text['content_uri'])}", 400, params={"width": 32, "height": 32})
    assert not_image["errcode"]
    missing = expect("getContentAuthed", bob, "GET", f"/_matrix/client/v1/media/download/{alice.server_name}/nosuchmedia", 404)
    assert missing["errcode"] == "M_NOT_FOUND"
    no_token = expect("getContentAuthed", anonymous(server), "GET", f"/_matrix/client/v1/media/download/{media}", 401)
    assert no_token["errcode"] == "M_MISSING_TOKEN"
    no_size = expect("getContentThumbnailAuthed", bob, "GET", f"/_matrix/client/v1/media/thumbnail/{media}", 400)
    assert no_size["errcode"] in ("M_MISSING_PARAM", "M_INVALID_PARAM")


@covers("createContent", "uploadContentToMXC", "getContentAuthed")
def test_media_create_then_upload(alice: MatrixHttp, bob: MatrixHttp) -> None:
    created = expect("createContent", alice, "POST", "/_matrix/media/v1/create")
    media = _mxc(created["content_uri"])
    pending = expect("getContentAuthed", alice, "GET", f"/_matrix/client/v1/media/download/{media}", 504, params={"timeout_ms": 50})
    assert pending["errcode"] == "M_NOT_YET_UPLOADED"
    not_yours = expect("uploadContentToMXC", bob, "PUT", f"/_matrix/media/v3/upload/{media}", 403, content=b"x", headers={"Content-Type": "text/plain"})
    assert not_yours["errcode"] == "M_FORBIDDEN"
    expect("uploadContentToMXC", alice, "PUT", f"/_matrix/media/v3/upload/{media}", params={"filename": "later.txt"}, content=b"arrived later", headers={"Content-Type": "text/plain"})
    again = expect("uploadContentToMXC", alice, "PUT", f"/_matrix/media/v3/upload/{media}", 409, content=b"again", headers={"Content-Type": "text/plain"})
    assert again["errcode"] == "M_CANNOT_OVERWRITE_MEDIA"
    assert check_response("getContentAuthed", bob.raw("GET", f"/_matrix/client/v1/media/download/{media}")) == b"arrived later"
    unknown = expect("uploadContentToMXC", alice, "PUT", f"/_matrix/media/v3/upload/{alice.server_name}/nosuchmedia", 404, content=b"x")
    assert unknown["errcode"] == "M_NOT_FOUND"


@covers("getContent", "getContentOverrideName", "getContentThumbnail")
def test_legacy_media_endpoints(server: ServerProcess, alice: MatrixHttp, make_server: Callable[..., ServerProcess]) -> None:
    # Frozen by default (spec 1.11: unauthenticated media); 404 M_NOT_FOUND as the spec suggests.
    media = _mxc(expect("uploadContent", alice, "POST", "/_matrix/media/v3/upload", content=_png(8, 8), headers={"Content-Type": "image/png"})["content_uri"])
    anon = anonymous(server)
    for op, path, params in (
        ("getContent", f"/_matrix/media/v3/download/{media}", None),
        ("getContentOverrideName", f"/_matrix/media/v3/download/{media}/name.png", None),
        ("getContentThumbnail", f"/_matrix/media/v3/thumbnail/{media}", {"width": 4, "height": 4}),
    ):
        assert expect(op, anon, "GET", path, 404, params=params)["errcode"] == "M_NOT_FOUND"
    srv = make_server(media={"legacy_unauthenticated": True})
    user = srv.client().register()
    image = _png(8, 8)
    media = _mxc(expect("uploadContent", user, "POST", "/_matrix/media/v3/upload", content=image, headers={"Content-Type": "image/png"})["content_uri"])
    anon = anonymous(srv)
    assert check_response("getContent", anon.raw("GET", f"/_matrix/media/v3/download/{media}")) == image
    assert check_response("getContentOverrideName", anon.raw("GET", f"/_matrix/media/v3/download/{media}/name.png")) == image
    assert check_response("getContentThumbnail", anon.raw("GET", f"/_matrix/media/v3/thumbnail/{media}", params={"width": 4, "height": 4}))


class _PreviewPage(http.server.BaseHTTPRequestHandler):
    PAGE = b"""<html><head><title>Fallback</title>
<meta property="og:title" content="Contract page"><meta property="og:description" content="For previews">
</head><body>hello</body></html>"""

    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/html; charset=utf-8")
        self.send_header("Content-Length", str(len(self.PAGE)))
        self.end_headers()
        self.wfile.write(self.PAGE)

    def log_message(self, *args: Any) -> None:
        pass


@covers("getUrlPreviewAuthed", "getUrlPreview")
def test_url_previews(server: ServerProcess, alice: MatrixHttp, make_server: Callable[..., ServerProcess]) -> None:
    disabled = expect("getUrlPreviewAuthed", alice, "GET", "/_matrix/client/v1/media/preview_url", 404, params={"url": "https://example.org/"})
    assert disabled["errcode"] in ("M_UNRECOGNIZED", "M_NOT_FOUND")
    page = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _PreviewPage)
    threading.Thread(target=page.serve_forever, daemon=True).start()
    try:
        port = page.server_address[1]
        srv = make_server(url_preview={"enabled": True, "allowed_networks": ["127.0.0.1/32"], "allowed_ports": [port]})
        user = srv.client().register()
        url = f"http://127.0.0.1:{port}/page"
        preview = expect("getUrlPreviewAuthed", user, "GET", "/_matrix/client/v1/media/preview_url", params={"url": url})
        assert preview["og:title"] == "Contract page"
        assert expect("getUrlPreview", user, "GET", "/_matrix/media/v3/preview_url", params={"url": url, "ts": 0})["og:title"] == "Contract page"
        missing = expect("getUrlPreviewAuthed", user, "GET", "/_matrix/client/v1/media/preview_url", 400)
        assert missing["errcode"] == "M_MISSING_PARAM"
    finally:
        page.shutdown()


# -- regressions for server bugs the fuzzers found (see known_bugs.py) -------------------------------


def _nested(depth: int) -> bytes:
    return b'{"a":' * depth + b"1" + b"}" * depth


@pytest.mark.parametrize(
    ("op", "method", "path"),
    [
        ("sendMessage", "PUT", "/rooms/{room}/send/m.room.message/{txn}"),
        ("setRoomStateWithKey", "PUT", "/rooms/{room}/state/org.example.deep/"),
        ("setAccountData", "PUT", "/user/{user}/account_data/org.example.deep"),
        ("defineFilter", "POST", "/user/{user}/filter"),
        ("createRoom", "POST", "/createRoom"),
        ("redactEvent", "PUT", "/rooms/{room}/redact/{event}/{txn}"),
    ],
    ids=lambda v: v if isinstance(v, str) and not v.startswith("/") else None,
)
def test_deeply_nested_json_is_rejected(alice: MatrixHttp, room: str, op: str, method: str, path: str) -> None:
    # 300 levels parse (orjson allows 1024) but cannot be re-serialised (orjson.dumps stops
    # at 254); was BUG-4 (500).
    url = V3 + path.format(room=room, txn=uuid.uuid4().hex, user=q(alice.user_id), event=q(alice.send(room, "deep")))
    body = b'{"creation_content":' + _nested(300) + b"}" if op == "createRoom" else _nested(300)
    err = expect(op, alice, method, url, 400, content=body)
    assert err["errcode"] in ("M_BAD_JSON", "M_NOT_JSON", "M_TOO_LARGE")


NUL_REQUESTS = [
    ("sendMessage", "PUT", "/rooms/{room}/send/m.%00x/{txn}", {}),
    ("sendMessage", "PUT", "/rooms/{room}/send/m.room.message/a%00{txn}", {}),
    ("setRoomStateWithKey", "PUT", "/rooms/{room}/state/org.example.x/a%00b", {}),
    ("redactEvent", "PUT", "/rooms/{room}/redact/{event}/a%00{txn}", {}),
    ("getOneRoomEvent", "GET", "/rooms/{room}/event/%24a%00b", None),
    ("getEventContext", "GET", "/rooms/{room}/context/%24a%00b", None),
    ("getRoomState", "GET", "/rooms/%21a%00b%3Alocalhost/state", None),
    ("joinRoom", "POST", "/join/%21a%00b%3Alocalhost", {}),
    ("setAccountData", "PUT", "/user/{user}/account_data/a%00b", {}),
    ("setProfileField", "PUT", "/profile/{user}/displayname", {"displayname": "a\u0000b"}),
    ("createRoom", "POST", "/createRoom", {"initial_state": [{"type": "org.example.\u0000", "state_key": "", "content": {}}]}),
    ("login", "POST", "/login", "DEVICE"),
]


@pytest.mark.parametrize(("op", "method", "path", "body"), NUL_REQUESTS, ids=[f"{r[0]}:{i}" for i, r in enumerate(NUL_REQUESTS)])
def test_nul_characters_never_cause_server_errors(alice: MatrixHttp, room: str, op: str, method: str, path: str, body: Any) -> None:
    """U+0000 in IDs, keys and names: SQLite would store it, PostgreSQL text columns refuse it.

    Any 2xx or 4xx is acceptable; a 5xx is not (was BUG-3 on PostgreSQL, fixed in 9b49a0e).
    """
    event = alice.send(room, "nul target")
    url = V3 + path.format(room=room, txn=uuid.uuid4().hex, user=q(alice.user_id), event=q(event))
    if body == "DEVICE":
        body = _password_login(alice, device_id="DEV\u0000ICE")
    response = alice.raw(method, url, json=body)
    assert response.status_code < 500, f"{op}: {method} {url} -> {response.status_code} {response.text}"
    if response.status_code >= 400:
        assert not violations(standard_error_schema(), response.json())


@pytest.mark.parametrize(
    ("op", "method", "path", "body"),
    [
        ("sendMessage", "PUT", "/rooms/{room}/send/m.room.message/{txn}", {"msgtype": "m.text", "body": "a\u0000b"}),
        ("setRoomStateWithKey", "PUT", "/rooms/{room}/state/m.room.name/", {"name": "a\u0000b"}),
        ("setRoomStateWithKey", "PUT", "/rooms/{room}/state/m.room.topic/", {"topic": "a\u0000b"}),
        ("createRoom", "POST", "/createRoom", {"name": "a\u0000b"}),
    ],
    ids=["message-body", "room-name", "room-topic", "createRoom-name"],
)
def test_nul_characters_in_searchable_text(alice: MatrixHttp, op: str, method: str, path: str, body: Any) -> None:
    """U+0000 inside the text the search index stores: accept (SQLite does) or refuse with a 4xx.

    Was BUG-7: 500 on PostgreSQL (the index's text column cannot hold NUL).
    """
    room_id = alice.create_room()
    url = V3 + path.format(room=room_id, txn=uuid.uuid4().hex)
    response = alice.raw(method, url, json=body)
    assert response.status_code < 500, f"{op}: {method} {url} {body!r} -> {response.status_code} {response.text}"


# -- drift guard ----------------------------------------------------------------------------------


def test_every_implemented_operation_has_a_contract_test() -> None:
    module = sys.modules[__name__]
    covered = {op for obj in vars(module).values() for op in getattr(obj, "covers", ())}
    implemented = {op.operation_id for op in spec_loader.implemented_operations()}
    assert implemented - covered == set(), "implemented spec operations without a contract test"
    assert covered - implemented == set()
