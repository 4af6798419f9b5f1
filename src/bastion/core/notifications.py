"""Which events count as unread notifications and highlights for a user.

A compact evaluation of the spec's *default* push rules as of Matrix v1.17
(``.m.rule.suppress_notices``, ``.m.rule.suppress_edits``, ``.m.rule.is_user_mention``,
``.m.rule.is_room_mention``, ``.m.rule.tombstone``, ``.m.rule.message``,
``.m.rule.encrypted`` and the call/poll underrides; see :mod:`bastion.core.push_rules`). It feeds ``unread_notifications`` in ``/sync``; user-defined push rules
plug in here when ``/pushrules`` writes are supported.
"""

from __future__ import annotations

from typing import Any

from bastion.core.events import Event

COUNTED_TYPES = frozenset(
    {
        "m.room.message",
        "m.room.encrypted",
        "m.sticker",
        "m.call.invite",
        "m.poll.start",
        "org.matrix.msc3381.poll.start",
    }
)


def classify(
    event: Event,
    user_id: str,
    sender_level: int,
    room_notification_level: int,
) -> tuple[bool, bool]:
    """(notify, highlight) for ``user_id`` receiving ``event``."""
    if event.sender == user_id:
        return False, False
    if event.state_key is not None:
        tombstone = event.type == "m.room.tombstone" and event.state_key == ""
        return tombstone, tombstone
    content: dict[str, Any] = event.content
    if event.type == "m.room.message" and content.get("msgtype") == "m.notice":
        return False, False
    relates = content.get("m.relates_to")
    if isinstance(relates, dict) and relates.get("rel_type") == "m.replace":
        return False, False
    highlight = False
    mentions = content.get("m.mentions")
    if isinstance(mentions, dict):
        user_ids = mentions.get("user_ids")
        if isinstance(user_ids, list) and user_id in user_ids:
            highlight = True
        if mentions.get("room") is True and sender_level >= room_notification_level:
            highlight = True
    if highlight:
        return True, True
    return event.type in COUNTED_TYPES, False
