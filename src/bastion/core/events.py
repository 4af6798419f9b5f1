"""Room events: building, hashing, signing, redaction and client serialisation.

An :class:`Event` is the persisted data unit (PDU) of a room plus the server-local
metadata clients see (stream position, transaction ID, ``unsigned`` extras). The
signed PDU dict is stored as one opaque JSON blob; the fields that queries need are
columns (see ``storage/events.py``).

Serialise once: the client form of an event is encoded to bytes the first time it is
needed and reused in every ``/sync`` and ``/messages`` response that carries it. Only
``unsigned.age`` and ``unsigned.transaction_id`` differ per response, and they are
spliced into the cached bytes (see :meth:`Event.client_bytes`).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from typing import Any

import orjson

from bastion.core.canonical_json import encode_canonical
from bastion.core.ids import is_valid_event_id, unpadded_b64, urlsafe_unpadded_b64
from bastion.core.room_versions import RoomVersion
from bastion.core.signing import SigningKey

MAX_PDU_SIZE = 65536
MAX_TYPE_OR_STATE_KEY_BYTES = 255

StateKey = tuple[str, str]

# Event types whose state affects authorisation.
AUTH_EVENT_TYPES = frozenset(
    {
        "m.room.create",
        "m.room.member",
        "m.room.join_rules",
        "m.room.power_levels",
        "m.room.third_party_invite",
    }
)


class Event:
    """One room event. The PDU is immutable once built; metadata is filled on persist."""

    __slots__ = (
        "_client_head",
        "_client_tail",
        "auth_events",
        "content",
        "depth",
        "event_id",
        "origin_server_ts",
        "pdu",
        "prev_events",
        "redacted_because",
        "redacts",
        "replaces_state",
        "room_id",
        "room_version",
        "sender",
        "state_key",
        "stream_ordering",
        "txn_device_id",
        "txn_id",
        "type",
        "unsigned_static",
    )

    def __init__(
        self,
        pdu: dict[str, Any],
        event_id: str,
        room_version: RoomVersion,
        *,
        stream_ordering: int = 0,
        txn_id: str | None = None,
        txn_device_id: str | None = None,
        replaces_state: str | None = None,
        unsigned_static: dict[str, Any] | None = None,
        redacted_because: Event | None = None,
    ) -> None:
        self.pdu = pdu
        self.event_id = event_id
        self.room_version = room_version
        self.room_id: str = pdu["room_id"]
        self.type: str = pdu["type"]
        self.state_key: str | None = pdu.get("state_key")
        self.sender: str = pdu["sender"]
        self.content: dict[str, Any] = pdu["content"]
        self.origin_server_ts: int = pdu["origin_server_ts"]
        self.depth: int = pdu["depth"]
        self.prev_events: list[str] = pdu["prev_events"]
        self.auth_events: list[str] = pdu["auth_events"]
        if room_version.redacts_in_content:
            redacts = self.content.get("redacts") if self.type == "m.room.redaction" else None
        else:
            redacts = pdu.get("redacts")
        self.redacts: str | None = redacts if isinstance(redacts, str) else None
        self.stream_ordering = stream_ordering
        self.txn_id = txn_id
        self.txn_device_id = txn_device_id
        self.replaces_state = replaces_state
        self.unsigned_static = unsigned_static
        self.redacted_because = redacted_because
        self._client_head: bytes | None = None
        self._client_tail: bytes | None = None

    # -- identity -----------------------------------------------------------------

    def is_state(self) -> bool:
        return self.state_key is not None

    @property
    def state_tuple(self) -> StateKey:
        assert self.state_key is not None
        return (self.type, self.state_key)

    @property
    def membership(self) -> str | None:
        if self.type != "m.room.member":
            return None
        value = self.content.get("membership")
        return value if isinstance(value, str) else None

    def __repr__(self) -> str:
        return f"<Event {self.event_id} {self.type} {self.state_key!r} @{self.stream_ordering}>"

    def apply_redaction(self, pruned_pdu: dict[str, Any], redaction: Event) -> None:
        """Replace this event's content by its redacted form (in place, so every holder sees it)."""
        self.pdu = pruned_pdu
        self.content = pruned_pdu["content"]
        if not self.room_version.redacts_in_content:
            redacts = pruned_pdu.get("redacts")
            self.redacts = redacts if isinstance(redacts, str) else None
        self.redacted_because = redaction
        self.invalidate_client_cache()

    def set_prev_content(self, content: dict[str, Any]) -> None:
        self.unsigned_static = {**(self.unsigned_static or {}), "prev_content": content}
        self.invalidate_client_cache()

    # -- client serialisation -------------------------------------------------------

    def client_dict(self, *, include_unsigned: bool = True) -> dict[str, Any]:
        """The client ("ClientEvent") form as a dict (slow path: filters, tests)."""
        data: dict[str, Any] = {
            "content": self.content,
            "event_id": self.event_id,
            "origin_server_ts": self.origin_server_ts,
            "room_id": self.room_id,
            "sender": self.sender,
            "type": self.type,
        }
        if self.state_key is not None:
            data["state_key"] = self.state_key
        if self.type == "m.room.redaction" and self.redacts is not None:
            # Spec (room v11): expose "redacts" both at the top level and in content.
            data["redacts"] = self.redacts
            if "redacts" not in self.content:
                data["content"] = {**self.content, "redacts": self.redacts}
        if include_unsigned:
            data["unsigned"] = self._unsigned_static_dict()
        return data

    def _unsigned_static_dict(self) -> dict[str, Any]:
        unsigned: dict[str, Any] = dict(self.unsigned_static or {})
        if self.redacted_because is not None:
            unsigned["redacted_because"] = self.redacted_because.client_dict()
        return unsigned

    def client_bytes(
        self, now_ms: int, device_key: tuple[str, str] | None = None, relations: dict[str, Any] | None = None
    ) -> bytes:
        """Client JSON bytes with ``unsigned.age`` and, for the sending device, ``transaction_id``.

        ``device_key`` is (user_id, device_id) of the requester; ``relations`` is the
        bundled aggregation to put in ``unsigned.m.relations``, if any.
        """
        head = self._client_head
        if head is None:
            head = self._build_client_cache()
        parts = [head, b'"age":', str(max(0, now_ms - self.origin_server_ts)).encode()]
        if (
            self.txn_id is not None
            and device_key is not None
            and device_key[1] == self.txn_device_id
            and device_key[0] == self.sender
        ):
            parts.append(b',"transaction_id":')
            parts.append(orjson.dumps(self.txn_id))
        if relations:
            parts.append(b',"m.relations":')
            parts.append(orjson.dumps(relations))
        parts.append(self._client_tail or b"}}")
        return b"".join(parts)

    def client_fragment(
        self, now_ms: int, device_key: tuple[str, str] | None = None, relations: dict[str, Any] | None = None
    ) -> orjson.Fragment:
        return orjson.Fragment(self.client_bytes(now_ms, device_key, relations))

    def _build_client_cache(self) -> bytes:
        base = orjson.dumps(self.client_dict(include_unsigned=False))
        head = base[:-1] + b',"unsigned":{'
        unsigned = self._unsigned_static_dict()
        if unsigned:
            tail = b"," + orjson.dumps(unsigned)[1:-1] + b"}}"
        else:
            tail = b"}}"
        self._client_head = head
        self._client_tail = tail
        return head

    def invalidate_client_cache(self) -> None:
        self._client_head = None
        self._client_tail = None

    def federation_dict(self) -> dict[str, Any]:
        data = dict(self.pdu)
        data["event_id"] = self.event_id
        data["unsigned"] = self._unsigned_static_dict()
        return data

    def stripped(self) -> dict[str, Any]:
        """Stripped state form (spec "Stripped state")."""
        return {
            "content": self.content,
            "sender": self.sender,
            "state_key": self.state_key,
            "type": self.type,
        }


# -- redaction -------------------------------------------------------------------------

_V9_TOP_LEVEL_KEYS = frozenset(
    {
        "event_id", "type", "room_id", "sender", "state_key", "content", "hashes",
        "signatures", "depth", "prev_events", "prev_state", "auth_events", "origin",
        "origin_server_ts", "membership",
    }
)
_V11_TOP_LEVEL_KEYS = frozenset(
    {
        "event_id", "type", "room_id", "sender", "state_key", "content", "hashes",
        "signatures", "depth", "prev_events", "auth_events", "origin_server_ts",
    }
)
_V9_CONTENT_KEYS: dict[str, frozenset[str]] = {
    "m.room.member": frozenset({"membership", "join_authorised_via_users_server"}),
    "m.room.create": frozenset({"creator"}),
    "m.room.join_rules": frozenset({"join_rule", "allow"}),
    "m.room.power_levels": frozenset(
        {"ban", "events", "events_default", "kick", "redact", "state_default", "users", "users_default"}
    ),
    "m.room.history_visibility": frozenset({"history_visibility"}),
}
_V11_CONTENT_KEYS: dict[str, frozenset[str]] = {
    "m.room.member": frozenset({"membership", "join_authorised_via_users_server"}),
    "m.room.join_rules": frozenset({"join_rule", "allow"}),
    "m.room.power_levels": frozenset(
        {"ban", "events", "events_default", "invite", "kick", "redact", "state_default", "users", "users_default"}
    ),
    "m.room.history_visibility": frozenset({"history_visibility"}),
    "m.room.redaction": frozenset({"redacts"}),
}


def redact_pdu(pdu: Mapping[str, Any], room_version: RoomVersion) -> dict[str, Any]:
    """Apply the room version's redaction algorithm to a PDU dict (returns a new dict)."""
    if room_version.updated_redaction_rules:
        top_keys, content_keys = _V11_TOP_LEVEL_KEYS, _V11_CONTENT_KEYS
    else:
        top_keys, content_keys = _V9_TOP_LEVEL_KEYS, _V9_CONTENT_KEYS
    out = {k: v for k, v in pdu.items() if k in top_keys}
    event_type = pdu.get("type")
    content = pdu.get("content") or {}
    if room_version.updated_redaction_rules and event_type == "m.room.create":
        new_content = dict(content)
    else:
        allowed = content_keys.get(event_type or "", frozenset())
        new_content = {k: v for k, v in content.items() if k in allowed}
        if (
            room_version.updated_redaction_rules
            and event_type == "m.room.member"
            and isinstance(content.get("third_party_invite"), dict)
            and "signed" in content["third_party_invite"]
        ):
            new_content["third_party_invite"] = {"signed": content["third_party_invite"]["signed"]}
    out["content"] = new_content
    return out


# -- hashing and signing -------------------------------------------------------------------


def compute_content_hash(pdu: Mapping[str, Any]) -> bytes:
    stripped = {k: v for k, v in pdu.items() if k not in ("unsigned", "signatures", "hashes")}
    return hashlib.sha256(encode_canonical(stripped)).digest()


def compute_event_id(pdu: Mapping[str, Any], room_version: RoomVersion) -> str:
    """Event ID = '$' + URL-safe unpadded Base64 of the reference hash (room v4+)."""
    redacted = redact_pdu(pdu, room_version)
    redacted.pop("signatures", None)
    redacted.pop("unsigned", None)
    redacted.pop("event_id", None)
    return "$" + urlsafe_unpadded_b64(hashlib.sha256(encode_canonical(redacted)).digest())


def signing_payload(pdu: Mapping[str, Any], room_version: RoomVersion) -> bytes:
    redacted = redact_pdu(pdu, room_version)
    redacted.pop("signatures", None)
    redacted.pop("unsigned", None)
    redacted.pop("event_id", None)
    return encode_canonical(redacted)


def build_event(
    *,
    room_version: RoomVersion,
    room_id: str,
    sender: str,
    event_type: str,
    content: dict[str, Any],
    state_key: str | None,
    prev_events: list[str],
    auth_events: list[str],
    depth: int,
    origin_server_ts: int,
    signing_key: SigningKey,
    server_name: str,
    redacts: str | None = None,
) -> Event:
    """Build a complete, hashed and signed event. Raises ValueError if it is too large."""
    pdu: dict[str, Any] = {
        "auth_events": auth_events,
        "content": content,
        "depth": depth,
        "origin_server_ts": origin_server_ts,
        "prev_events": prev_events,
        "room_id": room_id,
        "sender": sender,
        "type": event_type,
    }
    if state_key is not None:
        pdu["state_key"] = state_key
    if redacts is not None:
        if room_version.redacts_in_content:
            pdu["content"] = {**content, "redacts": redacts}
        else:
            pdu["redacts"] = redacts
    pdu["hashes"] = {"sha256": unpadded_b64(compute_content_hash(pdu))}
    signature = signing_key.sign(signing_payload(pdu, room_version))
    pdu["signatures"] = {server_name: {signing_key.key_id: unpadded_b64(signature)}}
    if len(encode_canonical(pdu)) > MAX_PDU_SIZE:
        raise ValueError("event is larger than 65536 bytes")
    return Event(pdu, compute_event_id(pdu, room_version), room_version)


def verify_event_signature(event: Event, server_name: str, verify_key: Any, key_id: str) -> bool:
    """Check the event's signature by ``server_name`` with an Ed25519 public key."""
    from bastion.core.ids import decode_unpadded_b64

    sig_b64 = event.pdu.get("signatures", {}).get(server_name, {}).get(key_id)
    if not isinstance(sig_b64, str):
        return False
    try:
        verify_key.verify(decode_unpadded_b64(sig_b64), signing_payload(event.pdu, event.room_version))
    except Exception:
        return False
    return True


def verify_content_hash(event: Event) -> bool:
    expected = event.pdu.get("hashes", {}).get("sha256")
    return expected == unpadded_b64(compute_content_hash(event.pdu))


def event_from_stored(
    pdu_json: bytes | str,
    event_id: str,
    room_version: RoomVersion,
    **meta: Any,
) -> Event:
    return Event(orjson.loads(pdu_json), event_id, room_version, **meta)


def serialise_events(events: Iterable[Event], now_ms: int, device_key: tuple[str, str] | None) -> list[orjson.Fragment]:
    return [e.client_fragment(now_ms, device_key) for e in events]


def thread_root(event: Event) -> str | None:
    """The root of the thread ``event`` is in (an ``m.thread`` relation), or None (main timeline)."""
    relates = event.content.get("m.relates_to")
    if isinstance(relates, dict) and relates.get("rel_type") == "m.thread":
        root = relates.get("event_id")
        return root if is_valid_event_id(root) else None
    return None
