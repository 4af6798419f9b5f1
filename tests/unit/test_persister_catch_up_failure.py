"""With several workers, a committed event batch is applied only after what other
workers committed below it. If reading that fails (the database went away right after
the commit), the batch's senders must get an error they can retry — not wait forever —
and the worker must go on persisting.

The database and the replicator are stand-ins here (the failure is a read that fails
between a commit and the catch-up, which a real PostgreSQL cannot be made to do on
cue); the persister, the caches and the notifier are the real ones.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from bastion.core.events import Event
from bastion.core.room_versions import KNOWN_ROOM_VERSIONS
from bastion.errors import StorageUnavailable
from bastion.services.caches import EventCache, MembershipIndex, RoomCache, RoomSnapshot
from bastion.services.persister import EventPersister, PersistUnit
from bastion.streams.notifier import Notifier
from bastion.streams.tokens import StreamToken

ROOM = "!room:example.org"
VERSION = KNOWN_ROOM_VERSIONS["11"]


class CommittingDatabase:
    """Commits every batch: hands out the next stream positions."""

    def __init__(self) -> None:
        self.next = 10

    async def write(self, fn: Any, units: list[PersistUnit], now_ms: int, clustered: bool) -> Any:
        count = sum(len(unit.events) for unit in units)
        first, self.next = self.next, self.next + count
        for offset, event in enumerate(e for unit in units for e in unit.events):
            event.stream_ordering = first + offset
        return first, first + count - 1, [None] * len(units)


class Replicator:
    """Several workers; the catch-up before applying a local batch fails while ``down``."""

    clustered = True

    def __init__(self) -> None:
        self.applied = {"events": 0}
        self.down = True
        self._lock = asyncio.Lock()

    def lock(self, stream: str) -> asyncio.Lock:
        return self._lock

    async def before_local_apply(self, stream: str, first: int) -> None:
        if self.down:
            raise ConnectionError("the database went away")
        self.applied[stream] = first - 1

    def after_local_apply(self, stream: str, last: int) -> None:
        self.applied[stream] = last


def message(n: int) -> Event:
    pdu = {
        "room_id": ROOM, "type": "m.room.message", "sender": "@a:example.org",
        "content": {"msgtype": "m.text", "body": f"m{n}"}, "origin_server_ts": 1, "depth": n,
        "prev_events": [], "auth_events": [],
    }
    return Event(pdu, f"$event{n}", VERSION)


def test_a_batch_whose_catch_up_fails_is_refused_retryably_and_the_next_one_lands() -> None:
    async def scenario() -> None:
        db: Any = CommittingDatabase()
        replicator = Replicator()
        events = EventCache(db)
        rooms = RoomCache(db, events)
        persister = EventPersister(db, events, rooms, MembershipIndex(db), Notifier(StreamToken()), replicator)  # type: ignore[arg-type]
        room = RoomSnapshot(ROOM, VERSION, {}, None, 0, 0, [], 0, [])
        rooms.add(room)

        with pytest.raises(StorageUnavailable):
            await asyncio.wait_for(persister.persist(PersistUnit(room, [message(1)])), 5)
        assert room.stale  # its holders reload it, with the committed event, from the database
        assert rooms.cached(ROOM) is None

        replicator.down = False
        fresh = RoomSnapshot(ROOM, VERSION, {}, None, 0, 0, [], 0, [])
        rooms.add(fresh)
        second = message(2)
        await asyncio.wait_for(persister.persist(PersistUnit(fresh, [second])), 5)
        assert fresh.latest_event_id == "$event2" and replicator.applied["events"] == second.stream_ordering

    asyncio.run(scenario())
