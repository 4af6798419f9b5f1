"""A write another worker made, applied here while this worker is reading the same
user's (or device's) data, must not be hidden by the "newest stream ID" cache the read
fills in when it returns. (Seen as account data that never came back through /sync on
three workers: the next sync trusted the cache and skipped the query.)"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from bastion.services.account_data import AccountDataService
from bastion.services.e2ee import KeysService
from bastion.storage import e2e as e2e_store
from bastion.storage import rooms as rooms_store
from bastion.storage.database import Database, open_database
from bastion.storage.migrate import migrate
from bastion.streams.notifier import Notifier
from bastion.streams.tokens import StreamToken

ALICE = "@alice:hs"


def hold_reads(db: Database) -> tuple[asyncio.Event, asyncio.Event]:
    """Make ``db.read`` run its query at once but return only when ``release`` is set.
    Returns (``read_done``: the query has run, ``release``). Once released, reads pass
    straight through."""
    read_done, release = asyncio.Event(), asyncio.Event()
    real_read = db.read

    async def held_read(fn: Any, *args: Any) -> Any:
        result = await real_read(fn, *args)
        read_done.set()
        await release.wait()
        return result

    db.read = held_read  # type: ignore[method-assign]
    return read_done, release


def test_a_remote_account_data_change_during_a_read_is_not_lost(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    migrate(url)

    async def scenario() -> None:
        db = open_database(url)
        try:
            await db.write(rooms_store.put_account_data, ALICE, "", "org.example.a", 1, b'{"n":1}')
            service = AccountDataService(db, Notifier(StreamToken(account_data=1)), replicator=None)  # type: ignore[arg-type]
            # The first read of alice's changes on this worker has run but not returned...
            read_done, release = hold_reads(db)
            first = asyncio.create_task(service.changes(ALICE, 0, 1))
            await read_done.wait()
            # ...when another worker's write for her (position 2) is applied here.
            await db.write(rooms_store.put_account_data, ALICE, "!r:hs", "org.example.b", 2, b'{"n":2}')
            await service.apply_remote([(ALICE, "!r:hs", "org.example.b", 2)], 2)
            release.set()
            assert [t for t, _ in (await first).global_] == ["org.example.a"]
            # The next sync, from position 1, must see position 2.
            later = await service.changes(ALICE, 1, 2)
            assert [(r, t) for r, t, _ in later.room] == [("!r:hs", "org.example.b")]
        finally:
            await db.close()

    asyncio.run(scenario())


def test_a_remote_to_device_message_during_a_read_is_not_lost(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    migrate(url)

    async def scenario() -> None:
        db = open_database(url)
        try:
            keys = KeysService(db, "hs", None, None, Notifier(StreamToken()), None)  # type: ignore[arg-type]
            # The first read of the device's queue has run (and found nothing) but not returned...
            read_done, release = hold_reads(db)
            first = asyncio.create_task(keys.to_device_for(ALICE, "DEV", None, 0))
            await read_done.wait()
            # ...when another worker's message for the device is applied here.
            await db.write(e2e_store.add_to_device, [(1, ALICE, "DEV", b'{"type":"m.test","content":{}}')])
            await keys.apply_remote_to_device([(1, ALICE, "DEV")], 1)
            release.set()
            assert (await first)[0] == []
            events, _ = await keys.to_device_for(ALICE, "DEV", None, 1)
            assert len(events) == 1
        finally:
            await db.close()

    asyncio.run(scenario())
