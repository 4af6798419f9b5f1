"""The room versions Bastion supports and the rule differences between them.

Only versions 10 and 11 are offered (both "stable"). They share the event format
(event IDs are reference hashes, URL-safe Base64) and most auth rules; version 11
changes the redaction algorithm, drops ``creator`` from ``m.room.create`` and moves
``redacts`` into the content of ``m.room.redaction``.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class RoomVersion:
    identifier: str
    # v11 redaction algorithm (keeps all of m.room.create content, redacts in content, ...)
    updated_redaction_rules: bool
    # m.room.create carries content.creator (true before v11)
    implicit_room_creator: bool
    # m.room.redaction carries "redacts" in content rather than at the top level
    redacts_in_content: bool


V10 = RoomVersion("10", updated_redaction_rules=False, implicit_room_creator=False, redacts_in_content=False)
V11 = RoomVersion("11", updated_redaction_rules=True, implicit_room_creator=True, redacts_in_content=True)

KNOWN_ROOM_VERSIONS: dict[str, RoomVersion] = {v.identifier: v for v in (V10, V11)}
DEFAULT_ROOM_VERSION = "10"
