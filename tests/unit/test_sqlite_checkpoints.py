"""SQLite checkpoints run on their own thread, not inside commits."""

from __future__ import annotations

import asyncio
import sqlite3
import time
from pathlib import Path

from bastion.storage.database import SqliteDatabase


def _create(txn) -> None:  # type: ignore[no-untyped-def]
    txn.execute("CREATE TABLE IF NOT EXISTS t (id INTEGER PRIMARY KEY, body BLOB)")


def _insert(txn, n: int) -> None:  # type: ignore[no-untyped-def]
    txn.executemany("INSERT INTO t (body) VALUES (?)", [(b"x" * 2000,) for _ in range(n)])


def test_commits_do_not_checkpoint_and_the_background_thread_does(tmp_path: Path) -> None:
    path = tmp_path / "db.sqlite"

    interval = 2.0

    async def scenario() -> tuple[float, int | None, int | None]:
        db = SqliteDatabase(path, checkpoint_interval_s=interval)
        try:
            started = time.monotonic()
            await db.write(_create)
            # Far past SQLite's automatic threshold (1,000 pages, ~4 MB): with automatic
            # checkpoints, the commit that crossed it would have copied the WAL back.
            for _ in range(10):
                await db.write(_insert, 300)
            elapsed = time.monotonic() - started
            right_after = _rows_in_main_file(path)
            deadline = time.monotonic() + 4 * interval
            later = right_after
            while later != 3000 and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
                later = _rows_in_main_file(path)
            return elapsed, right_after, later
        finally:
            await db.close()

    elapsed, right_after, later = asyncio.run(scenario())
    if elapsed < interval:  # no background round yet: what the file holds, a commit put there
        assert right_after == 0
    assert later == 3000  # the background checkpoint moved everything into the file


def _rows_in_main_file(path: Path) -> int | None:
    """Rows visible in the main database file alone (a copy without its WAL); None when
    the copy caught the background checkpoint half-way through writing the file."""
    copy = path.with_name("copy.sqlite")
    copy.write_bytes(path.read_bytes())
    try:
        conn = sqlite3.connect(copy)
        try:
            return int(conn.execute("SELECT COUNT(*) FROM t").fetchone()[0])
        except sqlite3.OperationalError:  # the table itself is still only in the WAL
            return 0
        except sqlite3.DatabaseError:  # "malformed": a torn copy, taken mid-checkpoint
            return None
        finally:
            conn.close()
    finally:
        copy.unlink()
