"""Database access: one code path for SQLite and PostgreSQL.

Storage functions are plain synchronous functions ``fn(txn, *args)`` that run inside
one transaction on a worker thread; the event loop awaits them with
:meth:`Database.read` or :meth:`Database.write`. This is the model Synapse uses
(``runInteraction``): the SQL is ordinary DB-API code that both drivers run, and a
whole unit of work costs a single hop to a thread, however many statements it has.

SQL is written with ``?`` placeholders and the subset of SQL both engines accept
(``INSERT ... ON CONFLICT``, ``RETURNING``, partial indexes). :class:`Txn` rewrites
placeholders for psycopg. Where the dialects really differ, ``txn.dialect`` says
which one is running.

SQLite: one writer connection on one thread (SQLite has a single writer anyway)
and a few reader connections (WAL mode lets them read while the writer writes).
Checkpoints (copying the WAL back into the database file, with an fsync) run on a
thread of their own, once a second, instead of inside whichever commit crossed
SQLite's automatic threshold: a slow fsync then delays nobody's message.
PostgreSQL: a psycopg connection pool, one thread per connection.

Drivers: the standard library's ``sqlite3`` and ``psycopg`` 3 (the maintained
PostgreSQL driver with a C speed-up, a real pool and server-side prepared
statements).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import sqlite3
import threading
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Literal, ParamSpec, TypeVar

from bastion.errors import StorageRejected, StorageUnavailable

log = logging.getLogger(__name__)

T = TypeVar("T")
P = ParamSpec("P")
Dialect = Literal["sqlite", "postgres"]


SECURE_DELETE_DEFAULT = "FAST"  # SQLite: zero deleted content where it costs no extra I/O


@functools.lru_cache(maxsize=2048)
def _to_psycopg(sql: str) -> str:
    return sql.replace("%", "%%").replace("?", "%s")


@functools.cache
def _refusals(dialect: Dialect) -> tuple[type[BaseException], ...]:
    """The driver errors that mean "the database cannot store this value" (the request's
    fault): sqlite3 cannot bind an integer beyond 64 bits; PostgreSQL also refuses NUL
    characters in text, numbers out of a column's range and index rows over ~2.7 KB."""
    if dialect == "sqlite":
        return (OverflowError,)
    import psycopg

    return (OverflowError, psycopg.DataError, psycopg.errors.ProgramLimitExceeded)


def _rejected(exc: BaseException) -> StorageRejected:
    text = str(exc)
    if "NUL" in text:
        what = "text with a NUL character"
    elif isinstance(exc, OverflowError) or "out of range" in text:
        what = "a number out of range"
    elif getattr(exc, "sqlstate", None) == "54000":
        what = "a value too long"
    else:
        what = "a value"
    log.warning("the database refused a value from a request (%s: %s)", exc.__class__.__name__, text)
    return StorageRejected(f"The request holds {what}, which cannot be stored")


class Txn:
    """A cursor inside one transaction. Placeholders are ``?`` on both backends.

    A statement the database refuses because of a value in it (see :func:`_refusals`)
    raises :class:`StorageRejected` (400 ``M_INVALID_PARAM``) instead of a driver error."""

    __slots__ = ("_cursor", "_refused", "after_commit", "crypto", "dialect", "scratch")

    def __init__(self, cursor: Any, dialect: Dialect, crypto: Any = None) -> None:
        self._cursor = cursor
        self.dialect: Dialect = dialect
        self._refused = _refusals(dialect)
        self.after_commit: list[Callable[[], None]] = []
        # The keyring (encryption at rest) for storage functions that store sensitive fields.
        self.crypto: Any = crypto
        # Per-transaction working data (e.g. data keys created but not yet committed).
        self.scratch: dict[str, Any] = {}

    def _sql(self, sql: str) -> str:
        return sql if self.dialect == "sqlite" else _to_psycopg(sql)

    def _exec(self, run: Callable[[str, Any], Any], sql: str, params: Any) -> None:
        """``run`` (the cursor's execute or executemany) with a refused value as StorageRejected."""
        try:
            run(self._sql(sql), params)
        except self._refused as exc:
            raise _rejected(exc) from exc

    def execute(self, sql: str, params: Sequence[Any] = ()) -> int:
        self._exec(self._cursor.execute, sql, params)
        return self._cursor.rowcount

    def executemany(self, sql: str, rows: Iterable[Sequence[Any]]) -> None:
        rows = list(rows)
        if rows:
            self._exec(self._cursor.executemany, sql, rows)

    def fetchone(self, sql: str, params: Sequence[Any] = ()) -> tuple[Any, ...] | None:
        self._exec(self._cursor.execute, sql, params)
        return self._cursor.fetchone()

    def fetchall(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        self._exec(self._cursor.execute, sql, params)
        return self._cursor.fetchall()

    def fetchval(self, sql: str, params: Sequence[Any] = ()) -> Any:
        row = self.fetchone(sql, params)
        return row[0] if row is not None else None

    def savepoint(self, name: str) -> None:
        self._cursor.execute(f"SAVEPOINT {name}")

    def release_savepoint(self, name: str) -> None:
        self._cursor.execute(f"RELEASE SAVEPOINT {name}")

    def rollback_to_savepoint(self, name: str) -> None:
        self._cursor.execute(f"ROLLBACK TO SAVEPOINT {name}")

    def in_list(self, values: Sequence[Any]) -> str:
        """Placeholders for an IN (...) list of ``len(values)`` items."""
        return ",".join("?" * len(values))

    def any_of(self, column: str, values: Sequence[Any]) -> tuple[str, list[Any]]:
        """A condition "``column`` is one of ``values``" and its parameters: ``IN (?, ...)``
        on SQLite; ``= ANY(?)`` with one array on PostgreSQL, so the statement's text does
        not depend on how many values there are and it is prepared once."""
        if self.dialect == "sqlite":
            return f"{column} IN ({self.in_list(values)})", list(values)
        return f"{column} = ANY(?)", [list(values)]


class Database:
    """Runs transactions on worker threads. Subclasses implement one engine each."""

    dialect: Dialect
    crypto: Any = None

    async def read(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run ``fn(txn, ...)`` in a read-only transaction that sees one snapshot of the
        database throughout (several statements agree with each other)."""
        raise NotImplementedError

    async def write(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        raise NotImplementedError

    def run_sync(self, fn: Callable[..., T], *args: Any) -> T:
        """Run a write transaction from synchronous code (the CLI)."""
        raise NotImplementedError

    def maintenance(self, sql: str) -> None:
        """Run a statement that may not run inside a transaction (VACUUM, checkpoints); blocking."""
        raise NotImplementedError

    async def fetch_one_statement(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        """The rows of one read-only statement (its own snapshot).

        For reads made before nearly every request with several workers (the stream
        positions): PostgreSQL runs it on the event loop on one autocommit connection —
        one round trip, no BEGIN/COMMIT, no worker thread.
        """
        return await self.read(lambda txn: [tuple(r) for r in txn.fetchall(sql, params)])

    async def close(self) -> None:
        raise NotImplementedError


# -- SQLite -----------------------------------------------------------------------------


CHECKPOINT_INTERVAL_S = 1.0


class SqliteDatabase(Database):
    dialect: Dialect = "sqlite"

    def __init__(
        self,
        path: Path,
        *,
        synchronous: str = "normal",
        readers: int = 2,
        checkpoint_interval_s: float = CHECKPOINT_INTERVAL_S,
    ) -> None:
        self.path = path
        self.synchronous = synchronous.upper()
        self._local = threading.local()
        self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sqlite-w")
        self._readers = ThreadPoolExecutor(max_workers=readers, thread_name_prefix="sqlite-r")
        self._connections: list[sqlite3.Connection] = []
        self._lock = threading.Lock()
        self._closing = threading.Event()
        self._checkpointer: threading.Thread | None = None
        if str(path) != ":memory:":
            path.parent.mkdir(parents=True, exist_ok=True)
            self._checkpointer = threading.Thread(
                target=self._checkpoint_loop, args=(checkpoint_interval_s,), name="sqlite-checkpoint", daemon=True
            )
            self._checkpointer.start()

    def _checkpoint_loop(self, interval_s: float) -> None:
        """Checkpoint the WAL in the background (PASSIVE: never waits for, nor blocks, the
        writer or the readers; what it cannot copy yet, the next round does)."""
        conn: sqlite3.Connection | None = None
        try:
            while not self._closing.wait(interval_s):
                try:
                    if conn is None:
                        conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
                    conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
                except sqlite3.Error as exc:
                    log.warning("background WAL checkpoint failed (will retry): %s", exc)
        finally:
            if conn is not None:
                conn.close()

    def _connection(self, write: bool = True) -> sqlite3.Connection:
        """This thread's connection; a reader thread's refuses writes (``query_only``)."""
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=30)
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute(f"PRAGMA synchronous={self.synchronous}")
            conn.execute("PRAGMA foreign_keys=ON")
            conn.execute("PRAGMA busy_timeout=30000")
            conn.execute("PRAGMA cache_size=-65536")
            conn.execute("PRAGMA temp_store=MEMORY")
            # Checkpoints run on their own thread (above), not inside commits; the WAL
            # file is cut back to 64 MiB when it is reset after a complete checkpoint.
            conn.execute("PRAGMA wal_autocheckpoint=0")
            conn.execute(f"PRAGMA journal_size_limit={64 * 1024 * 1024}")
            # Deleted content is zeroed in the pages a write touches anyway (no extra I/O);
            # a purge or an erasure zeroes everything it deletes (``secure_delete=ON``).
            conn.execute(f"PRAGMA secure_delete={SECURE_DELETE_DEFAULT}")
            if not write:
                conn.execute("PRAGMA query_only=ON")
            self._local.conn = conn
            with self._lock:
                self._connections.append(conn)
        return conn

    def _run(self, write: bool, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        conn = self._connection(write)  # each thread does one of the two
        cur = conn.cursor()
        cur.execute("BEGIN IMMEDIATE" if write else "BEGIN")
        txn = Txn(cur, "sqlite", self.crypto)
        try:
            result = fn(txn, *args, **kwargs)
        except BaseException:
            cur.execute("ROLLBACK")
            raise
        cur.execute("COMMIT")
        for callback in txn.after_commit:
            callback()
        return result

    async def read(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._readers, functools.partial(self._run, False, fn, *args, **kwargs))

    async def write(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._writer, functools.partial(self._run, True, fn, *args, **kwargs))

    def run_sync(self, fn: Callable[..., T], *args: Any) -> T:
        return self._writer.submit(self._run, True, fn, *args).result()

    def maintenance(self, sql: str) -> None:
        self._writer.submit(lambda: self._connection().execute(sql).fetchall()).result()

    async def close(self) -> None:
        self._writer.shutdown(wait=True)
        self._readers.shutdown(wait=True)
        self._closing.set()
        if self._checkpointer is not None:
            self._checkpointer.join()
        with self._lock:
            for conn in self._connections:
                try:
                    conn.close()
                except sqlite3.Error:  # pragma: no cover
                    pass
            self._connections.clear()


# -- PostgreSQL ---------------------------------------------------------------------------


def _connection_failure(exc: Any) -> bool:
    """Whether a psycopg ``OperationalError`` means the database is unreachable or
    overwhelmed (worth a retry on a new connection, else 503 "unavailable"): no SQLSTATE
    (the client lost the connection), class 08 (connection exception), 53 (insufficient
    resources: too many connections, out of memory, disk full) or 57 (operator
    intervention: shutting down, starting up, a statement cancelled). Others — a value
    too long for an index (54000) — are about the statement, not the database."""
    state = getattr(exc, "sqlstate", None)
    return state is None or state[:2] in ("08", "53", "57")


class PostgresDatabase(Database):
    dialect: Dialect = "postgres"

    def __init__(self, url: str, *, pool_size: int = 10, connect_timeout: float = 5.0) -> None:
        import psycopg
        from psycopg_pool import ConnectionPool

        self._psycopg = psycopg
        self.url = url
        self._pool = ConnectionPool(
            url,
            min_size=1,
            max_size=pool_size,
            kwargs={
                "autocommit": False,
                "prepare_threshold": 3,
                "connect_timeout": max(1, int(connect_timeout)),
            },
            open=False,
            name="bastion",
            # A request waits this long for a connection; with PostgreSQL down it then
            # gets 503 rather than hanging until the client gives up.
            timeout=connect_timeout,
            # Keep trying to reconnect in the background for as long as it takes.
            reconnect_timeout=24 * 3600,
        )
        self._executor = ThreadPoolExecutor(max_workers=pool_size, thread_name_prefix="pg")
        self._connect_timeout = connect_timeout
        self._quick: Any = None  # psycopg.AsyncConnection for fetch_one_statement
        self._quick_lock: asyncio.Lock | None = None

    def open(self, timeout: float = 30.0) -> None:
        self._pool.open(wait=True, timeout=timeout)

    def _run(self, write: bool, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        psycopg = self._psycopg
        attempts = 0
        while True:
            attempts += 1
            before_commit = True
            try:
                with self._pool.connection() as conn:
                    # A read sees one snapshot from its first statement to its last, as
                    # on SQLite (READ COMMITTED would give each statement its own, so a
                    # room loaded while another worker commits to it could mix states).
                    # Read-only REPEATABLE READ never fails with a serialisation error.
                    # Both are part of psycopg's BEGIN: no extra round trip.
                    conn.isolation_level = None if write else psycopg.IsolationLevel.REPEATABLE_READ
                    conn.read_only = None if write else True
                    txn: Txn | None = None
                    # Results in binary format: bytea (every encrypted event) then comes
                    # as raw bytes, not hex text for PostgreSQL to encode and psycopg to
                    # decode (a 100-room snapshot read: 15-21 ms -> 10-13 ms).
                    with conn.transaction(), conn.cursor(binary=True) as cur:
                        txn = Txn(cur, "postgres", self.crypto)
                        result = fn(txn, *args, **kwargs)
                        before_commit = False
                    for callback in txn.after_commit:
                        callback()
                    return result
            except (psycopg.errors.SerializationFailure, psycopg.errors.DeadlockDetected):
                if attempts >= 5:
                    raise
                log.info("retrying transaction %s after a serialisation failure", getattr(fn, "__name__", fn))
            except psycopg.OperationalError as exc:
                if not _connection_failure(exc):
                    raise  # e.g. over a limit of PostgreSQL's: not an outage
                # A connection that broke before the commit (PostgreSQL restarted since it
                # was opened): nothing was written, so try once more on a fresh connection.
                if before_commit and attempts < 3:
                    log.info("retrying transaction %s on a new connection: %s", getattr(fn, "__name__", fn), exc)
                    with contextlib.suppress(Exception):
                        self._pool.check()  # drop every idle connection that broke too
                    continue
                raise StorageUnavailable(f"the database is unavailable: {exc.__class__.__name__}") from exc
            except Exception as exc:
                if exc.__class__.__name__ == "PoolTimeout":
                    raise StorageUnavailable("the database is unavailable: no connection") from exc
                raise

    async def read(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, functools.partial(self._run, False, fn, *args, **kwargs))

    async def write(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, functools.partial(self._run, True, fn, *args, **kwargs))

    def run_sync(self, fn: Callable[..., T], *args: Any) -> T:
        return self._run(True, fn, *args)

    async def fetch_one_statement(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        if self._quick_lock is None:
            self._quick_lock = asyncio.Lock()
        async with self._quick_lock:  # one statement at a time on the one connection
            try:
                if self._quick is None or self._quick.closed:
                    self._quick = await self._psycopg.AsyncConnection.connect(
                        self.url, autocommit=True, connect_timeout=max(1, int(self._connect_timeout))
                    )
                cur = await self._quick.execute(_to_psycopg(sql), params, prepare=True)
                return [tuple(r) for r in await cur.fetchall()]
            except self._psycopg.OperationalError as exc:
                # PostgreSQL restarted or unreachable: drop the connection and take the
                # pool's path, which retries and reports StorageUnavailable clearly.
                log.info("quick-read connection lost (%s); using the pool", exc.__class__.__name__)
                quick, self._quick = self._quick, None
                if quick is not None:
                    with contextlib.suppress(Exception):
                        await quick.close()
        return await super().fetch_one_statement(sql, params)

    def pool_stats(self) -> dict[str, int]:
        stats = self._pool.get_stats()
        size = int(stats.get("pool_size", 0))
        return {"size": size, "in_use": size - int(stats.get("pool_available", 0))}

    def maintenance(self, sql: str) -> None:
        with self._pool.connection() as conn:
            conn.autocommit = True
            try:
                conn.execute(sql)
            finally:
                conn.autocommit = False

    async def close(self) -> None:
        if self._quick is not None:
            with contextlib.suppress(Exception):
                await self._quick.close()
            self._quick = None
        self._executor.shutdown(wait=True)
        self._pool.close()


def sqlite_path_from_url(url: str) -> Path:
    if not url.startswith("sqlite:///"):
        raise ValueError("SQLite URLs look like sqlite:///absolute/path.db or sqlite:///relative.db")
    return Path(url[len("sqlite:///"):])


def open_database(
    url: str,
    *,
    pool_size: int = 10,
    connect_timeout: float = 5.0,
    sqlite_synchronous: str = "normal",
    sqlite_readers: int = 2,
) -> Database:
    """Open (but do not migrate) the database named by ``url``."""
    if url.startswith("sqlite:"):
        return SqliteDatabase(sqlite_path_from_url(url), synchronous=sqlite_synchronous, readers=sqlite_readers)
    db = PostgresDatabase(url, pool_size=pool_size, connect_timeout=connect_timeout)
    try:
        db.open()
    except Exception as exc:
        raise StorageUnavailable(f"cannot connect to PostgreSQL: {exc}") from exc
    return db
