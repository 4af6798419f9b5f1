"""Event relationships (``m.relates_to``) as stored in ``events.relates_to``/``rel_type``."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from bastion.storage.database import Txn

BUNDLED_TYPES = ("m.replace", "m.thread", "m.reference")


@dataclass(frozen=True, slots=True)
class ChildRow:
    parent: str
    rel_type: str
    event_id: str
    sender: str
    type: str
    stream_ordering: int
    origin_server_ts: int
    has_state_key: bool


def children_of(txn: Txn, room_id: str, parents: Sequence[str]) -> list[ChildRow]:
    """Children with a bundled relation type, for many parents at once."""
    out: list[ChildRow] = []
    for start in range(0, len(parents), 500):
        chunk = list(parents[start : start + 500])
        rows = txn.fetchall(
            "SELECT relates_to, rel_type, event_id, sender, type, stream_ordering, origin_server_ts, state_key "
            f"FROM events WHERE room_id = ? AND relates_to IN ({txn.in_list(chunk)}) "
            f"AND rel_type IN ({txn.in_list(BUNDLED_TYPES)}) ORDER BY stream_ordering",
            [room_id, *chunk, *BUNDLED_TYPES],
        )
        out += [ChildRow(r[0], r[1], r[2], r[3], r[4], r[5], r[6], r[7] is not None) for r in rows]
    return out


def relating_events(
    txn: Txn,
    room_id: str,
    parents: Sequence[str],
    rel_type: str | None,
    event_type: str | None,
    *,
    after: int | None,
    upto: int | None,
    backwards: bool,
    limit: int,
) -> list[str]:
    """Event IDs relating to any of ``parents``, in stream order (newest first if backwards)."""
    clauses = ["room_id = ?", f"relates_to IN ({txn.in_list(parents)})"]
    params: list[Any] = [room_id, *parents]
    if rel_type is not None:
        clauses.append("rel_type = ?")
        params.append(rel_type)
    if event_type is not None:
        clauses.append("type = ?")
        params.append(event_type)
    if after is not None:
        clauses.append("stream_ordering > ?")
        params.append(after)
    if upto is not None:
        clauses.append("stream_ordering <= ?")
        params.append(upto)
    params.append(limit)
    rows = txn.fetchall(
        f"SELECT event_id FROM events WHERE {' AND '.join(clauses)} "
        f"ORDER BY stream_ordering {'DESC' if backwards else 'ASC'} LIMIT ?",
        params,
    )
    return [r[0] for r in rows]


def thread_roots(txn: Txn, room_id: str, user_id: str | None, before: int | None, limit: int) -> list[tuple[str, int]]:
    """(root event ID, latest reply position), most recently active first.

    ``user_id`` restricts to threads the user started or replied in.
    """
    params: list[Any] = [room_id]
    having = ""
    if user_id is not None:
        having = (
            " HAVING SUM(CASE WHEN e.sender = ? THEN 1 ELSE 0 END) > 0"
            " OR MAX(CASE WHEN r.sender = ? THEN 1 ELSE 0 END) > 0"
        )
    query = (
        "SELECT e.relates_to, MAX(e.stream_ordering) AS latest FROM events e "
        "JOIN events r ON r.event_id = e.relates_to "
        "WHERE e.room_id = ? AND e.rel_type = 'm.thread' GROUP BY e.relates_to" + having
    )
    if user_id is not None:
        params += [user_id, user_id]
    outer = f"SELECT relates_to, latest FROM ({query}) t"
    if before is not None:
        outer += " WHERE latest < ?"
        params.append(before)
    outer += " ORDER BY latest DESC LIMIT ?"
    params.append(limit)
    return [(r[0], r[1]) for r in txn.fetchall(outer, params)]


def live_annotations(txn: Txn, room_id: str, target: str, sender: str, event_type: str) -> list[str]:
    """IDs of the sender's unredacted ``m.annotation`` events of ``event_type`` on ``target``.

    The annotation key is event content (encrypted at rest), so callers compare it on
    the decrypted events; a user has few annotations on one event.
    """
    rows = txn.fetchall(
        "SELECT event_id FROM events WHERE relates_to = ? AND rel_type = 'm.annotation' AND room_id = ? "
        "AND sender = ? AND type = ? AND redacted_by IS NULL",
        (target, room_id, sender, event_type),
    )
    return [r[0] for r in rows]
