"""Room directory flags and user-directory search."""

from __future__ import annotations

from bastion.storage.database import Txn


def is_public(txn: Txn, room_id: str) -> bool | None:
    value = txn.fetchval("SELECT is_public FROM rooms WHERE room_id = ?", (room_id,))
    return None if value is None else bool(value)


def set_public(txn: Txn, room_id: str, public: bool) -> None:
    txn.execute("UPDATE rooms SET is_public = ? WHERE room_id = ?", (public, room_id))


def public_room_ids(txn: Txn) -> list[str]:
    return [r[0] for r in txn.fetchall("SELECT room_id FROM rooms WHERE is_public = TRUE ORDER BY room_id")]


def _like(term: str) -> str:
    escaped = term.lower().replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return f"%{escaped}%"


def search_users(txn: Txn, searcher: str, term: str, limit: int, all_users: bool) -> list[tuple[str, str | None, str | None]]:
    pattern = _like(term)
    visibility = "" if all_users else (
        " AND (p.user_id IN ("
        "   SELECT m2.user_id FROM memberships m1 JOIN memberships m2 ON m2.room_id = m1.room_id"
        "   WHERE m1.user_id = ? AND m1.membership = 'join' AND m2.membership = 'join')"
        " OR p.user_id IN ("
        "   SELECT m.user_id FROM memberships m JOIN rooms r ON r.room_id = m.room_id"
        "   WHERE r.is_public = TRUE AND m.membership = 'join'))"
    )
    params: list[object] = [searcher, pattern, pattern]
    if not all_users:
        params.append(searcher)
    params.append(limit)
    rows = txn.fetchall(
        "SELECT p.user_id, p.displayname, p.avatar_url FROM profiles p JOIN users u ON u.user_id = p.user_id "
        "WHERE u.is_deactivated = FALSE AND p.user_id <> ? "
        "AND (LOWER(p.user_id) LIKE ? ESCAPE '\\' OR LOWER(COALESCE(p.displayname, '')) LIKE ? ESCAPE '\\')"
        + visibility
        + " ORDER BY p.user_id LIMIT ?",
        params,
    )
    return [(r[0], r[1], r[2]) for r in rows]
