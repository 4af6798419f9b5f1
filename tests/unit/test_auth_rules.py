"""Authorisation rules (rooms v10/v11), driven through a small in-memory room."""

from __future__ import annotations

from typing import Any

import pytest

from bastion.core.auth_rules import check_auth, select_auth_events, user_power_level
from bastion.core.events import Event, build_event
from bastion.core.room_versions import V10, V11, RoomVersion
from bastion.core.signing import SigningKey
from bastion.errors import AuthError

KEY = SigningKey.generate()
ALICE, BOB, CAROL = "@alice:x.org", "@bob:x.org", "@carol:x.org"


class Room:
    """Builds events the way the server does: linear history, auth events from state."""

    def __init__(self, version: RoomVersion = V10) -> None:
        self.version = version
        self.state: dict[tuple[str, str], Event] = {}
        self.prev: list[str] = []
        self.depth = 0

    def make(self, sender: str, etype: str, content: dict[str, Any], state_key: str | None = None) -> Event:
        event = build_event(
            room_version=self.version, room_id="!r:x.org", sender=sender, event_type=etype, content=content,
            state_key=state_key, prev_events=self.prev,
            auth_events=select_auth_events(etype, state_key, sender, content, self.state),
            depth=self.depth + 1, origin_server_ts=1, signing_key=KEY, server_name="x.org",
        )
        return event

    def send(self, sender: str, etype: str, content: dict[str, Any], state_key: str | None = None) -> Event:
        event = self.make(sender, etype, content, state_key)
        check_auth(event, self.state, {"x.org"})
        if state_key is not None:
            self.state[(etype, state_key)] = event
        self.prev = [event.event_id]
        self.depth += 1
        return event

    def refuse(self, sender: str, etype: str, content: dict[str, Any], state_key: str | None = None) -> str:
        event = self.make(sender, etype, content, state_key)
        with pytest.raises(AuthError) as err:
            check_auth(event, self.state, {"x.org"})
        return err.value.reason

    def member(self, sender: str, target: str, membership: str, **extra: Any) -> Event:
        return self.send(sender, "m.room.member", {"membership": membership, **extra}, target)


def new_room(version: RoomVersion = V10, join_rule: str = "invite", **pl: Any) -> Room:
    room = Room(version)
    content = {"room_version": version.identifier}
    if not version.implicit_room_creator:
        content["creator"] = ALICE
    room.send(ALICE, "m.room.create", content, "")
    room.member(ALICE, ALICE, "join")
    levels = {"users": {ALICE: 100}, "state_default": 50, "events_default": 0, "ban": 50, "kick": 50, "redact": 50, "invite": 0}
    levels.update(pl)
    room.send(ALICE, "m.room.power_levels", levels, "")
    room.send(ALICE, "m.room.join_rules", {"join_rule": join_rule}, "")
    return room


@pytest.mark.parametrize("version", [V10, V11])
def test_creator_join_and_invite_only(version: RoomVersion) -> None:
    room = new_room(version)
    assert "invite-only" in room.refuse(BOB, "m.room.member", {"membership": "join"}, BOB)
    room.member(ALICE, BOB, "invite")
    room.member(BOB, BOB, "join")
    assert user_power_level(ALICE, room.state) == 100


def test_create_rules() -> None:
    room = Room(V10)
    assert "creator" in room.refuse(ALICE, "m.room.create", {"room_version": "10"}, "")
    assert "unknown room version" in room.refuse(ALICE, "m.room.create", {"room_version": "99", "creator": ALICE}, "")
    room.prev = ["$something"]
    assert "prev_events" in room.refuse(ALICE, "m.room.create", {"room_version": "10", "creator": ALICE}, "")
    v11 = Room(V11)
    v11.send(ALICE, "m.room.create", {"room_version": "11"}, "")  # no creator needed in v11


def test_public_room_join_and_ban() -> None:
    room = new_room(join_rule="public")
    room.member(BOB, BOB, "join")
    assert "only join on their own behalf" in room.refuse(BOB, "m.room.member", {"membership": "join"}, CAROL)
    room.member(ALICE, BOB, "ban")
    assert "banned" in room.refuse(BOB, "m.room.member", {"membership": "join"}, BOB)
    # Unban needs ban level as well as kick level.
    room.member(ALICE, BOB, "leave")
    room.member(BOB, BOB, "join")


def test_non_member_cannot_send_or_set_state() -> None:
    room = new_room(join_rule="public")
    assert "not in the room" in room.refuse(BOB, "m.room.message", {"body": "hi"})
    room.member(BOB, BOB, "join")
    room.send(BOB, "m.room.message", {"body": "hi"})
    assert "power level 50" in room.refuse(BOB, "m.room.topic", {"topic": "x"}, "")
    assert "reserved" in room.refuse(ALICE, "org.example.profile", {}, BOB)


def test_invite_rules() -> None:
    room = new_room(invite=50)
    room.member(ALICE, BOB, "invite")
    room.member(BOB, BOB, "join")
    assert "too low to invite" in room.refuse(BOB, "m.room.member", {"membership": "invite"}, CAROL)
    room.member(ALICE, CAROL, "invite")
    room.member(CAROL, CAROL, "leave")  # rejecting an invite
    room.member(ALICE, CAROL, "invite")
    room.member(CAROL, CAROL, "join")
    assert "already in the room" in room.refuse(ALICE, "m.room.member", {"membership": "invite"}, CAROL)


def test_kick_needs_higher_level_than_target() -> None:
    room = new_room(join_rule="public", users={ALICE: 100, BOB: 50})
    room.member(BOB, BOB, "join")
    room.member(CAROL, CAROL, "join")
    room.member(BOB, CAROL, "leave")  # bob (50) kicks carol (0)
    room.member(CAROL, CAROL, "join")
    assert "too low to kick" in room.refuse(CAROL, "m.room.member", {"membership": "leave"}, BOB)
    assert "too low to kick" in room.refuse(BOB, "m.room.member", {"membership": "leave"}, ALICE)
    assert "too low to ban" in room.refuse(BOB, "m.room.member", {"membership": "ban"}, ALICE)


def test_power_levels_changes() -> None:
    room = new_room(join_rule="public", users={ALICE: 100, BOB: 50})
    room.member(BOB, BOB, "join")
    base = dict(room.state[("m.room.power_levels", "")].content)
    room.send(ALICE, "m.room.power_levels", {**base, "state_default": 50, "events": {"m.room.power_levels": 50}}, "")
    base = dict(room.state[("m.room.power_levels", "")].content)
    # bob (50) cannot raise someone above himself or change alice (100 >= 50)
    assert "above your own" in room.refuse(BOB, "m.room.power_levels", {**base, "users": {ALICE: 100, BOB: 50, CAROL: 60}}, "")
    assert "at or above your level" in room.refuse(BOB, "m.room.power_levels", {**base, "users": {ALICE: 0, BOB: 50}}, "")
    # but may lower himself and add users up to his level
    room.send(BOB, "m.room.power_levels", {**base, "users": {ALICE: 100, BOB: 50, CAROL: 50}}, "")
    base = dict(room.state[("m.room.power_levels", "")].content)
    # v10: values must be integers, not strings
    assert "integer" in room.refuse(ALICE, "m.room.power_levels", {**base, "ban": "50"}, "")
    assert "integers" in room.refuse(ALICE, "m.room.power_levels", {**base, "events": {"m.room.name": "50"}}, "")
    assert "valid user IDs" in room.refuse(ALICE, "m.room.power_levels", {**base, "users": {"not-a-user": 1}}, "")
    assert "integer" in room.refuse(ALICE, "m.room.power_levels", {**base, "kick": True}, "")


def test_required_level_per_event_type() -> None:
    room = new_room(join_rule="public", events={"m.room.message": 10}, events_default=0)
    room.member(BOB, BOB, "join")
    assert "needs power level 10" in room.refuse(BOB, "m.room.message", {"body": "x"})
    room.send(BOB, "m.reaction", {})


def test_knock_rules() -> None:
    room = new_room(join_rule="knock")
    room.member(BOB, BOB, "knock")
    assert "own behalf" in room.refuse(BOB, "m.room.member", {"membership": "knock"}, CAROL)
    room.member(ALICE, BOB, "invite")
    room.member(BOB, BOB, "join")
    invite_room = new_room(join_rule="invite")
    assert "does not allow knocking" in invite_room.refuse(BOB, "m.room.member", {"membership": "knock"}, BOB)


def test_restricted_join_needs_authorising_member() -> None:
    room = new_room(join_rule="restricted")
    assert "no authorising user" in room.refuse(BOB, "m.room.member", {"membership": "join"}, BOB)
    room.member(BOB, BOB, "join", join_authorised_via_users_server=ALICE)
    assert "cannot invite" in room.refuse(CAROL, "m.room.member", {"membership": "join", "join_authorised_via_users_server": "@dave:x.org"}, CAROL)


def test_auth_events_must_match_selection() -> None:
    room = new_room(join_rule="public")
    event = room.make(ALICE, "m.room.message", {"body": "x"})
    event.auth_events.append(room.state[("m.room.join_rules", "")].event_id)
    with pytest.raises(AuthError, match="not needed"):
        check_auth(event, room.state)
    event = room.make(ALICE, "m.room.message", {"body": "x"})
    event.auth_events[:] = [e for e in event.auth_events if e != room.state[("m.room.create", "")].event_id]
    with pytest.raises(AuthError, match="create"):
        check_auth(event, room.state)


def test_no_power_levels_means_creator_is_100() -> None:
    room = Room(V10)
    room.send(ALICE, "m.room.create", {"room_version": "10", "creator": ALICE}, "")
    room.member(ALICE, ALICE, "join")
    assert user_power_level(ALICE, room.state) == 100
    assert user_power_level(BOB, room.state) == 0
    room.send(ALICE, "m.room.join_rules", {"join_rule": "public"}, "")
    room.member(BOB, BOB, "join")
    room.send(BOB, "m.room.topic", {"topic": "anyone may"}, "")  # state_default is 0 without a PL event
