"""Room events and room state in the database.

The signed event is one opaque JSON blob (``events.json``); the fields queries need
are columns: room, stream position, type, state key, sender, membership, relation.
That is what lets encryption at rest wrap the blob later without touching queries.

State is not copied per event: the state of a room after stream position *p* is,
for each (type, state_key), the state event with the highest stream ordering <= p.
``current_state`` holds the answer for "now" so the common case is one lookup.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from typing import Any

import orjson

from bastion.core.events import Event, StateKey, redact_pdu
from bastion.core.ids import is_valid_event_id
from bastion.core.room_versions import KNOWN_ROOM_VERSIONS
from bastion.security.crypto import IntegrityError
from bastion.storage import directory as directory_store
from bastion.storage import search as search_store
from bastion.storage.database import Txn
from bastion.storage.sealed import seal, unseal

log = logging.getLogger(__name__)

_EVENT_COLUMNS = (
    "e.stream_ordering, e.event_id, e.json, e.txn_id, e.txn_device_id, e.replaces_state, "
    "e.unsigned_static, e.redacted_by, r.room_version, e.state_key"
)
_FROM = "events e JOIN rooms r ON r.room_id = e.room_id"


def _row_to_event(txn: Txn, row: Sequence[Any]) -> Event:
    event_id = row[1]
    unsigned = orjson.loads(unseal(txn, f"event|{event_id}|unsigned", row[6])) if row[6] is not None else None
    return Event(
        orjson.loads(unseal(txn, f"event|{event_id}|json", row[2])),
        row[1],
        KNOWN_ROOM_VERSIONS[row[8]],
        stream_ordering=row[0],
        txn_id=row[3],
        txn_device_id=row[4],
        replaces_state=row[5],
        unsigned_static=unsigned,
    )


def _load_rows(txn: Txn, rows: Sequence[Sequence[Any]], strict: bool = False) -> list[Event]:
    """Events from rows. A message whose ciphertext fails its integrity check is left out
    of lists (and logged) so one damaged row cannot take a room's history down; a *state*
    event that fails is an error (serving a room without, say, its bans would fail open),
    as is any failure when ``strict`` (one event asked for by ID)."""
    events: list[Event] = []
    kept: list[Sequence[Any]] = []
    if txn.crypto is not None and len(rows) > 1:
        txn.crypto.preload(txn, (row[2] for row in rows))
    for row in rows:
        try:
            events.append(_row_to_event(txn, row))
            kept.append(row)
        except IntegrityError as exc:
            if strict or row[9] is not None:
                raise
            log.error("event %s failed its integrity check and was left out: %s", row[1], exc)
    rows = kept
    redactions: dict[str, list[Event]] = {}
    for row, event in zip(rows, events, strict=True):
        if row[7] is not None:
            redactions.setdefault(row[7], []).append(event)
    if redactions:
        for redaction in get_events(txn, list(redactions)).values():
            for event in redactions[redaction.event_id]:
                event.redacted_because = redaction
    return events


def get_events(txn: Txn, event_ids: Sequence[str], strict: bool = False) -> dict[str, Event]:
    out: dict[str, Event] = {}
    ids = list(dict.fromkeys(event_ids))
    for start in range(0, len(ids), 500):
        chunk = ids[start : start + 500]
        rows = txn.fetchall(
            f"SELECT {_EVENT_COLUMNS} FROM {_FROM} WHERE e.event_id IN ({txn.in_list(chunk)})", chunk
        )
        for event in _load_rows(txn, rows, strict=strict):
            out[event.event_id] = event
    return out


def events_in_range(txn: Txn, after: int, upto: int) -> tuple[list[Event], dict[str, list[str]]]:
    """Every event with ``after < stream_ordering <= upto`` (another worker's writes), in order,
    and for each redaction among them the events whose ``prev_content`` copied its target."""
    rows = txn.fetchall(
        f"SELECT {_EVENT_COLUMNS} FROM {_FROM} WHERE e.stream_ordering > ? AND e.stream_ordering <= ? "
        "ORDER BY e.stream_ordering",
        (after, upto),
    )
    events = _load_rows(txn, rows)
    replacing = {e.redacts: events_replacing(txn, e.redacts) for e in events if e.redacts is not None}
    return events, replacing


def get_room_events(
    txn: Txn,
    room_id: str,
    *,
    after: int | None = None,
    upto: int | None = None,
    limit: int,
    backwards: bool,
    types: Sequence[str] | None = None,
) -> list[Event]:
    """Events with ``after < stream_ordering <= upto``, newest first if ``backwards``;
    only events of ``types`` if given."""
    clauses = ["e.room_id = ?"]
    params: list[Any] = [room_id]
    if types is not None:
        if not types:
            return []
        where, type_params = txn.any_of("e.type", types)
        clauses.append(where)
        params += type_params
    if after is not None:
        clauses.append("e.stream_ordering > ?")
        params.append(after)
    if upto is not None:
        clauses.append("e.stream_ordering <= ?")
        params.append(upto)
    order = "DESC" if backwards else "ASC"
    params.append(limit)
    rows = txn.fetchall(
        f"SELECT {_EVENT_COLUMNS} FROM {_FROM} WHERE {' AND '.join(clauses)} "
        f"ORDER BY e.stream_ordering {order} LIMIT ?",
        params,
    )
    return _load_rows(txn, rows)


def newest_events_many(
    txn: Txn, room_ids: Sequence[str], limit: int
) -> dict[str, tuple[list[Event], tuple[str, int, int]]]:
    """For each room that has events: its ``limit`` newest events, oldest first, and
    (event_id, depth, stream_ordering) of the newest, as :func:`latest_room_event` gives it
    (read from the row, so a damaged newest event still counts).

    PostgreSQL reads every room in one statement (a lateral join: one index walk per room);
    SQLite runs in-process, where one statement per room costs microseconds."""
    columns = f"{_EVENT_COLUMNS}, e.depth, e.room_id"
    newest_first = f"SELECT {columns} FROM {_FROM} WHERE e.room_id = ? ORDER BY e.stream_ordering DESC LIMIT ?"
    if not room_ids:
        return {}
    if txn.dialect == "sqlite":
        rows = [row for room_id in room_ids for row in txn.fetchall(newest_first, (room_id, limit))]
    else:
        rows = txn.fetchall(
            f"SELECT x.* FROM unnest(?::text[]) AS q(room_id) CROSS JOIN LATERAL "
            f"({newest_first.replace('e.room_id = ?', 'e.room_id = q.room_id')}) AS x",
            (list(room_ids), limit),
        )
    rows.sort(key=lambda r: r[0])  # oldest first, whatever order the rooms came back in
    latest: dict[str, tuple[str, int, int]] = {r[11]: (r[1], r[10], r[0]) for r in rows}  # the last row wins
    out: dict[str, tuple[list[Event], tuple[str, int, int]]] = {room_id: ([], top) for room_id, top in latest.items()}
    for event in _load_rows(txn, rows):
        out[event.room_id][0].append(event)
    return out


def recent_events_in_rooms(txn: Txn, room_ids: Sequence[str], before: int | None, limit: int, not_sender: str) -> list[Event]:
    """Newest events (not sent by ``not_sender``) across ``room_ids``, before a position."""
    if not room_ids:
        return []
    params: list[Any] = [*room_ids, not_sender]
    clause = ""
    if before is not None:
        clause = " AND e.stream_ordering < ?"
        params.append(before)
    params.append(limit)
    rows = txn.fetchall(
        f"SELECT {_EVENT_COLUMNS} FROM {_FROM} WHERE e.room_id IN ({txn.in_list(room_ids)}) AND e.sender <> ?"
        f"{clause} ORDER BY e.stream_ordering DESC LIMIT ?",
        params,
    )
    return _load_rows(txn, rows)


def count_room_events_after(txn: Txn, room_id: str, after: int, upto: int) -> int:
    return int(
        txn.fetchval(
            "SELECT COUNT(*) FROM events WHERE room_id = ? AND stream_ordering > ? AND stream_ordering <= ?",
            (room_id, after, upto),
        )
    )


def max_stream_ordering(txn: Txn) -> int:
    return int(txn.fetchval("SELECT COALESCE(MAX(stream_ordering), 0) FROM events"))


def latest_room_event(txn: Txn, room_id: str) -> tuple[str, int, int] | None:
    """(event_id, depth, stream_ordering) of the newest event in the room."""
    row = txn.fetchone(
        "SELECT event_id, depth, stream_ordering FROM events WHERE room_id = ? ORDER BY stream_ordering DESC LIMIT 1",
        (room_id,),
    )
    return (row[0], row[1], row[2]) if row is not None else None


def last_event_by_sender(txn: Txn, room_id: str) -> dict[str, int]:
    """:func:`last_event_by_sender_many` for one room."""
    return last_event_by_sender_many(txn, [room_id]).get(room_id, {})


def last_event_by_sender_many(txn: Txn, room_ids: Sequence[str]) -> dict[str, dict[str, int]]:
    """Each member's newest event outside threads, for each room, in one statement.
    Everyone who ever sent an event into a room has a member event (the auth rules let
    only members send), so one lookup per member on ``events_room_sender`` — walked from
    the newest, stopping at the first event not in a thread — finds them all without
    reading the rooms' history."""
    if not room_ids:
        return {}
    where, params = txn.any_of("m.room_id", room_ids)
    rows = txn.fetchall(
        "SELECT m.room_id, m.state_key, (SELECT e.stream_ordering FROM events e"
        " WHERE e.room_id = m.room_id AND e.sender = m.state_key"
        " AND (e.rel_type IS NULL OR e.rel_type <> 'm.thread')"
        " ORDER BY e.stream_ordering DESC LIMIT 1)"
        f" FROM current_state m WHERE {where} AND m.type = 'm.room.member'",
        params,
    )
    out: dict[str, dict[str, int]] = {}
    for room_id, user_id, position in rows:
        if position is not None:
            out.setdefault(room_id, {})[user_id] = position
    return out


def last_thread_posts(txn: Txn, user_id: str, wanted: Sequence[tuple[str, str]]) -> dict[tuple[str, str], int]:
    """For each (room, thread root): the user's newest post in that thread, if any
    (found through ``events_relates_to``: the thread's events, not the user's)."""
    # SQLite, without statistics, would rather walk the user's events in the room.
    source = "events INDEXED BY events_relates_to" if txn.dialect == "sqlite" else "events"
    out: dict[tuple[str, str], int] = {}
    for room_id, root in wanted:
        position = txn.fetchval(
            f"SELECT MAX(stream_ordering) FROM {source} WHERE relates_to = ? AND rel_type = 'm.thread'"
            " AND room_id = ? AND sender = ?",
            (root, room_id, user_id),
        )
        if position is not None:
            out[(room_id, root)] = int(position)
    return out


# -- state ------------------------------------------------------------------------------


def get_current_state_ids_many(txn: Txn, room_ids: Sequence[str]) -> dict[str, dict[StateKey, str]]:
    """The current state's event IDs of each room, in one statement (rooms without state left out)."""
    if not room_ids:
        return {}
    where, params = txn.any_of("room_id", room_ids)
    out: dict[str, dict[StateKey, str]] = {}
    for room_id, type_, state_key, event_id in txn.fetchall(
        f"SELECT room_id, type, state_key, event_id FROM current_state WHERE {where}", params
    ):
        out.setdefault(room_id, {})[(type_, state_key)] = event_id
    return out


def get_state_ids_at(txn: Txn, room_id: str, position: int, types: Iterable[StateKey] | None = None) -> dict[StateKey, str]:
    """State of the room after every event at or before ``position``."""
    params: list[Any] = [room_id, position]
    extra = ""
    if types is not None:
        wanted = list(types)
        if not wanted:
            return {}
        conds = []
        for etype, skey in wanted:
            conds.append("(type = ? AND state_key = ?)")
            params.extend((etype, skey))
        extra = " AND (" + " OR ".join(conds) + ")"
    rows = txn.fetchall(
        "SELECT type, state_key, event_id FROM ("
        " SELECT type, state_key, event_id, ROW_NUMBER() OVER "
        "   (PARTITION BY type, state_key ORDER BY stream_ordering DESC) AS rn"
        " FROM events WHERE room_id = ? AND state_key IS NOT NULL AND stream_ordering <= ?" + extra +
        ") t WHERE rn = 1",
        params,
    )
    return {(r[0], r[1]): r[2] for r in rows}


def get_state_keys_changed(txn: Txn, room_id: str, after: int, upto: int) -> set[StateKey]:
    rows = txn.fetchall(
        "SELECT DISTINCT type, state_key FROM events WHERE room_id = ? AND state_key IS NOT NULL "
        "AND stream_ordering > ? AND stream_ordering <= ?",
        (room_id, after, upto),
    )
    return {(r[0], r[1]) for r in rows}


def membership_changes(txn: Txn, room_id: str, after: int, upto: int) -> list[tuple[str, str]]:
    rows = txn.fetchall(
        "SELECT state_key, membership FROM events WHERE room_id = ? AND type = 'm.room.member' "
        "AND stream_ordering > ? AND stream_ordering <= ? ORDER BY stream_ordering",
        (room_id, after, upto),
    )
    return [(r[0], r[1] or "leave") for r in rows]


def get_membership_history(txn: Txn, room_id: str, user_id: str) -> list[tuple[int, str]]:
    """(stream ordering, membership) of each of the user's member events in the room, oldest first."""
    return get_membership_histories(txn, [room_id], user_id)[room_id]


def get_membership_histories(txn: Txn, room_ids: Sequence[str], user_id: str) -> dict[str, list[tuple[int, str]]]:
    """:func:`get_membership_history` for several rooms in one statement."""
    out: dict[str, list[tuple[int, str]]] = {room_id: [] for room_id in room_ids}
    if not room_ids:
        return out
    where, params = txn.any_of("room_id", room_ids)
    rows = txn.fetchall(
        f"SELECT room_id, stream_ordering, membership FROM events WHERE {where} AND type = 'm.room.member' "
        "AND state_key = ? ORDER BY stream_ordering",
        [*params, user_id],
    )
    for room_id, position, membership in rows:
        out[room_id].append((position, membership or "leave"))
    return out


def get_visibility_histories(txn: Txn, room_ids: Sequence[str]) -> dict[str, list[tuple[int, Any]]]:
    """(stream ordering, raw ``history_visibility`` content value) of every change, for
    each room, in one statement."""
    out: dict[str, list[tuple[int, Any]]] = {room_id: [] for room_id in room_ids}
    if not room_ids:
        return out
    where, params = txn.any_of("room_id", room_ids)
    rows = txn.fetchall(
        f"SELECT room_id, stream_ordering, json, event_id FROM events WHERE {where} "
        "AND type = 'm.room.history_visibility' AND state_key = '' ORDER BY stream_ordering",
        params,
    )
    for room_id, position, blob, event_id in rows:
        pdu = orjson.loads(unseal(txn, f"event|{event_id}|json", blob))
        out[room_id].append((position, pdu.get("content", {}).get("history_visibility")))
    return out


class DuplicateTransaction(Exception):
    """The (user, device, endpoint, txnId) was used before, for ``event_id``."""

    def __init__(self, event_id: str) -> None:
        super().__init__(event_id)
        self.event_id = event_id


# -- transaction IDs ----------------------------------------------------------------------


def get_txn_event_id(txn: Txn, user_id: str, device_id: str, scope: str, txn_id: str) -> str | None:
    return txn.fetchval(
        "SELECT event_id FROM event_txns WHERE user_id = ? AND device_id = ? AND scope = ? AND txn_id = ?",
        (user_id, device_id, scope, txn_id),
    )


# -- writing ------------------------------------------------------------------------------


def _relation(event: Event) -> tuple[str | None, str | None]:
    # Content is the sender's: a target that is not an event ID (not a string, over 255
    # bytes, NUL in it) relates to nothing, as does a relation type that is not a
    # reasonable string.
    rel = event.content.get("m.relates_to")
    if isinstance(rel, dict):
        target = rel.get("event_id")
        rel_type = rel.get("rel_type")
        if is_valid_event_id(target):
            ok_type = isinstance(rel_type, str) and "\x00" not in rel_type and len(rel_type) <= 255
            return target, rel_type if ok_type else None
        reply = rel.get("m.in_reply_to")
        if isinstance(reply, dict) and is_valid_event_id(reply.get("event_id")):
            return reply["event_id"], "m.in_reply_to"
    return None, None


def insert_event(txn: Txn, event: Event, txn_key: tuple[str, str, str, str] | None, now_ms: int) -> None:
    """Insert a new event (and its transaction ID, state and membership rows)."""
    relates_to, rel_type = _relation(event)
    txn.execute(
        "INSERT INTO events (stream_ordering, event_id, room_id, type, state_key, sender, depth, "
        "origin_server_ts, membership, relates_to, rel_type, txn_id, txn_device_id, replaces_state, "
        "unsigned_static, json) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        (
            event.stream_ordering,
            event.event_id,
            event.room_id,
            event.type,
            event.state_key,
            event.sender,
            event.depth,
            event.origin_server_ts,
            event.membership,
            relates_to,
            rel_type,
            event.txn_id,
            event.txn_device_id,
            event.replaces_state,
            seal(txn, "room", event.room_id, f"event|{event.event_id}|unsigned", orjson.dumps(event.unsigned_static))
            if event.unsigned_static
            else None,
            seal(txn, "room", event.room_id, f"event|{event.event_id}|json", orjson.dumps(event.pdu)),
        ),
    )
    if txn_key is not None:
        user_id, device_id, scope, txn_id = txn_key
        inserted = txn.execute(
            "INSERT INTO event_txns (user_id, device_id, scope, txn_id, event_id, created_ts) VALUES (?, ?, ?, ?, ?, ?) "
            "ON CONFLICT (user_id, device_id, scope, txn_id) DO NOTHING",
            (user_id, device_id, scope, txn_id, event.event_id, now_ms),
        )
        if inserted != 1:
            existing = get_txn_event_id(txn, user_id, device_id, scope, txn_id)
            raise DuplicateTransaction(existing or "")
    search_store.index_event(txn, event)
    if event.state_key is not None:
        txn.execute(
            "INSERT INTO current_state (room_id, type, state_key, event_id) VALUES (?, ?, ?, ?) "
            "ON CONFLICT (room_id, type, state_key) DO UPDATE SET event_id = excluded.event_id",
            (event.room_id, event.type, event.state_key, event.event_id),
        )
        directory_store.record_room_state(txn, event)
        if event.type == "m.room.member":
            txn.execute(
                "INSERT INTO memberships (user_id, room_id, membership, event_id, stream_ordering, forgotten) "
                "VALUES (?, ?, ?, ?, ?, FALSE) ON CONFLICT (user_id, room_id) DO UPDATE SET "
                "membership = excluded.membership, event_id = excluded.event_id, "
                "stream_ordering = excluded.stream_ordering, forgotten = FALSE",
                (event.state_key, event.room_id, event.membership or "leave", event.event_id, event.stream_ordering),
            )


def apply_redaction(txn: Txn, target: Event, redaction_event_id: str) -> dict[str, Any]:
    """Replace the stored target with its redacted form. Returns the pruned PDU.

    Events whose ``unsigned.prev_content`` copied the target's content are pruned too,
    so redacted content does not survive anywhere in the database.
    """
    pruned = redact_pdu(target.pdu, target.room_version)
    search_store.unindex_event(txn, target.event_id)
    txn.execute(
        # A redacted child no longer relates to its parent (spec: the relationship is broken).
        "UPDATE events SET json = ?, redacted_by = ?, relates_to = NULL, rel_type = NULL WHERE event_id = ?",
        (
            seal(txn, "room", target.room_id, f"event|{target.event_id}|json", orjson.dumps(pruned)),
            redaction_event_id,
            target.event_id,
        ),
    )
    rows = txn.fetchall(
        "SELECT event_id, unsigned_static FROM events WHERE replaces_state = ?", (target.event_id,)
    )
    for event_id, unsigned_raw in rows:
        binding = f"event|{event_id}|unsigned"
        unsigned = orjson.loads(unseal(txn, binding, unsigned_raw)) if unsigned_raw is not None else {}
        unsigned["prev_content"] = pruned["content"]
        txn.execute(
            "UPDATE events SET unsigned_static = ? WHERE event_id = ?",
            (seal(txn, "room", target.room_id, binding, orjson.dumps(unsigned)), event_id),
        )
    return pruned


def events_replacing(txn: Txn, event_id: str) -> list[str]:
    return [r[0] for r in txn.fetchall("SELECT event_id FROM events WHERE replaces_state = ?", (event_id,))]
