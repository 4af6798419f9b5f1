"""Room lifecycle and membership: createRoom, join, invite, leave, kick, ban, unban, forget.

Every change is an event built and authorised by :class:`EventService`; this module
adds the server-side rules the auth rules leave to the server (who may be invited,
what a preset means, restricted joins) and turns request shapes into event chains.
"""

from __future__ import annotations

from typing import Any

from bastion.clock import now_ms
from bastion.core.auth_rules import (
    join_rule,
    membership_of,
    named_level,
    required_power_level,
    user_power_level,
)
from bastion.core.ids import (
    generate_room_id,
    is_valid_room_alias,
    is_valid_room_id,
    is_valid_user_id,
    server_of,
)
from bastion.core.room_versions import KNOWN_ROOM_VERSIONS
from bastion.errors import BadJson, Forbidden, InvalidParam, MatrixError, NotFound
from bastion.services.aliases import AliasService
from bastion.services.caches import MembershipIndex, RoomSnapshot
from bastion.services.directory import DirectoryService
from bastion.services.requester import Requester
from bastion.services.room_events import EventService, EventSpec
from bastion.storage import accounts as accounts_store
from bastion.storage import directory as directory_store
from bastion.storage import rooms as rooms_store
from bastion.storage.database import Database, Txn

PRESETS = {
    "private_chat": ("invite", "shared", "can_join"),
    "trusted_private_chat": ("invite", "shared", "can_join"),
    "public_chat": ("public", "shared", "forbidden"),
}


class RoomInUse(MatrixError):
    errcode = "M_ROOM_IN_USE"


class InvalidRoomState(MatrixError):
    errcode = "M_INVALID_ROOM_STATE"


class UnsupportedRoomVersion(MatrixError):
    errcode = "M_UNSUPPORTED_ROOM_VERSION"


class BadState(MatrixError):
    errcode = "M_BAD_STATE"


def default_power_levels(creator: str, preset: str, invitees: list[str]) -> dict[str, Any]:
    users = {creator: 100}
    if preset == "trusted_private_chat":
        for user in invitees:
            users[user] = 100
    return {
        "users": users,
        "users_default": 0,
        "events": {
            "m.room.name": 50,
            "m.room.power_levels": 100,
            "m.room.history_visibility": 100,
            "m.room.canonical_alias": 50,
            "m.room.avatar": 50,
            "m.room.tombstone": 100,
            "m.room.server_acl": 100,
            "m.room.encryption": 100,
        },
        "events_default": 0,
        "state_default": 50,
        "ban": 50,
        "kick": 50,
        "redact": 50,
        "invite": 50 if preset == "public_chat" else 0,
    }


def _opt_str(body: dict[str, Any], key: str) -> str | None:
    value = body.get(key)
    if value is not None and not isinstance(value, str):
        raise BadJson(f"'{key}' must be a string")
    return value


def _opt_obj(body: dict[str, Any], key: str) -> dict[str, Any] | None:
    value = body.get(key)
    if value is not None and not isinstance(value, dict):
        raise BadJson(f"'{key}' must be an object")
    return value


class RoomService:
    def __init__(
        self,
        *,
        server_name: str,
        db: Database,
        events: EventService,
        memberships: MembershipIndex,
        aliases: AliasService,
        directory: DirectoryService,
        default_room_version: str,
        encrypt_by_default: str = "off",
    ) -> None:
        self._encrypt_by_default = encrypt_by_default
        self.server_name = server_name
        self._db = db
        self._events = events
        self._memberships = memberships
        self.bus: Any = None  # with several workers: tell the others about forgotten rooms
        self._aliases = aliases
        self._default_version = default_room_version
        self._directory = directory

    # -- helpers --------------------------------------------------------------------------

    async def _profile_content(self, user_id: str) -> dict[str, Any]:
        profile = await self._db.read(accounts_store.get_profile, user_id)
        content: dict[str, Any] = {}
        if profile is not None:
            if profile[0] is not None:
                content["displayname"] = profile[0]
            if profile[1] is not None:
                content["avatar_url"] = profile[1]
        return content

    async def _check_local_user(self, user_id: str) -> None:
        if not is_valid_user_id(user_id):
            raise InvalidParam(f"{user_id!r} is not a valid user ID")
        if server_of(user_id) != self.server_name:
            raise Forbidden("This server does not federate; only local users can be invited")
        if not await self._db.read(accounts_store.user_exists, user_id):
            raise NotFound(f"User {user_id} does not exist")

    async def resolve_room(self, room_id_or_alias: str) -> str:
        if room_id_or_alias.startswith("#"):
            if not is_valid_room_alias(room_id_or_alias):
                raise InvalidParam("Invalid room alias")
            found = await self._db.read(rooms_store.get_alias, room_id_or_alias)
            if found is None:
                raise NotFound("Room alias not found")
            return found[0]
        if not is_valid_room_id(room_id_or_alias):
            raise InvalidParam("Invalid room ID or alias")
        return room_id_or_alias

    # -- createRoom ----------------------------------------------------------------------------

    async def create_room(self, requester: Requester, body: dict[str, Any]) -> str:
        creator = requester.user_id
        visibility = body.get("visibility", "private")
        if visibility not in ("public", "private"):
            raise BadJson("'visibility' must be 'public' or 'private'")
        preset = body.get("preset")
        if preset is None:
            preset = "public_chat" if visibility == "public" else "private_chat"
        if not isinstance(preset, str) or preset not in PRESETS:
            raise BadJson("'preset' must be private_chat, trusted_private_chat or public_chat")
        version_id = body.get("room_version", self._default_version)
        if not isinstance(version_id, str):
            raise BadJson("'room_version' must be a string")
        if version_id not in KNOWN_ROOM_VERSIONS:
            raise UnsupportedRoomVersion(f"room version {version_id!r} is not supported")
        version = KNOWN_ROOM_VERSIONS[version_id]
        name = _opt_str(body, "name")
        topic = _opt_str(body, "topic")
        alias_name = _opt_str(body, "room_alias_name")
        creation_content = _opt_obj(body, "creation_content") or {}
        pl_override = _opt_obj(body, "power_level_content_override")
        is_direct = body.get("is_direct", False)
        if not isinstance(is_direct, bool):
            raise BadJson("'is_direct' must be a boolean")
        invites = body.get("invite", [])
        if not isinstance(invites, list) or not all(isinstance(u, str) for u in invites):
            raise BadJson("'invite' must be a list of user IDs")
        invites = [u for u in dict.fromkeys(invites) if u != creator]
        if body.get("invite_3pid"):
            raise Forbidden("Third-party invites are not supported by this server")
        initial_state = body.get("initial_state", [])
        if not isinstance(initial_state, list):
            raise BadJson("'initial_state' must be a list")
        initial_specs: list[EventSpec] = []
        for item in initial_state:
            if not isinstance(item, dict) or not isinstance(item.get("type"), str) or not isinstance(item.get("content"), dict):
                raise BadJson("each initial_state entry needs a string 'type' and an object 'content'")
            state_key = item.get("state_key", "")
            if not isinstance(state_key, str):
                raise BadJson("initial_state 'state_key' must be a string")
            initial_specs.append(EventSpec(creator, item["type"], item["content"], state_key=state_key))
        if visibility == "public" and not self._directory.may_publish(requester, None):
            raise Forbidden("Only server administrators may publish rooms to the directory")

        alias: str | None = None
        if alias_name is not None:
            alias = f"#{alias_name}:{self.server_name}"
            if not alias_name or any(c in alias_name for c in (":", " ", "\t", "\n")) or not is_valid_room_alias(alias):
                raise BadJson("'room_alias_name' is not a valid alias localpart")
            if await self._db.read(rooms_store.get_alias, alias) is not None:
                raise RoomInUse("Room alias already taken")
        for user in invites:
            await self._check_local_user(user)

        room_id = generate_room_id(self.server_name)
        create_content = dict(creation_content)
        create_content["room_version"] = version_id
        if not version.implicit_room_creator:
            create_content["creator"] = creator
        else:
            create_content.pop("creator", None)
        join_rule_value, history, guest = PRESETS[preset]
        power_levels = default_power_levels(creator, preset, invites)
        if pl_override:
            power_levels.update(pl_override)

        specs = [
            EventSpec(creator, "m.room.create", create_content, state_key=""),
            EventSpec(creator, "m.room.member", {"membership": "join", **await self._profile_content(creator)}, state_key=creator),
            EventSpec(creator, "m.room.power_levels", power_levels, state_key=""),
        ]
        if alias is not None:
            specs.append(EventSpec(creator, "m.room.canonical_alias", {"alias": alias}, state_key=""))
        specs += [
            EventSpec(creator, "m.room.join_rules", {"join_rule": join_rule_value}, state_key=""),
            EventSpec(creator, "m.room.history_visibility", {"history_visibility": history}, state_key=""),
            EventSpec(creator, "m.room.guest_access", {"guest_access": guest}, state_key=""),
        ]
        encrypt = self._encrypt_by_default == "all" or (self._encrypt_by_default == "invite" and join_rule_value == "invite")
        if encrypt and not any(s.type == "m.room.encryption" for s in initial_specs):
            specs.append(EventSpec(creator, "m.room.encryption", {"algorithm": "m.megolm.v1.aes-sha2"}, state_key=""))
        specs += initial_specs
        if name is not None:
            specs.append(EventSpec(creator, "m.room.name", {"name": name}, state_key=""))
        if topic is not None:
            specs.append(
                EventSpec(
                    creator,
                    "m.room.topic",
                    {"topic": topic, "m.topic": {"m.text": [{"body": topic, "mimetype": "text/plain"}]}},
                    state_key="",
                )
            )
        for user in invites:
            content: dict[str, Any] = {"membership": "invite", **await self._profile_content(user)}
            if is_direct:
                content["is_direct"] = True
            specs.append(EventSpec(creator, "m.room.member", content, state_key=user))

        ts = now_ms()

        def write_room(txn: Txn) -> None:
            rooms_store.insert_room(txn, room_id, version_id, creator, ts, visibility == "public")
            if alias is not None and not rooms_store.insert_alias(txn, alias, room_id, creator, ts):
                raise RoomInUse("Room alias already taken")

        snapshot = RoomSnapshot(room_id, version, {}, None, 0, 0, [], 0, [])
        rooms = self._events.rooms
        async with snapshot.lock:
            rooms.add(snapshot)
            if alias is not None:
                self._aliases.pending[alias] = room_id
            try:
                await self._events.send_locked(snapshot, specs, pre_writes=[write_room])
            except Forbidden as exc:
                rooms.discard(room_id)
                raise InvalidRoomState(f"The requested initial state is not allowed: {exc.message}") from None
            except BaseException:
                rooms.discard(room_id)
                raise
            finally:
                if alias is not None:
                    self._aliases.pending.pop(alias, None)
        return room_id

    # -- membership -------------------------------------------------------------------------

    async def _membership_event(
        self,
        requester: Requester,
        room: RoomSnapshot,
        target: str,
        membership: str,
        reason: str | None,
        extra: dict[str, Any] | None = None,
    ) -> str:
        content: dict[str, Any] = {"membership": membership}
        if membership in ("join", "invite"):
            content.update(await self._profile_content(target))
        if reason is not None:
            content["reason"] = reason
        if extra:
            content.update(extra)
        (event,) = await self._events.send_locked(room, [EventSpec(requester.user_id, "m.room.member", content, state_key=target)])
        return event.event_id

    async def join(self, requester: Requester, room_id_or_alias: str, reason: str | None = None) -> str:
        room_id = await self.resolve_room(room_id_or_alias)
        room = await self._events.rooms.get(room_id)
        if room is None:
            raise NotFound("No known room with that ID")
        user = requester.user_id
        async with room.lock:
            current = room.membership_of(user)
            if current == "join":
                return room_id
            extra: dict[str, Any] | None = None
            rule = join_rule(room.state)
            if rule in ("restricted", "knock_restricted") and current != "invite":
                extra = {"join_authorised_via_users_server": await self._restricted_join_authoriser(room, user)}
            await self._membership_event(requester, room, user, "join", reason, extra)
        return room_id

    async def _restricted_join_authoriser(self, room: RoomSnapshot, user_id: str) -> str:
        rules = room.state.get(("m.room.join_rules", ""))
        allow = rules.content.get("allow") if rules is not None else None
        rooms = await self._memberships.rooms_for(user_id)
        satisfied = False
        for entry in allow if isinstance(allow, list) else []:
            if (
                isinstance(entry, dict)
                and entry.get("type") == "m.room_membership"
                and isinstance(entry.get("room_id"), str)
            ):
                membership = rooms.get(entry["room_id"])
                if membership is not None and membership.membership == "join":
                    satisfied = True
                    break
        if not satisfied:
            raise Forbidden("You are not a member of any room that grants access to this restricted room")
        invite_level = named_level("invite", room.state)
        candidates = sorted(
            (u for u in room.joined if server_of(u) == self.server_name and user_power_level(u, room.state) >= invite_level),
            key=lambda u: -user_power_level(u, room.state),
        )
        if not candidates:
            raise Forbidden("No member of this room can authorise your join")
        return candidates[0]

    async def invite(self, requester: Requester, room_id: str, target: str, reason: str | None) -> None:
        await self._check_local_user(target)
        room = await self._events.get_room(room_id)
        async with room.lock:
            current = room.membership_of(target)
            if current == "invite" and room.membership_of(requester.user_id) == "join":
                return
            if current == "join":
                raise Forbidden(f"{target} is already in the room")
            await self._membership_event(requester, room, target, "invite", reason)

    async def leave(self, requester: Requester, room_id: str, reason: str | None) -> None:
        room = await self._events.get_room(room_id)
        user = requester.user_id
        async with room.lock:
            current = room.membership_of(user)
            if current in ("leave", "ban"):
                if ("m.room.member", user) in room.state:
                    return
                raise Forbidden("You are not a member of this room")
            await self._membership_event(requester, room, user, "leave", reason)

    async def kick(self, requester: Requester, room_id: str, target: str, reason: str | None) -> None:
        if not is_valid_user_id(target):
            raise InvalidParam("'user_id' is not a valid user ID")
        room = await self._events.get_room(room_id)
        async with room.lock:
            if room.membership_of(target) not in ("join", "invite", "knock"):
                raise Forbidden(f"{target} is not in the room")
            await self._membership_event(requester, room, target, "leave", reason)

    async def ban(self, requester: Requester, room_id: str, target: str, reason: str | None) -> None:
        if not is_valid_user_id(target):
            raise InvalidParam("'user_id' is not a valid user ID")
        room = await self._events.get_room(room_id)
        async with room.lock:
            if room.membership_of(target) == "ban" and membership_of(requester.user_id, room.state) == "join":
                return
            await self._membership_event(requester, room, target, "ban", reason)

    async def unban(self, requester: Requester, room_id: str, target: str, reason: str | None) -> None:
        if not is_valid_user_id(target):
            raise InvalidParam("'user_id' is not a valid user ID")
        room = await self._events.get_room(room_id)
        async with room.lock:
            if room.membership_of(requester.user_id) != "join":
                raise Forbidden("You are not in this room")
            if room.membership_of(target) != "ban":
                raise BadState(f"{target} is not banned")
            await self._membership_event(requester, room, target, "leave", reason)

    async def forget(self, requester: Requester, room_id: str) -> None:
        rooms = await self._memberships.rooms_for(requester.user_id)
        membership = rooms.get(room_id)
        if membership is None:
            raise NotFound("You have never been in this room")
        if membership.membership not in ("leave", "ban"):
            raise MatrixError("You must leave the room before forgetting it", errcode="M_UNKNOWN", status=400)
        await self._db.write(rooms_store.set_forgotten, requester.user_id, room_id)
        self._memberships.set_forgotten(requester.user_id, room_id)
        if self.bus is not None:
            await self.bus.publish("forgotten", {"u": requester.user_id, "r": room_id})

    async def set_membership_state(self, requester: Requester, room_id: str, target: str, content: Any) -> str:
        """PUT /state/m.room.member/{userId}: a membership change given as raw content."""
        if not isinstance(content, dict) or not isinstance(content.get("membership"), str):
            raise BadJson("m.room.member content needs a 'membership' string")
        if not is_valid_user_id(target):
            raise InvalidParam("the state key of m.room.member must be a user ID")
        if content["membership"] == "invite":
            await self._check_local_user(target)
        room = await self._events.get_room(room_id)
        async with room.lock:
            (event,) = await self._events.send_locked(
                room, [EventSpec(requester.user_id, "m.room.member", content, state_key=target)]
            )
        return event.event_id

    # -- upgrades ---------------------------------------------------------------------------

    TRANSFERRED_STATE = (
        "m.room.server_acl",
        "m.room.encryption",
        "m.room.name",
        "m.room.avatar",
        "m.room.topic",
        "m.room.guest_access",
        "m.room.history_visibility",
        "m.room.join_rules",
    )

    async def upgrade(self, requester: Requester, room_id: str, new_version: Any) -> str:
        """POST /rooms/{roomId}/upgrade: new room with the old one's state; tombstone the old."""
        if not isinstance(new_version, str):
            raise BadJson("'new_version' must be a string")
        if new_version not in KNOWN_ROOM_VERSIONS:
            raise UnsupportedRoomVersion(f"room version {new_version!r} is not supported")
        old = await self._events.get_room(room_id)
        user = requester.user_id
        new_room_id = generate_room_id(self.server_name)
        version = KNOWN_ROOM_VERSIONS[new_version]
        async with old.lock:
            state = old.state
            if old.membership_of(user) != "join":
                raise Forbidden("You are not in this room")
            if user_power_level(user, state) < required_power_level("m.room.tombstone", True, state):
                raise Forbidden("You do not have permission to upgrade this room")
            if ("m.room.tombstone", "") in state:
                raise MatrixError("This room has already been upgraded", errcode="M_BAD_STATE", status=400)
            old_create = state[("m.room.create", "")]
            create_content: dict[str, Any] = {
                "room_version": new_version,
                "predecessor": {"room_id": room_id, "event_id": old.latest_event_id},
            }
            for key in ("type", "m.federate"):
                if key in old_create.content:
                    create_content[key] = old_create.content[key]
            if not version.implicit_room_creator:
                create_content["creator"] = user
            old_pl = state.get(("m.room.power_levels", ""))
            power_levels = dict(old_pl.content) if old_pl is not None else default_power_levels(user, "private_chat", [])
            # The upgrader sends the initial state, so they need the power to; the old
            # room's levels are restored as the last step.
            needed = max([100, *[v for v in (power_levels.get("users") or {}).values() if isinstance(v, int)]])
            bootstrap = {**power_levels, "users": {**(power_levels.get("users") or {}), user: needed}}
            specs = [
                EventSpec(user, "m.room.create", create_content, state_key=""),
                EventSpec(user, "m.room.member", {"membership": "join", **await self._profile_content(user)}, state_key=user),
                EventSpec(user, "m.room.power_levels", bootstrap, state_key=""),
            ]
            for event_type in self.TRANSFERRED_STATE:
                event = state.get((event_type, ""))
                if event is not None:
                    specs.append(EventSpec(user, event_type, dict(event.content), state_key=""))
            for (event_type, target), event in state.items():
                if event_type == "m.room.member" and event.membership == "ban":
                    specs.append(EventSpec(user, "m.room.member", {"membership": "ban"}, state_key=target))
            if bootstrap != power_levels:
                specs.append(EventSpec(user, "m.room.power_levels", power_levels, state_key=""))
            aliases = await self._db.read(rooms_store.aliases_for_room, room_id)
            canonical = state.get(("m.room.canonical_alias", ""))
            if canonical is not None and canonical.content.get("alias") in aliases:
                specs.append(EventSpec(user, "m.room.canonical_alias", dict(canonical.content), state_key=""))
            if join_rule(state) != "public":
                # Members of a private room must be able to follow it: invite them.
                for member in sorted(old.joined - {user}):
                    content = {"membership": "invite", **await self._profile_content(member)}
                    specs.append(EventSpec(user, "m.room.member", content, state_key=member))

            ts = now_ms()
            public = bool(await self._db.read(directory_store.is_public, room_id))

            def write_room(txn: Txn) -> None:
                rooms_store.insert_room(txn, new_room_id, new_version, user, ts, public)
                directory_store.set_public(txn, room_id, False)
                for alias in aliases:
                    rooms_store.move_alias(txn, alias, new_room_id)

            snapshot = RoomSnapshot(new_room_id, version, {}, None, 0, 0, [], 0, [])
            rooms = self._events.rooms
            async with snapshot.lock:
                rooms.add(snapshot)
                for alias in aliases:
                    self._aliases.pending[alias] = new_room_id
                try:
                    await self._events.send_locked(snapshot, specs, pre_writes=[write_room])
                except BaseException:
                    rooms.discard(new_room_id)
                    raise
                finally:
                    for alias in aliases:
                        self._aliases.pending.pop(alias, None)
            # Tombstone and lock down the old room.
            restricted = dict(old_pl.content) if old_pl is not None else {}

            def level(key: str) -> int:
                value = restricted.get(key, 0)
                return value if isinstance(value, int) else 0

            floor = max(50, level("users_default") + 1)
            restricted["events_default"] = max(floor, level("events_default"))
            restricted["invite"] = max(floor, level("invite"))
            old_specs = [
                EventSpec(user, "m.room.tombstone", {"body": "This room has been replaced", "replacement_room": new_room_id}, state_key=""),
            ]
            if old_pl is not None:
                old_specs.append(EventSpec(user, "m.room.power_levels", restricted, state_key=""))
            if canonical is not None and aliases:
                old_specs.append(EventSpec(user, "m.room.canonical_alias", {}, state_key=""))
            try:
                await self._events.send_locked(old, old_specs)
            except Forbidden:
                # The tombstone itself was checked above; lowering power levels may be refused
                # if the upgrader lacks the power. The tombstone alone still redirects clients.
                await self._events.send_locked(old, old_specs[:1])
        return new_room_id
