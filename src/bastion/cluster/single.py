"""Refuse to run two servers on one database unless they are configured as workers.

Without Redis a server assumes it is the only writer (it keeps stream positions and
caches in memory without listening for anyone else), so a second server on the same
database would serve stale data. Start-up therefore takes a lock:

* SQLite: an exclusive ``flock`` on ``<database>.lock`` — SQLite serves one process;
* PostgreSQL without Redis: an exclusive session-level advisory lock;
* PostgreSQL with Redis (workers): a *shared* advisory lock, so any number of workers
  run together but never alongside a server that believes it is alone.

The locks end with the process (kill -9 included): nothing to clean up.
"""

from __future__ import annotations

import contextlib
import os
from typing import Any

from bastion.errors import ConfigError

ADVISORY_KEY = 0x6261_7374  # "bast"


def claim_single_process(settings: Any, db: Any) -> Any:
    url = settings.database.resolved_url()
    clustered = settings.redis.resolved_url() is not None
    if url.startswith("sqlite:"):
        if clustered:
            raise ConfigError("config key 'redis.url': several workers need PostgreSQL; SQLite serves one process")
        import fcntl

        path = str(db.path) + ".lock"
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise ConfigError(
                f"another Bastion process is already serving {db.path}; SQLite supports one server process "
                "(use PostgreSQL and Redis to run several workers)"
            ) from None
        return ("flock", fd)
    import psycopg

    conn = psycopg.connect(url, autocommit=True)
    function = "pg_try_advisory_lock_shared" if clustered else "pg_try_advisory_lock"
    row = conn.execute(f"SELECT {function}(%s)", (ADVISORY_KEY,)).fetchone()
    if not row or not row[0]:
        conn.close()
        if clustered:
            raise ConfigError(
                "a Bastion server without Redis is running on this database; stop it, or give every server "
                "the same redis.url to run them as workers"
            )
        raise ConfigError(
            "another Bastion server is already running on this database; to run several, configure redis.url "
            "on every one (docs/deployment.md)"
        )
    return ("pg", conn)


def release_single_process(lock: Any) -> None:
    if lock is None:
        return
    kind, handle = lock
    with contextlib.suppress(Exception):
        if kind == "flock":
            os.close(handle)
        else:
            handle.close()
