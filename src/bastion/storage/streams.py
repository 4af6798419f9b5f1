"""Stream positions: allocated in the writing transaction, readable by every worker."""

from __future__ import annotations

from bastion.storage.database import Txn

STREAMS = ("events", "account_data", "receipts", "to_device", "device_lists", "invalidations")


def allocate(txn: Txn, stream: str, count: int = 1) -> int:
    """Take ``count`` consecutive positions of ``stream``; returns the first.

    The row stays locked until ``txn`` ends, so concurrent writers (other workers)
    commit their positions in order.
    """
    last = txn.fetchval(
        "UPDATE stream_positions SET position = position + ? WHERE stream = ? RETURNING position", (count, stream)
    )
    if last is None:
        raise RuntimeError(f"unknown stream {stream!r}")
    return int(last) - count + 1


POSITIONS_SQL = "SELECT stream, position FROM stream_positions"


def positions(txn: Txn) -> dict[str, int]:
    """The last position allocated (and, once this transaction sees it, committed) per stream."""
    return {r[0]: int(r[1]) for r in txn.fetchall(POSITIONS_SQL)}
