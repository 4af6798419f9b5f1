"""Per-room lookups whose cost could grow with a room's history, timed on SQLite.

Builds one room of ``--events`` events from ``--members`` senders, ``--thread-share``
of them replies in one thread, then times (best of N):

* the room-load lookup of each member's newest event outside threads (one index
  lookup per member on ``events_room_sender``, ``storage/events.py:
  last_event_by_sender``), beside the plain "newest event, any kind" form it
  replaced, for comparison;
* ``last_thread_posts``: a member's newest post in that thread (``events_relates_to``;
  run only when an unread count needs a thread whose post is not in memory).

    .venv/bin/python bench/room_load_lookups.py [--events 100000] [--members 50]
"""

from __future__ import annotations

import argparse
import random
import sqlite3
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bastion.storage import events as events_store
from bastion.storage.database import Txn
from bastion.storage.migrate import migrate

ROOM = "!r:hs"
ANY_EVENT = (
    "SELECT m.state_key, (SELECT MAX(e.stream_ordering) FROM events e"
    " WHERE e.room_id = m.room_id AND e.sender = m.state_key)"
    " FROM current_state m WHERE m.room_id = ? AND m.type = 'm.room.member'"
)


def best_ms(fn: Callable[[], Any], rounds: int) -> float:
    best = float("inf")
    for _ in range(rounds):
        started = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - started)
    return best * 1000


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--events", type=int, default=100_000)
    p.add_argument("--members", type=int, default=50)
    p.add_argument("--thread-share", type=float, default=0.3)
    p.add_argument("--rounds", type=int, default=20)
    args = p.parse_args()
    rng = random.Random(1)
    with tempfile.TemporaryDirectory(prefix="room-load-lookups-") as tmp:
        path = Path(tmp) / "db.sqlite"
        migrate(f"sqlite:///{path}")
        conn = sqlite3.connect(path)
        members = [f"@u{i}:hs" for i in range(args.members)]
        rows = []
        for n in range(1, args.events + 1):
            thread = rng.random() < args.thread_share
            rows.append((
                n, f"$e{n}", ROOM, "m.room.message", rng.choice(members), n, n,
                "$root" if thread else None, "m.thread" if thread else None, b"{}",
            ))
        conn.executemany(
            "INSERT INTO events (stream_ordering, event_id, room_id, type, sender, depth, origin_server_ts,"
            " relates_to, rel_type, json) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            rows,
        )
        conn.executemany(
            "INSERT INTO current_state (room_id, type, state_key, event_id) VALUES (?, 'm.room.member', ?, ?)",
            [(ROOM, m, f"$member{i}") for i, m in enumerate(members)],
        )
        conn.commit()
        cur = conn.cursor()
        txn = Txn(cur, "sqlite", None)
        replies = sum(1 for r in rows if r[7] is not None)
        print(f"SQLite {sqlite3.sqlite_version}; one room: {args.events:,} events, {args.members} members, "
              f"{replies:,} replies in one thread")
        any_ms = best_ms(lambda: cur.execute(ANY_EVENT, (ROOM,)).fetchall(), args.rounds)
        print(f"newest event per member, any kind:       {any_ms:.3f} ms")
        main_ms = best_ms(lambda: events_store.last_event_by_sender(txn, ROOM), args.rounds)
        print(f"newest event per member, outside threads: {main_ms:.3f} ms")
        thread_ms = best_ms(lambda: events_store.last_thread_posts(txn, members[1], [(ROOM, "$root")]), 5)
        print(f"one member's newest post in the thread:   {thread_ms:.3f} ms")
        conn.close()


if __name__ == "__main__":
    main()
