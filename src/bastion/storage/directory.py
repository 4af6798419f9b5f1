"""Room directory flags, the room settings the user directory needs, and user-directory search."""

from __future__ import annotations

import re
from typing import Any

from bastion.core.events import Event
from bastion.core.visibility import normalise_visibility
from bastion.security.crypto import TEXT_PREFIX
from bastion.storage.database import Txn
from bastion.storage.sealed import unseal_text


def is_public(txn: Txn, room_id: str) -> bool | None:
    value = txn.fetchval("SELECT is_public FROM rooms WHERE room_id = ?", (room_id,))
    return None if value is None else bool(value)


def set_public(txn: Txn, room_id: str, public: bool) -> None:
    txn.execute("UPDATE rooms SET is_public = ? WHERE room_id = ?", (public, room_id))


def public_room_ids(txn: Txn) -> list[str]:
    return [r[0] for r in txn.fetchall("SELECT room_id FROM rooms WHERE is_public = TRUE ORDER BY room_id")]


# -- room settings the user directory needs ------------------------------------------------


def _join_rule(content: dict[str, Any]) -> str:
    """The join rule to keep in ``rooms.join_rule`` (only ever compared with 'public'):
    the event's when it is text a database can hold, else "invite" (as the auth rules
    treat a rule they do not know)."""
    rule = content.get("join_rule")
    return rule if isinstance(rule, str) and "\x00" not in rule else "invite"


def record_room_state(txn: Txn, event: Event) -> None:
    """Keep ``rooms.join_rule`` / ``rooms.history_visibility`` in step with the room state."""
    if event.state_key != "":
        return
    if event.type == "m.room.join_rules":
        txn.execute("UPDATE rooms SET join_rule = ? WHERE room_id = ?", (_join_rule(event.content), event.room_id))
    elif event.type == "m.room.history_visibility":
        visibility = normalise_visibility(event.content.get("history_visibility"))
        txn.execute("UPDATE rooms SET history_visibility = ? WHERE room_id = ?", (visibility, event.room_id))


def fill_room_settings(txn: Txn) -> int:
    """Fill the columns for rooms that predate them (decrypting their state). Returns how many."""
    from bastion.storage import events as events_store  # events.py imports this module

    rooms = [r[0] for r in txn.fetchall("SELECT room_id FROM rooms WHERE join_rule IS NULL OR history_visibility IS NULL")]
    for room_id in rooms:
        ids = txn.fetchall(
            "SELECT type, event_id FROM current_state WHERE room_id = ? AND state_key = '' "
            "AND type IN ('m.room.join_rules', 'm.room.history_visibility')",
            (room_id,),
        )
        events = events_store.get_events(txn, [r[1] for r in ids])
        rule: str = "invite"
        visibility: object = None
        for event in events.values():
            if event.type == "m.room.join_rules":
                rule = _join_rule(event.content)
            else:
                visibility = event.content.get("history_visibility")
        # Only where still unknown: an event persisted meanwhile has already set it.
        txn.execute(
            "UPDATE rooms SET join_rule = ? WHERE room_id = ? AND join_rule IS NULL",
            (rule, room_id),
        )
        txn.execute(
            "UPDATE rooms SET history_visibility = ? WHERE room_id = ? AND history_visibility IS NULL",
            (normalise_visibility(visibility), room_id),
        )
    return len(rooms)


# -- user directory ---------------------------------------------------------------------------

NameCache = dict[tuple[str, str], str | None]
MAX_CACHED_NAMES = 50_000
_WORD_SPLIT = re.compile(r"[^\w]+")


# A room whose members anyone may find (the spec's "public" rooms for the user directory).
_PUBLIC_ROOM = "(r.join_rule = 'public' OR r.history_visibility = 'world_readable')"


def _visible_users_sql(all_users: bool) -> str:
    """Candidates: active users other than the searcher (``?``) whom the searcher (``?``) may find.

    Spec: users who share a room with the searcher, and users joined to rooms whose join
    rule is ``public`` or whose history is ``world_readable`` — or, with
    ``user_directory.search_all_users``, every active user (then only one ``?``).
    """
    base = (
        "SELECT p.user_id, p.displayname, p.avatar_url FROM profiles p JOIN users u ON u.user_id = p.user_id "
        "WHERE u.is_deactivated = FALSE AND p.user_id <> ?"
    )
    if all_users:
        return base
    return base + (
        " AND p.user_id IN ("
        " SELECT m2.user_id FROM memberships m1 JOIN memberships m2 ON m2.room_id = m1.room_id"
        " WHERE m1.user_id = ? AND m1.membership = 'join' AND m2.membership = 'join'"
        " UNION"
        " SELECT m.user_id FROM memberships m JOIN rooms r ON r.room_id = m.room_id"
        f" WHERE m.membership = 'join' AND {_PUBLIC_ROOM})"
    )


def may_find(txn: Txn, searcher: str, target: str, all_users: bool) -> bool:
    """Whether user-directory search would find ``target`` for ``searcher``: the rule of
    :func:`_visible_users_sql` for one user, by primary-key lookups (no scan of every
    public room's members)."""
    sql = "SELECT 1 FROM users WHERE user_id = ? AND is_deactivated = FALSE"
    if all_users:
        return txn.fetchone(sql, (target,)) is not None
    sql += (
        " AND (EXISTS (SELECT 1 FROM memberships m1 JOIN memberships m2 ON m2.user_id = ? AND m2.room_id = m1.room_id"
        " WHERE m1.user_id = ? AND m1.membership = 'join' AND m2.membership = 'join')"
        " OR EXISTS (SELECT 1 FROM memberships m JOIN rooms r ON r.room_id = m.room_id"
        f" WHERE m.user_id = ? AND m.membership = 'join' AND {_PUBLIC_ROOM}))"
    )
    return txn.fetchone(sql, (target, target, searcher, target)) is not None


def _display_name(txn: Txn, user_id: str, stored: str | None, names: NameCache) -> str | None:
    if stored is None or not stored.startswith(TEXT_PREFIX):
        return stored
    key = (user_id, stored)
    if key in names:
        return names[key]
    name = unseal_text(txn, f"profile|{user_id}|displayname", stored)
    if len(names) >= MAX_CACHED_NAMES:
        names.clear()
    names[key] = name
    return name


def _rank(words: list[str], user_id: str, name: str | None) -> int | None:
    """0: every word starts a word of the name or the localpart; 1: every word is in them; None: no match."""
    localpart = user_id[1:].split(":", 1)[0].lower()
    lowered_id = user_id.lower()
    lowered_name = name.lower() if name else ""
    if not all(w in lowered_id or w in lowered_name for w in words):
        return None
    starts = [t for t in _WORD_SPLIT.split(f"{localpart} {lowered_name}") if t]
    return 0 if all(any(t.startswith(w) for t in starts) for w in words) else 1


def search_users(
    txn: Txn, searcher: str, term: str, limit: int, all_users: bool, names: NameCache | None = None
) -> list[tuple[str, str | None, str | None]]:
    """Up to ``limit`` (user ID, display name, avatar URL) whose ID or name has every word of ``term``.

    Display names are encrypted at rest, so visible candidates are selected in SQL and
    matched here, case-insensitively; ``names`` caches decrypted names by ciphertext.
    Best matches first (words starting words), then by name.
    """
    words = term.lower().split()
    if not words or limit <= 0:
        return []
    if names is None:
        names = {}
    params: tuple[str, ...] = (searcher,) if all_users else (searcher, searcher)
    found: list[tuple[int, str, str, str | None, str | None]] = []
    for user_id, stored_name, stored_avatar in txn.fetchall(_visible_users_sql(all_users), params):
        name = _display_name(txn, user_id, stored_name, names)
        rank = _rank(words, user_id, name)
        if rank is not None:
            found.append((rank, (name or user_id[1:]).lower(), user_id, name, stored_avatar))
    found.sort(key=lambda f: f[:3])
    return [
        (user_id, name, unseal_text(txn, f"profile|{user_id}|avatar_url", avatar))
        for _, _, user_id, name, avatar in found[:limit]
    ]
