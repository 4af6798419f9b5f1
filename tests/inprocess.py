"""A second worker's caches, built in the test process on a running server's database.

The server plays "the other worker": it commits; the test applies what it committed
through the same entry points replication uses, and inspects this worker's views.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from bastion.app import open_migrated_database
from bastion.services.caches import EventCache, MembershipIndex, RoomCache
from bastion.services.persister import EventPersister
from bastion.settings import load_settings
from bastion.storage import events as events_store
from bastion.storage import streams as streams_store
from bastion.streams.notifier import Notifier
from bastion.streams.tokens import StreamToken
from tests.harness import ServerProcess


class InProcessWorker:
    def __init__(self, srv: ServerProcess) -> None:
        self.db = open_migrated_database(load_settings(srv.config_path))
        self.events = EventCache(self.db)
        self.rooms = RoomCache(self.db, self.events)
        self.memberships = MembershipIndex(self.db)
        self.notifier = Notifier(StreamToken())
        self.persister = EventPersister(
            self.db, self.events, self.rooms, self.memberships, self.notifier, None  # type: ignore[arg-type]
        )

    async def position(self) -> int:
        return (await self.db.read(streams_store.positions))["events"]

    async def committed(self, after: int) -> tuple[Any, int]:
        """What the server committed after ``after``, read as replication reads it."""
        upto = await self.position()
        return await self.db.read(events_store.events_in_range, after, upto), upto

    async def apply_committed(self, after: int) -> int:
        loaded, upto = await self.committed(after)
        await self.persister.apply_remote(loaded, upto)
        return upto

    async def close(self) -> None:
        await self.db.close()


@asynccontextmanager
async def in_process_worker(srv: ServerProcess) -> AsyncIterator[InProcessWorker]:
    w = InProcessWorker(srv)
    try:
        yield w
    finally:
        await w.close()
