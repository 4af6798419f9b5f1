"""Read receipts (public and private, threaded and unthreaded)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from bastion.storage.database import Txn


@dataclass(frozen=True, slots=True)
class ReceiptRow:
    room_id: str
    user_id: str
    receipt_type: str
    thread_id: str
    event_id: str
    event_stream: int
    ts: int
    stream_id: int


_COLUMNS = "room_id, user_id, receipt_type, thread_id, event_id, event_stream, ts, stream_id"


def upsert_receipt(txn: Txn, row: ReceiptRow) -> bool:
    """Store the receipt unless an existing one points at a later event. True if stored."""
    updated = txn.execute(
        f"INSERT INTO receipts ({_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?) "
        "ON CONFLICT (room_id, user_id, receipt_type, thread_id) DO UPDATE SET "
        "event_id = excluded.event_id, event_stream = excluded.event_stream, ts = excluded.ts, "
        "stream_id = excluded.stream_id WHERE receipts.event_stream < excluded.event_stream",
        (row.room_id, row.user_id, row.receipt_type, row.thread_id, row.event_id, row.event_stream, row.ts, row.stream_id),
    )
    return updated == 1


def rooms_receipts(txn: Txn, room_ids: Sequence[str]) -> dict[str, list[ReceiptRow]]:
    """Every receipt in each room, oldest first, in one statement."""
    out: dict[str, list[ReceiptRow]] = {room_id: [] for room_id in room_ids}
    if not room_ids:
        return out
    where, params = txn.any_of("room_id", room_ids)
    for r in txn.fetchall(f"SELECT {_COLUMNS} FROM receipts WHERE {where} ORDER BY stream_id", params):
        out[r[0]].append(ReceiptRow(*r))
    return out


def receipts_in_range(txn: Txn, after: int, upto: int) -> list[ReceiptRow]:
    rows = txn.fetchall(
        f"SELECT {_COLUMNS} FROM receipts WHERE stream_id > ? AND stream_id <= ? ORDER BY stream_id", (after, upto)
    )
    return [ReceiptRow(*r) for r in rows]


def max_receipt_stream(txn: Txn) -> int:
    return int(txn.fetchval("SELECT COALESCE(MAX(stream_id), 0) FROM receipts"))
