"""Event filters (spec: "Filtering"): parsing with clear errors, and matching.

A :class:`Filter` is parsed once (stored filters are cached by ID) and applied to
events in ``/sync``, ``/messages`` and ``/context``. Wildcards (``*``) in type lists
are compiled to regular expressions once per filter.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from bastion.core.events import Event
from bastion.errors import BadJson

DEFAULT_TIMELINE_LIMIT = 10
MAX_LIMIT = 1000


def _type_matcher(patterns: list[str]) -> tuple[frozenset[str], re.Pattern[str] | None]:
    exact = frozenset(p for p in patterns if "*" not in p)
    wild = [p for p in patterns if "*" in p]
    if not wild:
        return exact, None
    regex = "|".join(re.escape(p).replace(r"\*", ".*") for p in wild)
    return exact, re.compile(f"^(?:{regex})$")


def _matches(value: str, matcher: tuple[frozenset[str], re.Pattern[str] | None]) -> bool:
    exact, regex = matcher
    return value in exact or (regex is not None and regex.match(value) is not None)


def _str_list(obj: dict[str, Any], key: str, where: str) -> list[str] | None:
    if key not in obj or obj[key] is None:
        return None
    value = obj[key]
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise BadJson(f"{where}.{key} must be a list of strings")
    return value


def _bool(obj: dict[str, Any], key: str, where: str, default: bool = False) -> bool:
    value = obj.get(key, default)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise BadJson(f"{where}.{key} must be a boolean")
    return value


@dataclass(frozen=True)
class EventFilter:
    limit: int | None = None
    types: list[str] | None = None
    not_types: list[str] = field(default_factory=list)
    senders: list[str] | None = None
    not_senders: list[str] = field(default_factory=list)
    rooms: list[str] | None = None
    not_rooms: list[str] = field(default_factory=list)
    contains_url: bool | None = None
    lazy_load_members: bool = False
    include_redundant_members: bool = False
    unread_thread_notifications: bool = False
    # Derived (in __post_init__): the event types a database query may select on
    # (``type IN (...)``) when the filter names them exactly (no ``*``); None: every type
    # has to be read and matched.
    exact_types: list[str] | None = field(init=False, default=None, repr=False, compare=False)

    @classmethod
    def parse(cls, obj: Any, where: str, room_filter: bool = False) -> EventFilter:
        if obj is None:
            return cls()
        if not isinstance(obj, dict):
            raise BadJson(f"{where} must be an object")
        limit = obj.get("limit")
        if limit is not None and (type(limit) is not int or limit < 1):
            raise BadJson(f"{where}.limit must be a positive integer")
        contains_url = obj.get("contains_url")
        if contains_url is not None and not isinstance(contains_url, bool):
            raise BadJson(f"{where}.contains_url must be a boolean")
        return cls(
            limit=min(limit, MAX_LIMIT) if limit is not None else None,
            types=_str_list(obj, "types", where),
            not_types=_str_list(obj, "not_types", where) or [],
            senders=_str_list(obj, "senders", where),
            not_senders=_str_list(obj, "not_senders", where) or [],
            rooms=_str_list(obj, "rooms", where) if room_filter else None,
            not_rooms=(_str_list(obj, "not_rooms", where) or []) if room_filter else [],
            contains_url=contains_url,
            lazy_load_members=_bool(obj, "lazy_load_members", where),
            include_redundant_members=_bool(obj, "include_redundant_members", where),
            unread_thread_notifications=_bool(obj, "unread_thread_notifications", where),
        )

    def __post_init__(self) -> None:
        object.__setattr__(self, "_types", _type_matcher(self.types) if self.types is not None else None)
        object.__setattr__(self, "_not_types", _type_matcher(self.not_types))
        object.__setattr__(self, "_senders", frozenset(self.senders) if self.senders is not None else None)
        object.__setattr__(self, "_not_senders", frozenset(self.not_senders))
        object.__setattr__(self, "_rooms", frozenset(self.rooms) if self.rooms is not None else None)
        object.__setattr__(self, "_not_rooms", frozenset(self.not_rooms))
        trivial = (
            self.types is None and not self.not_types and self.senders is None
            and not self.not_senders and self.rooms is None and not self.not_rooms
            and self.contains_url is None
        )
        object.__setattr__(self, "is_trivial", trivial)
        exact = self.types is not None and not any("*" in t for t in self.types)
        object.__setattr__(self, "exact_types", sorted(set(self.types or ())) if exact else None)

    def allows_room(self, room_id: str) -> bool:
        if room_id in self._not_rooms:  # type: ignore[attr-defined]
            return False
        rooms = self._rooms  # type: ignore[attr-defined]
        return rooms is None or room_id in rooms

    def allows_type(self, event_type: str) -> bool:
        if self.not_types and _matches(event_type, self._not_types):  # type: ignore[attr-defined]
            return False
        types = self._types  # type: ignore[attr-defined]
        return types is None or _matches(event_type, types)

    def allows(self, event_type: str, sender: str | None, room_id: str | None = None, content: dict[str, Any] | None = None) -> bool:
        if self.is_trivial:  # type: ignore[attr-defined]
            return True
        if not self.allows_type(event_type):
            return False
        if sender is not None:
            if sender in self._not_senders:  # type: ignore[attr-defined]
                return False
            senders = self._senders  # type: ignore[attr-defined]
            if senders is not None and sender not in senders:
                return False
        if room_id is not None and not self.allows_room(room_id):
            return False
        if self.contains_url is not None:
            has_url = isinstance((content or {}).get("url"), str)
            if has_url != self.contains_url:
                return False
        return True

    def allows_event(self, event: Event) -> bool:
        if self.is_trivial:  # type: ignore[attr-defined]
            return True
        return self.allows(event.type, event.sender, event.room_id, event.content)

    def filter_events(self, events: list[Event]) -> list[Event]:
        if self.is_trivial:  # type: ignore[attr-defined]
            return events
        return [e for e in events if self.allows_event(e)]


@dataclass(frozen=True)
class RoomFilter:
    rooms: list[str] | None = None
    not_rooms: list[str] = field(default_factory=list)
    include_leave: bool = False
    state: EventFilter = field(default_factory=EventFilter)
    timeline: EventFilter = field(default_factory=EventFilter)
    ephemeral: EventFilter = field(default_factory=EventFilter)
    account_data: EventFilter = field(default_factory=EventFilter)

    def allows_room(self, room_id: str) -> bool:
        if room_id in self.not_rooms:
            return False
        return self.rooms is None or room_id in self.rooms


@dataclass(frozen=True)
class Filter:
    """A complete sync filter (spec "Filter" object)."""

    event_fields: list[str] | None = None
    event_format: str = "client"
    presence: EventFilter = field(default_factory=EventFilter)
    account_data: EventFilter = field(default_factory=EventFilter)
    room: RoomFilter = field(default_factory=RoomFilter)

    @classmethod
    def parse(cls, obj: Any) -> Filter:
        if not isinstance(obj, dict):
            raise BadJson("filter must be a JSON object")
        event_fields = _str_list(obj, "event_fields", "filter")
        if event_fields is not None:
            for path in event_fields:
                if not path or path.startswith(".") or path.endswith("."):
                    raise BadJson(f"invalid event_fields entry {path!r}")
        event_format = obj.get("event_format", "client")
        if event_format not in ("client", "federation"):
            raise BadJson("filter.event_format must be 'client' or 'federation'")
        room_obj = obj.get("room")
        if room_obj is None:
            room_obj = {}
        if not isinstance(room_obj, dict):
            raise BadJson("filter.room must be an object")
        room = RoomFilter(
            rooms=_str_list(room_obj, "rooms", "filter.room"),
            not_rooms=_str_list(room_obj, "not_rooms", "filter.room") or [],
            include_leave=_bool(room_obj, "include_leave", "filter.room"),
            state=EventFilter.parse(room_obj.get("state"), "filter.room.state", room_filter=True),
            timeline=EventFilter.parse(room_obj.get("timeline"), "filter.room.timeline", room_filter=True),
            ephemeral=EventFilter.parse(room_obj.get("ephemeral"), "filter.room.ephemeral", room_filter=True),
            account_data=EventFilter.parse(room_obj.get("account_data"), "filter.room.account_data", room_filter=True),
        )
        return cls(
            event_fields=event_fields,
            event_format=event_format,
            presence=EventFilter.parse(obj.get("presence"), "filter.presence"),
            account_data=EventFilter.parse(obj.get("account_data"), "filter.account_data"),
            room=room,
        )

    @property
    def needs_custom_serialisation(self) -> bool:
        return self.event_fields is not None or self.event_format != "client"


def apply_event_fields(event_dict: dict[str, Any], fields: list[str]) -> dict[str, Any]:
    """Keep only the dot-separated paths in ``fields`` (spec appendix: dot-separated paths)."""
    out: dict[str, Any] = {}
    for path in fields:
        parts = _split_path(path)
        src: Any = event_dict
        for part in parts:
            if not isinstance(src, dict) or part not in src:
                src = _MISSING
                break
            src = src[part]
        if src is _MISSING:
            continue
        dst = out
        for part in parts[:-1]:
            dst = dst.setdefault(part, {})
            if not isinstance(dst, dict):
                break
        else:
            dst[parts[-1]] = src
    return out


_MISSING = object()


def _split_path(path: str) -> list[str]:
    """Split on unescaped dots; ``\\.`` is a literal dot and ``\\\\`` a backslash."""
    parts: list[str] = []
    current: list[str] = []
    i = 0
    while i < len(path):
        ch = path[i]
        if ch == "\\" and i + 1 < len(path):
            current.append(path[i + 1])
            i += 2
            continue
        if ch == ".":
            parts.append("".join(current))
            current = []
        else:
            current.append(ch)
        i += 1
    parts.append("".join(current))
    return parts
