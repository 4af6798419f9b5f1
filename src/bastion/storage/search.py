"""Full-text index of searchable event fields (message body, room name, topic).

The index holds the text to search; encrypted events have no plaintext and are not
indexed. Queries are built from the user's words as literal tokens (never passed to
the engine's query syntax), all of which must match.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from bastion.core.events import Event
from bastion.storage.database import Txn

SEARCHABLE = {"m.room.message": ("content.body", "body"), "m.room.name": ("content.name", "name"), "m.room.topic": ("content.topic", "topic")}
_WORD = re.compile(r"\w+", re.UNICODE)


def searchable_field(event: Event) -> tuple[str, str] | None:
    """(key, text) to index for ``event``, if any."""
    spec = SEARCHABLE.get(event.type)
    if spec is None:
        return None
    value = event.content.get(spec[1])
    if not isinstance(value, str) or not value.strip():
        return None
    return spec[0], value


def words(term: str) -> list[str]:
    return [w.lower() for w in _WORD.findall(term)][:32]


def index_event(txn: Txn, event: Event) -> None:
    field = searchable_field(event)
    if field is None:
        return
    key, value = field
    if txn.dialect == "sqlite":
        txn.execute(
            "INSERT INTO event_search (value, event_id, room_id, key, stream_ordering) VALUES (?, ?, ?, ?, ?)",
            (value, event.event_id, event.room_id, key, event.stream_ordering),
        )
    else:
        txn.execute(
            "INSERT INTO event_search (event_id, room_id, key, stream_ordering, vector) "
            "VALUES (?, ?, ?, ?, to_tsvector('simple', ?)) ON CONFLICT (event_id) DO NOTHING",
            (event.event_id, event.room_id, key, event.stream_ordering, value),
        )


def unindex_event(txn: Txn, event_id: str) -> None:
    txn.execute("DELETE FROM event_search WHERE event_id = ?", (event_id,))


def search(
    txn: Txn,
    term_words: Sequence[str],
    room_ids: Sequence[str],
    keys: Sequence[str],
    *,
    order_by_rank: bool,
    before: int | None,
    offset: int,
    limit: int,
) -> tuple[list[tuple[str, int, float]], int]:
    """([(event_id, stream_ordering, rank)], total count) for events matching every word."""
    if not term_words or not room_ids or not keys:
        return [], 0
    params: list[Any]
    if txn.dialect == "sqlite":
        match = " ".join('"' + w.replace('"', '""') + '"' for w in term_words)
        where = f"event_search MATCH ? AND room_id IN ({txn.in_list(room_ids)}) AND key IN ({txn.in_list(keys)})"
        params = [match, *room_ids, *keys]
        rank_expr = "-rank"
    else:
        where = (
            f"vector @@ plainto_tsquery('simple', ?) AND room_id IN ({txn.in_list(room_ids)}) "
            f"AND key IN ({txn.in_list(keys)})"
        )
        params = [" ".join(term_words), *room_ids, *keys]
        rank_expr = "ts_rank_cd(vector, plainto_tsquery('simple', ?))"
    total = int(txn.fetchval(f"SELECT COUNT(*) FROM event_search WHERE {where}", params))
    if before is not None:
        where += " AND stream_ordering < ?"
        params = [*params, before]
    order = "rnk DESC, stream_ordering DESC" if order_by_rank else "stream_ordering DESC"
    select_params = ([" ".join(term_words)] if txn.dialect != "sqlite" else []) + params
    rows = txn.fetchall(
        f"SELECT event_id, stream_ordering, {rank_expr} AS rnk FROM event_search WHERE {where} "
        f"ORDER BY {order} LIMIT ? OFFSET ?",
        [*select_params, limit, offset],
    )
    return [(r[0], int(r[1]), float(r[2])) for r in rows], total
