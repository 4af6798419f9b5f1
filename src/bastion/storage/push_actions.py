"""What push rules decided for each (user, event) when the event arrived.

One row per user an event notified. The event's transaction writes them to
``event_push_actions_staging`` (ordered by stream position, so a commit appends to a
page or two); :func:`move_staged` later moves them in one batch to
``event_push_actions`` (ordered by user, for the per-user queries). Every reader
looks at both tables, so a row is visible from the commit of its event on. Rows are
never rewritten: unread counts are the rows after the user's read position, and
``/notifications`` lists them newest first. Rows below the read position stay (they
are ``/notifications`` history with ``read: true``); nothing deletes them yet.

Actions that a user's own rule produced can carry what the user wrote (tweak values),
and rules are sealed at rest, so those are sealed under the user's key. The action
lists of the spec's server-default rules are public: a row stores their number in
:data:`ACTION_PRESETS` instead (no encryption for the common case, nothing in clear).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import orjson

from bastion.core.events import Event
from bastion.storage import events as events_store
from bastion.storage.database import Txn
from bastion.storage.keys import SealedColumn, register_column
from bastion.storage.sealed import seal_text, unseal_text

# Append only: stored rows refer to these by position.
ACTION_PRESETS: tuple[str, ...] = (
    '["notify"]',
    '["notify",{"set_tweak":"sound","value":"default"}]',
    '["notify",{"set_tweak":"highlight"}]',
    '["notify",{"set_tweak":"sound","value":"default"},{"set_tweak":"highlight"}]',
    '["notify",{"set_tweak":"sound","value":"ring"}]',
)
_PRESET_OF = {actions: index for index, actions in enumerate(ACTION_PRESETS)}


def actions_binding(user_id: str, stream_ordering: int) -> str:
    return f"push_action|{user_id}|{stream_ordering}"


register_column(SealedColumn("event_push_actions", ("user_id", "stream_ordering"), "actions", "user", "user_id", True,
                             lambda k: actions_binding(k[0], k[1])))
register_column(SealedColumn("event_push_actions_staging", ("stream_ordering", "user_id"), "actions", "user", "user_id",
                             True, lambda k: actions_binding(k[1], k[0])))

# user_id, room_id, event_id, stream_ordering, highlight, actions (JSON text), thread root (None: main timeline)
PushActionRow = tuple[str, str, str, int, bool, str, str | None]

_COLUMNS = "user_id, room_id, event_id, stream_ordering, notify, highlight, actions_preset, actions, thread_id"
_BOTH = (
    f"(SELECT {_COLUMNS} FROM event_push_actions WHERE {{where}} "
    f"UNION ALL SELECT {_COLUMNS} FROM event_push_actions_staging WHERE {{where}}) a"
)


def insert_push_actions(txn: Txn, rows: Sequence[PushActionRow]) -> None:
    """Stage rows of notifying (user, event) pairs, in the event's transaction."""
    values = []
    for user_id, room_id, event_id, stream_ordering, highlight, actions, thread_id in rows:
        preset = _PRESET_OF.get(actions)
        sealed = None if preset is not None else seal_text(
            txn, "user", user_id, actions_binding(user_id, stream_ordering), actions
        )
        values.append((user_id, room_id, event_id, stream_ordering, True, highlight, preset, sealed, thread_id))
    txn.executemany(
        f"INSERT INTO event_push_actions_staging ({_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)", values
    )


def _actions(txn: Txn, user_id: str, stream_ordering: int, preset: int | None, sealed: str | None) -> list[Any]:
    if preset is not None:
        return list(orjson.loads(ACTION_PRESETS[preset]))
    text = unseal_text(txn, actions_binding(user_id, stream_ordering), sealed)
    return list(orjson.loads(text)) if text is not None else []


def move_staged(txn: Txn) -> int:
    """Move every staged row to ``event_push_actions``. Returns how many.

    Only committed rows are visible here, and the event writer assigns stream positions
    in commit order, so no row at or below the highest staged position can still
    arrive: moving up to it loses nothing on either database.
    """
    upto = txn.fetchval("SELECT MAX(stream_ordering) FROM event_push_actions_staging")
    if upto is None:
        return 0
    txn.execute(
        f"INSERT INTO event_push_actions ({_COLUMNS}) SELECT {_COLUMNS} FROM event_push_actions_staging "
        "WHERE stream_ordering <= ? ON CONFLICT DO NOTHING",  # several workers may move the same rows
        (upto,),
    )
    txn.execute("UPDATE push_actions_moved SET upto = ? WHERE only_row = 1 AND upto < ?", (upto, upto))
    return txn.execute("DELETE FROM event_push_actions_staging WHERE stream_ordering <= ?", (upto,))


def staged_decisions(txn: Txn, after: int, upto: int) -> dict[str, tuple[list[str], list[str]]] | None:
    """{event ID: (users notified, users highlighted)} for the events in ``(after, upto]``
    (an event missing notified nobody), or None if some of their rows were moved on.

    Moves go in stream order, so the staging table holds every row of the range exactly
    when nothing above ``after`` has been moved. The staging rows are read first: a move
    committing between the two statements then shows in the second, and the answer is
    None rather than a partial one.
    """
    rows = txn.fetchall(
        "SELECT event_id, user_id, highlight FROM event_push_actions_staging "
        "WHERE stream_ordering > ? AND stream_ordering <= ? AND notify",
        (after, upto),
    )
    if int(txn.fetchval("SELECT upto FROM push_actions_moved WHERE only_row = 1")) > after:
        return None
    out: dict[str, tuple[list[str], list[str]]] = {}
    for event_id, user_id, highlight in rows:
        notified, highlighted = out.setdefault(event_id, ([], []))
        notified.append(user_id)
        if highlight:
            highlighted.append(user_id)
    return out


def count_unread(txn: Txn, user_id: str, room_id: str, after: int, upto: int) -> tuple[int, int]:
    """(notifications, highlights) with ``after < stream_ordering <= upto``."""
    where = "user_id = ? AND room_id = ? AND stream_ordering > ? AND stream_ordering <= ? AND notify"
    row = txn.fetchone(
        "SELECT COUNT(*), COALESCE(SUM(CASE WHEN highlight THEN 1 ELSE 0 END), 0) FROM " + _BOTH.format(where=where),
        (user_id, room_id, after, upto) * 2,
    )
    return (int(row[0]), int(row[1])) if row is not None else (0, 0)


UNREAD_ROWS_LIMIT = 10_000


def unread_rows(
    txn: Txn, user_id: str, room_id: str, after: int, upto: int, limit: int = UNREAD_ROWS_LIMIT
) -> list[tuple[int, bool, str | None]]:
    """(stream ordering, highlight, thread root) of the notifying rows in ``(after, upto]``, newest first."""
    where = "user_id = ? AND room_id = ? AND stream_ordering > ? AND stream_ordering <= ? AND notify"
    rows = txn.fetchall(
        "SELECT stream_ordering, highlight, thread_id FROM " + _BOTH.format(where=where)
        + " ORDER BY stream_ordering DESC LIMIT ?",
        (*((user_id, room_id, after, upto) * 2), limit),
    )
    return [(int(r[0]), bool(r[1]), r[2]) for r in rows]


def unread_rows_many(
    txn: Txn, user_id: str, rooms: Sequence[tuple[str, int]], upto: int
) -> dict[str, list[tuple[int, bool, str | None]]]:
    """:func:`unread_rows` for several ``(room, after)`` pairs in one transaction: on
    PostgreSQL in one statement (a lateral join over the pairs), on SQLite (in-process,
    microseconds a statement) one statement per room."""
    if txn.dialect == "sqlite" or not rooms:
        return {room_id: unread_rows(txn, user_id, room_id, after, upto) for room_id, after in rooms}
    where = "user_id = ? AND room_id = q.room_id AND stream_ordering > q.after AND stream_ordering <= ? AND notify"
    rows = txn.fetchall(
        "SELECT q.room_id, x.stream_ordering, x.highlight, x.thread_id "
        "FROM unnest(?::text[], ?::bigint[]) AS q(room_id, after) CROSS JOIN LATERAL "
        f"(SELECT stream_ordering, highlight, thread_id FROM {_BOTH.format(where=where)} "
        "ORDER BY stream_ordering DESC LIMIT ?) AS x",
        ([r for r, _ in rooms], [a for _, a in rooms], *((user_id, upto) * 2), UNREAD_ROWS_LIMIT),
    )
    out: dict[str, list[tuple[int, bool, str | None]]] = {room_id: [] for room_id, _ in rooms}
    for room_id, position, highlight, thread in rows:
        out[room_id].append((int(position), bool(highlight), thread))
    for found in out.values():
        found.sort(key=lambda row: -row[0])
    return out


def actions_for(txn: Txn, user_id: str, stream_ordering: int) -> list[Any] | None:
    """The actions stored for the user and the event at ``stream_ordering``, if it notified them."""
    row = txn.fetchone(
        "SELECT actions_preset, actions FROM " + _BOTH.format(where="user_id = ? AND stream_ordering = ?"),
        (user_id, stream_ordering) * 2,
    )
    return _actions(txn, user_id, stream_ordering, row[0], row[1]) if row is not None else None


@dataclass(frozen=True, slots=True)
class Notification:
    room_id: str
    stream_ordering: int
    highlight: bool
    actions: list[Any]
    event: Event


def notifications_for(
    txn: Txn, user_id: str, before: int | None, limit: int, only_highlight: bool
) -> list[Notification]:
    """Newest first, in rooms the user is joined to now, with the events loaded."""
    clauses = ["user_id = ?", "notify"]
    params: list[Any] = [user_id]
    if before is not None:
        clauses.append("stream_ordering < ?")
        params.append(before)
    if only_highlight:
        clauses.append("highlight")
    rows = txn.fetchall(
        "SELECT a.room_id, a.event_id, a.stream_ordering, a.highlight, a.actions_preset, a.actions FROM "
        + _BOTH.format(where=" AND ".join(clauses))
        + " JOIN memberships m ON m.user_id = a.user_id AND m.room_id = a.room_id AND m.membership = 'join' "
        "ORDER BY a.stream_ordering DESC LIMIT ?",
        [*params, *params, limit],
    )
    events = events_store.get_events(txn, [r[1] for r in rows])
    return [
        Notification(r[0], r[2], bool(r[3]), _actions(txn, user_id, r[2], r[4], r[5]), events[r[1]])
        for r in rows
        if r[1] in events
    ]
