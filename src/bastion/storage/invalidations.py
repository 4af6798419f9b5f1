"""Durable cache invalidations (migration 0011): written with the change, read by every worker."""

from __future__ import annotations

from bastion.storage import streams
from bastion.storage.database import Txn

STREAM = "invalidations"
TOKENS = "tokens"  # a user's access tokens or account flags changed: drop their cached tokens
KEYS = "keys"  # a device's one-time / fallback keys changed: drop its cached counts (device_id set)

# Rows older than this many positions are pruned. Every worker reads the stream at least
# once a second; one that fell further behind drops its whole caches instead.
KEEP = 100_000


def record(txn: Txn, kind: str, user_id: str, device_id: str | None = None) -> None:
    position = streams.allocate(txn, STREAM)
    txn.execute(
        "INSERT INTO cache_invalidations (stream_id, kind, user_id, device_id) VALUES (?, ?, ?, ?)",
        (position, kind, user_id, device_id),
    )
    if position % 1000 == 0:
        txn.execute("DELETE FROM cache_invalidations WHERE stream_id <= ?", (position - KEEP,))


def load(txn: Txn, after: int, upto: int) -> list[tuple[str, str, str | None]] | None:
    """The invalidations in ``(after, upto]``, or None when some were pruned (drop everything)."""
    rows = txn.fetchall(
        "SELECT stream_id, kind, user_id, device_id FROM cache_invalidations "
        "WHERE stream_id > ? AND stream_id <= ? ORDER BY stream_id",
        (after, upto),
    )
    if len(rows) != upto - after:  # positions are never skipped: a gap means pruned rows
        return None
    return [(r[1], r[2], r[3]) for r in rows]
