"""Room authorisation rules for room versions 10 and 11 (spec: rooms/v10, rooms/v11).

Pure functions over a *state map* — ``{(type, state_key): Event}`` — holding the
room state before the event. :func:`check_auth` raises :class:`AuthError` with the
rule that failed; nothing here does I/O.

Bastion persists a linear history per room (every event's ``prev_events`` is the
previous event), so "the current state" and "the state before the event" coincide
and no state resolution is needed for locally created events.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from typing import Any

from bastion.core.events import Event, StateKey
from bastion.core.ids import decode_unpadded_b64, is_valid_user_id, server_of
from bastion.core.room_versions import KNOWN_ROOM_VERSIONS, RoomVersion
from bastion.errors import AuthError

StateMap = Mapping[StateKey, Event]

CREATE = ("m.room.create", "")
POWER_LEVELS = ("m.room.power_levels", "")
JOIN_RULES = ("m.room.join_rules", "")

_PL_INT_KEYS = ("users_default", "events_default", "state_default", "ban", "redact", "kick", "invite")
_DEFAULT_NAMED_LEVELS = {"ban": 50, "kick": 50, "redact": 50, "invite": 0}


def _is_int(value: object) -> bool:
    return type(value) is int


def room_creator(create_event: Event) -> str:
    if create_event.room_version.implicit_room_creator:
        return create_event.sender
    creator = create_event.content.get("creator")
    return creator if isinstance(creator, str) else create_event.sender


def user_power_level(user_id: str, state: StateMap) -> int:
    pl = state.get(POWER_LEVELS)
    if pl is not None:
        users = pl.content.get("users")
        if isinstance(users, dict):
            level = users.get(user_id)
            if _is_int(level):
                return level  # type: ignore[return-value]
        default = pl.content.get("users_default", 0)
        return default if _is_int(default) else 0
    create = state.get(CREATE)
    if create is not None and room_creator(create) == user_id:
        return 100
    return 0


def named_level(name: str, state: StateMap) -> int:
    """Level for ``ban``, ``kick``, ``redact`` or ``invite`` (or the *_default keys)."""
    pl = state.get(POWER_LEVELS)
    if name in _DEFAULT_NAMED_LEVELS:
        default = _DEFAULT_NAMED_LEVELS[name]
    elif name == "state_default":
        default = 50 if pl is not None else 0
    else:
        default = 0
    if pl is None:
        return default
    value = pl.content.get(name, default)
    return value if _is_int(value) else default


def required_power_level(event_type: str, is_state: bool, state: StateMap) -> int:
    pl = state.get(POWER_LEVELS)
    if pl is not None:
        events = pl.content.get("events")
        if isinstance(events, dict):
            level = events.get(event_type)
            if _is_int(level):
                return level  # type: ignore[return-value]
    return named_level("state_default" if is_state else "events_default", state)


def membership_of(user_id: str, state: StateMap) -> str:
    event = state.get(("m.room.member", user_id))
    if event is None:
        return "leave"
    return event.membership or "leave"


def join_rule(state: StateMap) -> str:
    event = state.get(JOIN_RULES)
    if event is None:
        return "invite"
    rule = event.content.get("join_rule")
    return rule if isinstance(rule, str) else "invite"


def auth_types_for_event(
    event_type: str, state_key: str | None, sender: str, content: Mapping[str, Any]
) -> list[StateKey]:
    """The auth events selection algorithm (server-server spec)."""
    if event_type == "m.room.create":
        return []
    wanted: list[StateKey] = [CREATE, POWER_LEVELS, ("m.room.member", sender)]
    if event_type == "m.room.member" and state_key is not None:
        target = ("m.room.member", state_key)
        if target not in wanted:
            wanted.append(target)
        membership = content.get("membership")
        if membership in ("join", "invite", "knock"):
            wanted.append(JOIN_RULES)
        if membership == "invite":
            tpi = content.get("third_party_invite")
            if isinstance(tpi, dict):
                signed = tpi.get("signed")
                if isinstance(signed, dict) and isinstance(signed.get("token"), str):
                    wanted.append(("m.room.third_party_invite", signed["token"]))
        if membership == "join":
            via = content.get("join_authorised_via_users_server")
            if isinstance(via, str):
                key = ("m.room.member", via)
                if key not in wanted:
                    wanted.append(key)
    return wanted


def select_auth_events(event_type: str, state_key: str | None, sender: str, content: Mapping[str, Any], state: StateMap) -> list[str]:
    ids = []
    for key in auth_types_for_event(event_type, state_key, sender, content):
        ev = state.get(key)
        if ev is not None:
            ids.append(ev.event_id)
    return ids


def check_auth(event: Event, state: StateMap, signed_by: Collection[str] | None = None) -> None:
    """Raise :class:`AuthError` unless ``event`` is allowed given ``state`` (state before it)."""
    version = event.room_version
    sender_server = server_of(event.sender)

    # 1. m.room.create
    if event.type == "m.room.create":
        if event.prev_events:
            raise AuthError("m.room.create must not have prev_events")
        if server_of(event.room_id) != sender_server:
            raise AuthError("room ID and sender of m.room.create are on different servers")
        room_version = event.content.get("room_version", "1")
        if room_version not in KNOWN_ROOM_VERSIONS:
            raise AuthError(f"unknown room version {room_version!r}")
        if not version.implicit_room_creator and "creator" not in event.content:
            raise AuthError("m.room.create has no creator")
        return

    # 2. auth events must be consistent with the selection algorithm
    create = state.get(CREATE)
    if create is None:
        raise AuthError("the room has no m.room.create event")
    # Only the selected (type, state_key) pairs may appear, each once, as current state.
    id_to_key: dict[str, StateKey] = {}
    for key in auth_types_for_event(event.type, event.state_key, event.sender, event.content):
        current = state.get(key)
        if current is not None:
            id_to_key[current.event_id] = key
    seen: set[StateKey] = set()
    for eid in event.auth_events:
        found = id_to_key.get(eid)
        if found is None:
            raise AuthError(f"auth event {eid} is not needed to authorise this event or is not current state")
        if found in seen:
            raise AuthError("duplicate auth events")
        seen.add(found)
    if CREATE not in seen:
        raise AuthError("auth events do not include m.room.create")

    # 3. m.federate
    if create.content.get("m.federate") is False and server_of(create.sender) != sender_server:
        raise AuthError("room does not federate")

    # 4. m.room.member
    if event.type == "m.room.member":
        _check_membership(event, state, create, version, signed_by)
        return

    # 5. sender must be joined
    if membership_of(event.sender, state) != "join":
        raise AuthError(f"{event.sender} is not in the room")

    sender_level = user_power_level(event.sender, state)

    # 6. m.room.third_party_invite
    if event.type == "m.room.third_party_invite":
        if sender_level < named_level("invite", state):
            raise AuthError("sender's power level is too low to invite")
        return

    # 7. required power level for the event type
    required = required_power_level(event.type, event.state_key is not None, state)
    if required > sender_level:
        raise AuthError(f"sending {event.type} needs power level {required}; sender has {sender_level}")

    # 8. state keys that look like user IDs belong to that user
    if event.state_key is not None and event.state_key.startswith("@") and event.state_key != event.sender:
        raise AuthError("state keys starting with '@' are reserved for the user they name")

    # 9. m.room.power_levels
    if event.type == "m.room.power_levels":
        _check_power_levels(event, state, sender_level)


def _check_membership(
    event: Event,
    state: StateMap,
    create: Event,
    version: RoomVersion,
    signed_by: Collection[str] | None,
) -> None:
    target = event.state_key
    membership = event.content.get("membership")
    if target is None or not isinstance(membership, str):
        raise AuthError("m.room.member needs a state_key and content.membership")

    via = event.content.get("join_authorised_via_users_server")
    if via is not None:
        if not isinstance(via, str) or not is_valid_user_id(via):
            raise AuthError("join_authorised_via_users_server is not a user ID")
        if signed_by is not None and server_of(via) not in signed_by:
            raise AuthError("event is not signed by the authorising user's server")

    sender = event.sender
    sender_membership = membership_of(sender, state)
    target_membership = membership_of(target, state)
    rule = join_rule(state)

    if membership == "join":
        if (
            len(event.prev_events) == 1
            and event.prev_events[0] == create.event_id
            and target == room_creator(create)
        ):
            return
        if sender != target:
            raise AuthError("users can only join on their own behalf")
        if sender_membership == "ban":
            raise AuthError(f"{sender} is banned from the room")
        if rule in ("invite", "knock"):
            if sender_membership in ("invite", "join"):
                return
            raise AuthError("the room is invite-only and you have not been invited")
        if rule in ("restricted", "knock_restricted"):
            if sender_membership in ("join", "invite"):
                return
            if not isinstance(via, str):
                raise AuthError("restricted room: no authorising user given")
            if membership_of(via, state) != "join" or user_power_level(via, state) < named_level("invite", state):
                raise AuthError("restricted room: the authorising user cannot invite")
            return
        if rule == "public":
            return
        raise AuthError(f"join rule {rule!r} does not allow joining")

    if membership == "invite":
        tpi = event.content.get("third_party_invite")
        if tpi is not None:
            _check_third_party_invite(event, tpi, state, target_membership)
            return
        if sender_membership != "join":
            raise AuthError(f"{sender} is not in the room")
        if target_membership in ("join", "ban"):
            raise AuthError(f"{target} is already {'in the room' if target_membership == 'join' else 'banned'}")
        if user_power_level(sender, state) >= named_level("invite", state):
            return
        raise AuthError("sender's power level is too low to invite")

    if membership == "leave":
        if sender == target:
            if sender_membership in ("invite", "join", "knock"):
                return
            raise AuthError(f"{sender} is not in the room")
        if sender_membership != "join":
            raise AuthError(f"{sender} is not in the room")
        sender_level = user_power_level(sender, state)
        if target_membership == "ban" and sender_level < named_level("ban", state):
            raise AuthError("sender's power level is too low to unban")
        if sender_level >= named_level("kick", state) and user_power_level(target, state) < sender_level:
            return
        raise AuthError("sender's power level is too low to kick this user")

    if membership == "ban":
        if sender_membership != "join":
            raise AuthError(f"{sender} is not in the room")
        sender_level = user_power_level(sender, state)
        if sender_level >= named_level("ban", state) and user_power_level(target, state) < sender_level:
            return
        raise AuthError("sender's power level is too low to ban this user")

    if membership == "knock":
        if rule not in ("knock", "knock_restricted"):
            raise AuthError("the room does not allow knocking")
        if sender != target:
            raise AuthError("users can only knock on their own behalf")
        if sender_membership not in ("ban", "invite", "join"):
            return
        raise AuthError(f"{sender} cannot knock while {sender_membership}")

    raise AuthError(f"unknown membership {membership!r}")


def _check_third_party_invite(event: Event, tpi: Any, state: StateMap, target_membership: str) -> None:
    if target_membership == "ban":
        raise AuthError("target user is banned")
    if not isinstance(tpi, dict) or not isinstance(tpi.get("signed"), dict):
        raise AuthError("third_party_invite has no signed property")
    signed = tpi["signed"]
    mxid, token = signed.get("mxid"), signed.get("token")
    if not isinstance(mxid, str) or not isinstance(token, str):
        raise AuthError("third_party_invite.signed needs mxid and token")
    if mxid != event.state_key:
        raise AuthError("third_party_invite mxid does not match the state key")
    invite_event = state.get(("m.room.third_party_invite", token))
    if invite_event is None:
        raise AuthError("no matching m.room.third_party_invite")
    if invite_event.sender != event.sender:
        raise AuthError("sender does not match the m.room.third_party_invite sender")
    keys: list[str] = []
    if isinstance(invite_event.content.get("public_key"), str):
        keys.append(invite_event.content["public_key"])
    for entry in invite_event.content.get("public_keys") or []:
        if isinstance(entry, dict) and isinstance(entry.get("public_key"), str):
            keys.append(entry["public_key"])
    if _signed_by_any(signed, keys):
        return
    raise AuthError("no valid signature on the third-party invite")


def _signed_by_any(signed: dict[str, Any], public_keys: list[str]) -> bool:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    from bastion.core.canonical_json import encode_canonical

    payload = encode_canonical({k: v for k, v in signed.items() if k not in ("signatures", "unsigned")})
    signatures = signed.get("signatures")
    if not isinstance(signatures, dict):
        return False
    for server_sigs in signatures.values():
        if not isinstance(server_sigs, dict):
            continue
        for sig in server_sigs.values():
            if not isinstance(sig, str):
                continue
            for key in public_keys:
                try:
                    Ed25519PublicKey.from_public_bytes(decode_unpadded_b64(key)).verify(
                        decode_unpadded_b64(sig), payload
                    )
                    return True
                except Exception:
                    continue
    return False


def _check_power_levels(event: Event, state: StateMap, sender_level: int) -> None:
    content = event.content
    for key in _PL_INT_KEYS:
        if key in content and not _is_int(content[key]):
            raise AuthError(f"power level {key!r} must be an integer")
    for key in ("events", "notifications"):
        if key in content:
            value = content[key]
            if not isinstance(value, dict) or not all(_is_int(v) for v in value.values()):
                raise AuthError(f"power levels {key!r} must map to integers")
    if "users" in content:
        users = content["users"]
        if not isinstance(users, dict) or not all(
            is_valid_user_id(k) and _is_int(v) for k, v in users.items()
        ):
            raise AuthError("power levels 'users' must map valid user IDs to integers")

    previous = state.get(POWER_LEVELS)
    if previous is None:
        return
    old = previous.content

    for key in _PL_INT_KEYS:
        if old.get(key) != content.get(key):
            old_value, new_value = old.get(key), content.get(key)
            if isinstance(old_value, int) and old_value > sender_level:
                raise AuthError(f"cannot change {key!r}: its current value is above your level")
            if isinstance(new_value, int) and new_value > sender_level:
                raise AuthError(f"cannot set {key!r} above your own power level")

    for key in ("events", "notifications"):
        old_map = _int_map(old.get(key))
        new_map = _int_map(content.get(key))
        for name in set(old_map) | set(new_map):
            if old_map.get(name) == new_map.get(name):
                continue
            if name in old_map and old_map[name] > sender_level:
                raise AuthError(f"cannot change {key}.{name}: its current value is above your level")
            if name in new_map and new_map[name] > sender_level:
                raise AuthError(f"cannot set {key}.{name} above your own power level")

    old_users = _int_map(old.get("users"))
    new_users = _int_map(content.get("users"))
    for user in set(old_users) | set(new_users):
        if old_users.get(user) == new_users.get(user):
            continue
        if user != event.sender and user in old_users and old_users[user] >= sender_level:
            raise AuthError(f"cannot change the power level of {user}, who is at or above your level")
        if user in new_users and new_users[user] > sender_level:
            raise AuthError(f"cannot give {user} a power level above your own")


def _int_map(value: Any) -> dict[str, int]:
    """The integer entries of a power-levels mapping (others were rejected earlier or never counted)."""
    if not isinstance(value, dict):
        return {}
    return {k: v for k, v in value.items() if _is_int(v)}
