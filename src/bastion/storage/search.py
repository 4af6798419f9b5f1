"""Full-text search over message bodies, room names and topics.

Two indexes, one query interface:

* with encryption at rest (the default) a **blind index**: each word is normalised
  (Unicode NFKC, case-folded) and stored only as HMAC-SHA256 under the room's search
  key, truncated to 128 bits. A query hashes its words the same way, per room. The
  database never holds a searchable word in clear. What it does reveal is documented
  in docs/security/encryption-at-rest.md (equal words within one room share a hash;
  word counts per message are visible);
* without encryption, the engine's own full-text index (SQLite FTS5 / PostgreSQL
  text search).

Encrypted (end-to-end) events have no plaintext and are never indexed. User words
are always passed as values, never as query syntax.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import unicodedata
from collections import Counter
from collections.abc import Sequence
from typing import Any

from bastion.core.events import Event
from bastion.storage.database import Txn

SEARCHABLE = {"m.room.message": ("content.body", "body"), "m.room.name": ("content.name", "name"), "m.room.topic": ("content.topic", "topic")}
_WORD = re.compile(r"\w+", re.UNICODE)
MAX_QUERY_WORDS = 32


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
    normalised = unicodedata.normalize("NFKC", term).casefold()
    return _WORD.findall(normalised)[:MAX_QUERY_WORDS] if term else []


def _blind(key: bytes, word: str) -> bytes:
    return hmac.new(key, word.encode(), hashlib.sha256).digest()[:16]


def _blind_enabled(txn: Txn) -> bool:
    return txn.crypto is not None and txn.crypto.enabled


def index_event(txn: Txn, event: Event) -> None:
    field = searchable_field(event)
    if field is None:
        return
    key_name, value = field
    if _blind_enabled(txn):
        key = txn.crypto.search_key(txn, event.room_id)
        counts = Counter(_blind(key, w) for w in words(value)[:2000])
        txn.executemany(
            "INSERT INTO event_search_tokens (room_id, token, event_id, stream_ordering, key, hits) "
            "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (room_id, token, event_id) DO NOTHING",
            [(event.room_id, token, event.event_id, event.stream_ordering, key_name, n) for token, n in counts.items()],
        )
    elif txn.dialect == "sqlite":
        txn.execute(
            "INSERT INTO event_search (value, event_id, room_id, key, stream_ordering) VALUES (?, ?, ?, ?, ?)",
            (value, event.event_id, event.room_id, key_name, event.stream_ordering),
        )
    else:
        txn.execute(
            "INSERT INTO event_search (event_id, room_id, key, stream_ordering, vector) "
            "VALUES (?, ?, ?, ?, to_tsvector('simple', ?)) ON CONFLICT (event_id) DO NOTHING",
            # PostgreSQL text cannot hold NUL, which JSON (and so a message) can: it
            # separates words like any other control character.
            (event.event_id, event.room_id, key_name, event.stream_ordering, value.replace("\x00", " ")),
        )


def unindex_event(txn: Txn, event_id: str) -> None:
    txn.execute("DELETE FROM event_search WHERE event_id = ?", (event_id,))
    txn.execute("DELETE FROM event_search_tokens WHERE event_id = ?", (event_id,))


Ranges = dict[str, list[tuple[int, int | None]]]


def _in_ranges(txn: Txn, ranges: Ranges) -> tuple[str, list[Any]]:
    """A condition "in one of these rooms, between these stream positions" (exclusive;
    ``None``: no upper bound) and its parameters. Rooms visible from their start are
    one ``IN`` list."""
    whole: list[str] = []
    clauses: list[str] = []
    params: list[Any] = []
    for room_id, spans in ranges.items():
        if spans == [(-1, None)]:
            whole.append(room_id)
            continue
        alternatives = []
        params.append(room_id)
        for after, before in spans:
            if before is None:
                alternatives.append("stream_ordering > ?")
                params.append(after)
            else:
                alternatives.append("(stream_ordering > ? AND stream_ordering < ?)")
                params += [after, before]
        clauses.append(f"(room_id = ? AND ({' OR '.join(alternatives)}))")
    if whole:
        clauses.append(f"room_id IN ({txn.in_list(whole)})")
        params += whole
    return "(" + " OR ".join(clauses) + ")", params


def search(
    txn: Txn,
    term_words: Sequence[str],
    ranges: Ranges,
    keys: Sequence[str],
    *,
    order_by_rank: bool,
    before: int | None,
    offset: int,
    limit: int,
) -> tuple[list[tuple[str, int, float]], int]:
    """([(event_id, stream_ordering, rank)], total count) for events matching every word
    within ``ranges``: for each room, the stream ranges the user may see
    (:func:`bastion.core.visibility.visible_ranges`), so that neither the results nor
    the count tell of events the user cannot see."""
    ranges = {room_id: spans for room_id, spans in ranges.items() if spans}
    if not term_words or not ranges or not keys:
        return [], 0
    if _blind_enabled(txn):
        return _search_blind(txn, term_words, ranges, keys, order_by_rank, before, offset, limit)
    params: list[Any]
    visible, visible_params = _in_ranges(txn, ranges)
    if txn.dialect == "sqlite":
        match = " ".join('"' + w.replace('"', '""') + '"' for w in term_words)
        where = f"event_search MATCH ? AND {visible} AND key IN ({txn.in_list(keys)})"
        params = [match, *visible_params, *keys]
        rank_expr = "-rank"
    else:
        where = f"vector @@ plainto_tsquery('simple', ?) AND {visible} AND key IN ({txn.in_list(keys)})"
        params = [" ".join(term_words), *visible_params, *keys]
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


def _search_blind(
    txn: Txn, term_words: Sequence[str], ranges: Ranges, keys: Sequence[str],
    order_by_rank: bool, before: int | None, offset: int, limit: int,
) -> tuple[list[tuple[str, int, float]], int]:
    unique = sorted(set(term_words))
    pairs: list[Any] = []
    for room_id in ranges:
        key = txn.crypto.search_key(txn, room_id, create=False)
        if key is not None:
            for word in unique:
                pairs += [room_id, _blind(key, word)]
    if not pairs:
        return [], 0
    values = ", ".join(["(?, ?)"] * (len(pairs) // 2))
    visible, visible_params = _in_ranges(txn, {r: ranges[r] for r in dict.fromkeys(pairs[::2])})
    where = f"(room_id, token) IN (VALUES {values}) AND {visible} AND key IN ({txn.in_list(keys)})"
    params: list[Any] = [*pairs, *visible_params, *keys]
    if before is not None:
        where += " AND stream_ordering < ?"
        params.append(before)
    grouped = (
        f"SELECT event_id, stream_ordering, SUM(hits) AS rnk FROM event_search_tokens WHERE {where} "
        f"GROUP BY event_id, stream_ordering HAVING COUNT(DISTINCT token) = {len(unique)}"
    )
    total_params = [*pairs, *visible_params, *keys]
    total_where = f"(room_id, token) IN (VALUES {values}) AND {visible} AND key IN ({txn.in_list(keys)})"
    total = int(txn.fetchval(
        f"SELECT COUNT(*) FROM (SELECT event_id FROM event_search_tokens WHERE {total_where} "
        f"GROUP BY event_id HAVING COUNT(DISTINCT token) = {len(unique)}) t",
        total_params,
    ))
    order = "rnk DESC, stream_ordering DESC" if order_by_rank else "stream_ordering DESC"
    rows = txn.fetchall(f"SELECT event_id, stream_ordering, rnk FROM ({grouped}) g ORDER BY {order} LIMIT ? OFFSET ?", [*params, limit, offset])
    return [(r[0], int(r[1]), float(r[2])) for r in rows], total
