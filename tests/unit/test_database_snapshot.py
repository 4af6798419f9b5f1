"""``Database.read`` sees one snapshot from its first statement to its last, on both
engines: a commit made meanwhile by another connection (another worker) is not seen
half-way. Room loads rely on it — their several statements must describe one moment."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path

import pytest

from bastion.storage.database import Txn, open_database, sqlite_path_from_url
from bastion.storage.migrate import migrate
from tests.harness import TestDatabase


def _commit_elsewhere(url: str, key: str) -> None:
    if url.startswith("sqlite:"):
        conn = sqlite3.connect(sqlite_path_from_url(url))
        with conn:
            conn.execute("INSERT INTO server_meta (key, value) VALUES (?, 'x')", (key,))
        conn.close()
    else:
        import psycopg

        with psycopg.connect(url, autocommit=True) as pg:
            pg.execute("INSERT INTO server_meta (key, value) VALUES (%s, 'x')", (key,))


def test_a_read_sees_one_snapshot_and_cannot_write(test_database: TestDatabase, tmp_path: Path) -> None:
    url = test_database.new_url(tmp_path)
    migrate(url)

    def count(txn: Txn) -> int:
        return int(txn.fetchval("SELECT COUNT(*) FROM server_meta WHERE key LIKE 'snapshot-test-%'"))

    def twice(txn: Txn, key: str) -> tuple[int, int]:
        before = count(txn)
        _commit_elsewhere(url, key)  # another worker commits between the two statements
        return before, count(txn)

    async def scenario() -> None:
        db = open_database(url)
        try:
            before, after = await db.read(twice, "snapshot-test-1")
            assert (before, after) == (0, 0)
            assert await db.read(count) == 1  # the next read sees it
            with pytest.raises(Exception, match=r"(?i)read-only|readonly"):
                await db.read(lambda txn: txn.execute("DELETE FROM server_meta WHERE key = 'snapshot-test-1'"))
            assert await db.read(count) == 1
        finally:
            await db.close()

    asyncio.run(scenario())
