"""Room directory, user directory, devices, tags, deactivation and room upgrades."""

from __future__ import annotations

import pytest

from tests.harness import MatrixError, MatrixHttp, ServerProcess


def admin_user(srv: ServerProcess, name: str) -> MatrixHttp:
    added = srv.cli("user", "add", name, "--admin", "--password-file", "-", input="admin password 123\n")
    assert added.returncode == 0, added.stderr
    client = srv.client()
    body = client.call("POST", "/_matrix/client/v3/login", {
        "type": "m.login.password", "identifier": {"type": "m.id.user", "user": name}, "password": "admin password 123"}, token=False)
    client.token, client.user_id, client.password = body["access_token"], body["user_id"], "admin password 123"
    return client


def test_publishing_is_admin_only_and_public_rooms_listing(make_server) -> None:
    srv: ServerProcess = make_server()
    admin = admin_user(srv, "boss")
    user = srv.client().register()
    with pytest.raises(MatrixError) as err:
        user.create_room(visibility="public", name="Nope")
    assert err.value.status == 403
    mine = user.create_room(name="Private one")
    with pytest.raises(MatrixError) as err:
        user.call("PUT", f"/_matrix/client/v3/directory/list/room/{mine}", {"visibility": "public"})
    assert err.value.status == 403
    assert user.call("GET", f"/_matrix/client/v3/directory/list/room/{mine}") == {"visibility": "private"}

    lobby = admin.create_room(visibility="public", name="Lobby", topic="Everyone welcome", room_alias_name="lobby")
    other = admin.create_room(preset="public_chat", name="Engineering")
    admin.call("PUT", f"/_matrix/client/v3/directory/list/room/{other}", {"visibility": "public"})
    user.join(lobby)
    listing = user.call("GET", "/_matrix/client/v3/publicRooms")
    assert [c["room_id"] for c in listing["chunk"]] == [lobby, other]  # most members first
    first = listing["chunk"][0]
    assert first["name"] == "Lobby" and first["topic"] == "Everyone welcome" and first["num_joined_members"] == 2
    assert first["canonical_alias"] == "#lobby:localhost" and first["join_rule"] == "public"
    searched = user.call("POST", "/_matrix/client/v3/publicRooms", {"filter": {"generic_search_term": "engin"}})
    assert [c["room_id"] for c in searched["chunk"]] == [other]
    page = user.call("POST", "/_matrix/client/v3/publicRooms", {"limit": 1})
    assert len(page["chunk"]) == 1 and page["total_room_count_estimate"] == 2
    page2 = user.call("POST", "/_matrix/client/v3/publicRooms", {"limit": 1, "since": page["next_batch"]})
    assert page2["chunk"][0]["room_id"] == other and "next_batch" not in page2
    anon = srv.client().raw("GET", "/_matrix/client/v3/publicRooms")
    assert anon.status_code == 401  # the directory is for signed-in users by default
    # moderators may unpublish their room
    admin.call("PUT", f"/_matrix/client/v3/directory/list/room/{other}", {"visibility": "private"})
    assert len(user.call("GET", "/_matrix/client/v3/publicRooms")["chunk"]) == 1


def test_user_directory_search(server: ServerProcess) -> None:
    alice = server.client().register()
    bob = server.client().register()
    stranger = server.client().register()
    bob.call("PUT", f"/_matrix/client/v3/profile/{bob.user_id}/displayname", {"displayname": "Bobby Tables"})
    stranger.call("PUT", f"/_matrix/client/v3/profile/{stranger.user_id}/displayname", {"displayname": "Bobby Stranger"})
    room = alice.create_room(invite=[bob.user_id])
    bob.join(room)
    found = alice.call("POST", "/_matrix/client/v3/user_directory/search", {"search_term": "bobby"})
    assert [r["user_id"] for r in found["results"]] == [bob.user_id]  # not the stranger: no shared room
    assert found["results"][0]["display_name"] == "Bobby Tables" and found["limited"] is False
    by_id = alice.call("POST", "/_matrix/client/v3/user_directory/search", {"search_term": bob.user_id[1:6]})
    assert bob.user_id in [r["user_id"] for r in by_id["results"]]
    with pytest.raises(MatrixError) as err:
        alice.call("POST", "/_matrix/client/v3/user_directory/search", {"limit": 3})
    assert err.value.status == 400
    # wildcard characters are literal
    assert alice.call("POST", "/_matrix/client/v3/user_directory/search", {"search_term": "%"})["results"] == []


def test_user_directory_search_all_users(make_server) -> None:
    srv: ServerProcess = make_server(user_directory={"search_all_users": True})
    alice, carol, gone = srv.client().register(), srv.client().register(), srv.client().register()
    for user, name in ((carol, "Carol Quartermaine"), (gone, "Carol Gone")):
        user.call("PUT", f"/_matrix/client/v3/profile/{user.user_id}/displayname", {"displayname": name})
    gone.call("POST", "/_matrix/client/v3/account/deactivate", {"auth": {
        "type": "m.login.password", "identifier": {"type": "m.id.user", "user": gone.user_id}, "password": gone.password}})
    found = alice.call("POST", "/_matrix/client/v3/user_directory/search", {"search_term": "QUARTER carol"})
    assert [(r["user_id"], r["display_name"]) for r in found["results"]] == [(carol.user_id, "Carol Quartermaine")]
    assert [r["user_id"] for r in alice.call("POST", "/_matrix/client/v3/user_directory/search",
                                             {"search_term": "carol"})["results"]] == [carol.user_id]  # not deactivated ones


def test_profiles_limited_to_users_the_directory_would_find(make_server) -> None:
    """``user_directory.limit_profiles``: another user's profile only for users who share
    a room with the requester or are in a public room; the same 403 for a stranger and
    for an account that does not exist; always one's own, and always for an admin."""
    srv: ServerProcess = make_server(user_directory={"limit_profiles": True})
    alice, bob, carol, dave = (srv.client().register() for _ in range(4))
    for user, name in ((bob, "Bob Shared"), (carol, "Carol Stranger"), (dave, "Dave Public")):
        user.call("PUT", f"/_matrix/client/v3/profile/{user.user_id}/displayname", {"displayname": name})
    room = alice.create_room(invite=[bob.user_id])
    bob.join(room)
    dave.create_room(preset="public_chat")

    def profile(viewer: MatrixHttp, user_id: str, field: str = "") -> tuple[int, dict]:
        resp = viewer.raw("GET", f"/_matrix/client/v3/profile/{user_id}" + (f"/{field}" if field else ""))
        return resp.status_code, resp.json()

    assert profile(alice, bob.user_id) == (200, {"displayname": "Bob Shared"})
    assert profile(alice, dave.user_id, "displayname") == (200, {"displayname": "Dave Public"})
    hidden = profile(alice, carol.user_id)
    assert hidden[0] == 403 and hidden[1]["errcode"] == "M_FORBIDDEN" and "Carol" not in str(hidden[1])
    assert profile(alice, carol.user_id, "displayname")[0] == 403
    nobody = profile(alice, "@nobody-here:localhost")
    assert nobody[0] == 403 and nobody[1] == hidden[1]  # no telling who has an account
    assert profile(carol, carol.user_id) == (200, {"displayname": "Carol Stranger"})
    assert profile(admin_user(srv, "profileadmin"), carol.user_id)[0] == 200
    # Sharing a room makes the profile visible; leaving every shared room hides it again.
    carol_room = carol.create_room(invite=[alice.user_id])
    alice.join(carol_room)
    assert profile(alice, carol.user_id) == (200, {"displayname": "Carol Stranger"})
    alice.call("POST", f"/_matrix/client/v3/rooms/{carol_room}/leave", {})
    assert profile(alice, carol.user_id)[0] == 403


def test_devices_list_rename_and_delete_with_uia(server: ServerProcess) -> None:
    user = server.client().register()
    second = server.client()
    login = second.call("POST", "/_matrix/client/v3/login", {
        "type": "m.login.password", "identifier": {"type": "m.id.user", "user": user.user_id},
        "password": user.password, "initial_device_display_name": "laptop"}, token=False)
    second.token = login["access_token"]
    devices = {d["device_id"]: d for d in user.call("GET", "/_matrix/client/v3/devices")["devices"]}
    assert set(devices) == {user.device_id, login["device_id"]}
    assert devices[login["device_id"]]["display_name"] == "laptop"
    assert "last_seen_ts" in user.call("GET", f"/_matrix/client/v3/devices/{user.device_id}")
    user.call("PUT", f"/_matrix/client/v3/devices/{login['device_id']}", {"display_name": "work laptop"})
    assert user.call("GET", f"/_matrix/client/v3/devices/{login['device_id']}")["display_name"] == "work laptop"
    with pytest.raises(MatrixError) as err:
        user.call("GET", "/_matrix/client/v3/devices/NOSUCHDEVICE")
    assert err.value.status == 404
    with pytest.raises(MatrixError) as err:
        user.call("PUT", "/_matrix/client/v3/devices/NOSUCHDEVICE", {"display_name": "x"})
    assert err.value.status == 404
    first = user.raw("DELETE", f"/_matrix/client/v3/devices/{login['device_id']}", json={})
    assert first.status_code == 401 and first.json()["flows"] == [{"stages": ["m.login.password"]}]
    auth = {"type": "m.login.password", "identifier": {"type": "m.id.user", "user": user.user_id},
            "password": user.password, "session": first.json()["session"]}
    user.call("DELETE", f"/_matrix/client/v3/devices/{login['device_id']}", {"auth": auth})
    assert second.raw("GET", "/_matrix/client/v3/account/whoami").status_code == 401  # logged out at once
    assert [d["device_id"] for d in user.call("GET", "/_matrix/client/v3/devices")["devices"]] == [user.device_id]
    third = server.client()
    third.token = third.call("POST", "/_matrix/client/v3/login", {
        "type": "m.login.password", "identifier": {"type": "m.id.user", "user": user.user_id}, "password": user.password}, token=False)["access_token"]
    devices = [d["device_id"] for d in user.call("GET", "/_matrix/client/v3/devices")["devices"] if d["device_id"] != user.device_id]
    first = user.raw("POST", "/_matrix/client/v3/delete_devices", json={"devices": devices})
    auth["session"] = first.json()["session"]
    user.call("POST", "/_matrix/client/v3/delete_devices", {"devices": devices, "auth": auth})
    assert third.raw("GET", "/_matrix/client/v3/account/whoami").status_code == 401


def test_tags(server: ServerProcess) -> None:
    user = server.client().register()
    room = user.create_room()
    since = user.sync()["next_batch"]
    user.call("PUT", f"/_matrix/client/v3/user/{user.user_id}/rooms/{room}/tags/m.favourite", {"order": 0.25})
    user.call("PUT", f"/_matrix/client/v3/user/{user.user_id}/rooms/{room}/tags/u.work", {})
    assert user.call("GET", f"/_matrix/client/v3/user/{user.user_id}/rooms/{room}/tags") == {
        "tags": {"m.favourite": {"order": 0.25}, "u.work": {}}}
    data = user.sync(since=since)["rooms"]["join"][room]["account_data"]["events"]
    assert {"type": "m.tag", "content": {"tags": {"m.favourite": {"order": 0.25}, "u.work": {}}}} in data
    user.call("DELETE", f"/_matrix/client/v3/user/{user.user_id}/rooms/{room}/tags/u.work")
    assert user.call("GET", f"/_matrix/client/v3/user/{user.user_id}/rooms/{room}/tags") == {"tags": {"m.favourite": {"order": 0.25}}}
    with pytest.raises(MatrixError) as err:
        user.call("PUT", f"/_matrix/client/v3/user/{user.user_id}/rooms/{room}/tags/x", {"order": "first"})
    assert err.value.errcode == "M_BAD_JSON"


def test_account_deactivation(server: ServerProcess) -> None:
    user = server.client().register()
    witness = server.client().register()
    room = user.create_room(invite=[witness.user_id])
    witness.join(room)
    user.send(room, "my words stay")
    first = user.raw("POST", "/_matrix/client/v3/account/deactivate", json={})
    assert first.status_code == 401
    auth = {"type": "m.login.password", "identifier": {"type": "m.id.user", "user": user.user_id},
            "password": user.password, "session": first.json()["session"]}
    assert user.call("POST", "/_matrix/client/v3/account/deactivate", {"auth": auth}) == {"id_server_unbind_result": "no-support"}
    assert user.raw("GET", "/_matrix/client/v3/account/whoami").status_code == 401
    assert set(witness.call("GET", f"/_matrix/client/v3/rooms/{room}/joined_members")["joined"]) == {witness.user_id}
    page = witness.call("GET", f"/_matrix/client/v3/rooms/{room}/messages", params={"dir": "b"})
    assert "my words stay" in [e["content"].get("body") for e in page["chunk"]]
    relogin = server.client().raw("POST", "/_matrix/client/v3/login", json={
        "type": "m.login.password", "identifier": {"type": "m.id.user", "user": user.user_id}, "password": user.password}, token=False)
    assert relogin.status_code == 403


def test_room_upgrade(server: ServerProcess) -> None:
    alice = server.client().register()
    bob = server.client().register()
    room = alice.create_room(name="Old", topic="t", room_alias_name="upgrade-me", invite=[bob.user_id])
    bob.join(room)
    with pytest.raises(MatrixError) as err:
        bob.call("POST", f"/_matrix/client/v3/rooms/{room}/upgrade", {"new_version": "11"})
    assert err.value.status == 403
    with pytest.raises(MatrixError) as err:
        alice.call("POST", f"/_matrix/client/v3/rooms/{room}/upgrade", {"new_version": "3"})
    assert err.value.errcode == "M_UNSUPPORTED_ROOM_VERSION"
    new = alice.call("POST", f"/_matrix/client/v3/rooms/{room}/upgrade", {"new_version": "11"})["replacement_room"]
    tombstone = alice.call("GET", f"/_matrix/client/v3/rooms/{room}/state/m.room.tombstone/")
    assert tombstone["replacement_room"] == new
    create = alice.call("GET", f"/_matrix/client/v3/rooms/{new}/state/m.room.create/")
    assert create["room_version"] == "11" and create["predecessor"]["room_id"] == room
    assert alice.call("GET", f"/_matrix/client/v3/rooms/{new}/state/m.room.name/") == {"name": "Old"}
    assert alice.call("GET", "/_matrix/client/v3/directory/room/%23upgrade-me:localhost")["room_id"] == new
    # The old room is locked down: bob (power 0) can no longer talk there.
    with pytest.raises(MatrixError) as err:
        bob.send(room, "still here?")
    assert err.value.status == 403
    # The room was invite-only: its members are invited to the new room so they can follow.
    assert new in bob.sync()["rooms"]["invite"]
    bob.join(new)


def test_extended_profile_fields(server: ServerProcess) -> None:
    user = server.client().register()
    other = server.client().register()
    user.call("PUT", f"/_matrix/client/v3/profile/{user.user_id}/m.tz", {"m.tz": "Europe/Paris"})
    user.call("PUT", f"/_matrix/client/v3/profile/{user.user_id}/com.example.team", {"com.example.team": {"name": "ops", "size": 4}})
    profile = other.call("GET", f"/_matrix/client/v3/profile/{user.user_id}")
    assert profile["m.tz"] == "Europe/Paris" and profile["com.example.team"] == {"name": "ops", "size": 4}
    assert other.call("GET", f"/_matrix/client/v3/profile/{user.user_id}/m.tz") == {"m.tz": "Europe/Paris"}
    user.call("DELETE", f"/_matrix/client/v3/profile/{user.user_id}/com.example.team")
    assert "com.example.team" not in other.call("GET", f"/_matrix/client/v3/profile/{user.user_id}")
    with pytest.raises(MatrixError) as err:
        user.call("PUT", f"/_matrix/client/v3/profile/{user.user_id}/NotNamespaced", {"NotNamespaced": 1})
    assert err.value.status == 400
    with pytest.raises(MatrixError) as err:
        user.call("PUT", f"/_matrix/client/v3/profile/{user.user_id}/com.example.big", {"com.example.big": "x" * 70_000})
    assert err.value.errcode == "M_PROFILE_TOO_LARGE"
    with pytest.raises(MatrixError) as err:
        other.call("PUT", f"/_matrix/client/v3/profile/{user.user_id}/m.tz", {"m.tz": "UTC"})
    assert err.value.status == 403
    caps = user.call("GET", "/_matrix/client/v3/capabilities")["capabilities"]
    assert caps["m.profile_fields"] == {"enabled": True}
