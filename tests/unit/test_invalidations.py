"""The cache-invalidation stream: rows in order, and pruning detected as a gap."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from bastion.storage import invalidations, streams
from bastion.storage.database import open_database
from bastion.storage.migrate import migrate


def _record_many(txn, n: int) -> None:  # type: ignore[no-untyped-def]
    for i in range(n):
        invalidations.record(txn, invalidations.KEYS if i % 2 else invalidations.TOKENS, f"@u{i}:hs", None)


def test_rows_come_back_in_order_and_pruning_reads_as_a_gap(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    migrate(url)
    monkeypatch.setattr(invalidations, "KEEP", 5)

    async def scenario() -> None:
        db = open_database(url)
        try:
            await db.write(_record_many, 3)
            assert (await db.read(streams.positions))[invalidations.STREAM] == 3
            rows = await db.read(invalidations.load, 0, 3)
            assert rows == [("tokens", "@u0:hs", None), ("keys", "@u1:hs", None), ("tokens", "@u2:hs", None)]
            assert await db.read(invalidations.load, 1, 2) == [("keys", "@u1:hs", None)]
            # Position 1,000 prunes everything more than KEEP positions older.
            await db.write(_record_many, 997)
            assert (await db.read(streams.positions))[invalidations.STREAM] == 1000
            assert await db.read(invalidations.load, 0, 1000) is None  # a worker this far behind drops all
            tail = await db.read(invalidations.load, 995, 1000)
            assert tail is not None and [r[1] for r in tail] == [f"@u{i}:hs" for i in range(992, 997)]
        finally:
            await db.close()

    asyncio.run(scenario())
