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


def test_a_value_the_database_refuses_is_the_requests_fault_not_an_outage(test_database: TestDatabase, tmp_path: Path) -> None:
    """A statement refused for one of its values — an integer beyond 64 bits (both
    engines), a NUL in text or an index row over PostgreSQL's ~2.7 KB limit — raises
    StorageRejected (400 M_INVALID_PARAM), rolls the transaction back, and is not
    retried. psycopg files the index-size error under OperationalError: it used to be
    taken for a lost connection, retried three times and reported as 503 "the database
    is unavailable"."""
    import secrets

    from bastion.errors import StorageRejected

    url = test_database.new_url(tmp_path)
    migrate(url)
    values: list[object] = [2**63]
    if not url.startswith("sqlite:"):
        values += ["nul\x00text", secrets.token_urlsafe(3000)]
    calls = 0

    def insert(txn: Txn, value: object) -> None:
        nonlocal calls
        calls += 1
        txn.execute("INSERT INTO server_meta (key, value) VALUES ('refused-kept', 'x')")
        if isinstance(value, int):
            txn.fetchall("SELECT CAST(? AS BIGINT)", (value,))
        else:
            txn.execute("INSERT INTO server_meta (key, value) VALUES (?, 'x')", (value,))

    async def scenario() -> None:
        nonlocal calls
        db = open_database(url)
        try:
            for value in values:
                calls = 0
                with pytest.raises(StorageRejected) as err:
                    await db.write(insert, value)
                assert err.value.status == 400 and err.value.errcode == "M_INVALID_PARAM"
                assert calls == 1  # not retried
                kept = await db.read(lambda txn: txn.fetchall("SELECT key FROM server_meta WHERE key LIKE 'refused%'"))
                assert kept == []  # the whole transaction rolled back
        finally:
            await db.close()

    asyncio.run(scenario())
