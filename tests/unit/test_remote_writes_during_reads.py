"""A write another worker made, applied here while this worker is reading the same
user's (device's, room's) data, must not be hidden by what the read caches when it
returns. (Seen as account data that never came back through /sync on three workers:
the next sync trusted the "newest stream ID" cache and skipped the query.)

Each test holds the first database read after it has run, applies another worker's
row meanwhile, then checks that the next read sees the row. They run on the database
``BASTION_TEST_DATABASE`` names (SQLite by default, PostgreSQL in CI)."""

from __future__ import annotations

import asyncio
from pathlib import Path

from bastion.services.account_data import AccountDataService
from bastion.services.caches import EventCache, RoomCache
from bastion.services.e2ee import KeysService
from bastion.services.receipts import ReceiptsService
from bastion.storage import e2e as e2e_store
from bastion.storage import receipts as receipts_store
from bastion.storage import rooms as rooms_store
from bastion.storage.database import open_database
from bastion.storage.migrate import migrate
from bastion.storage.receipts import ReceiptRow
from bastion.streams.notifier import Notifier
from bastion.streams.tokens import StreamToken
from tests.harness import TestDatabase, hold_reads

ALICE = "@alice:hs"
BOB = "@bob:hs"


def _migrated(test_database: TestDatabase, tmp_path: Path) -> str:
    url = test_database.new_url(tmp_path)
    migrate(url)
    return url


def test_a_remote_account_data_change_during_a_read_is_not_lost(test_database: TestDatabase, tmp_path: Path) -> None:
    url = _migrated(test_database, tmp_path)

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


def test_a_remote_to_device_message_during_a_read_is_not_lost(test_database: TestDatabase, tmp_path: Path) -> None:
    url = _migrated(test_database, tmp_path)

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


def test_a_remote_receipt_during_a_load_of_the_rooms_receipts_is_not_lost(
    test_database: TestDatabase, tmp_path: Path
) -> None:
    url = _migrated(test_database, tmp_path)
    room = "!r:hs"

    def receipt(user: str, stream_id: int) -> ReceiptRow:
        return ReceiptRow(room, user, "m.read", "", f"$e{stream_id}", 10 + stream_id, 1000 + stream_id, stream_id)

    async def scenario() -> None:
        db = open_database(url)
        try:
            await db.write(receipts_store.upsert_receipt, receipt(ALICE, 1))
            events = EventCache(db)
            notifier = Notifier(StreamToken(receipts=1))
            receipts = ReceiptsService(db, RoomCache(db, events), events, notifier, None, None)  # type: ignore[arg-type]
            # The first load of the room's receipts on this worker has run but not returned...
            read_done, release = hold_reads(db)
            first = asyncio.create_task(receipts.receipts_event(room, BOB, None, 1))
            await read_done.wait()
            # ...when another worker's receipt in the room (position 2) is applied here.
            await db.write(receipts_store.upsert_receipt, receipt(BOB, 2))
            await receipts.apply_remote([receipt(BOB, 2)], 2)
            release.set()
            assert (await first) == {"type": "m.receipt", "content": {"$e1": {"m.read": {ALICE: {"ts": 1001}}}}}
            # The next sync, from position 1, must see position 2.
            later = await receipts.receipts_event(room, BOB, 1, 2)
            assert later == {"type": "m.receipt", "content": {"$e2": {"m.read": {BOB: {"ts": 1002}}}}}
            assert await receipts.read_position(room, BOB) == 12
        finally:
            await db.close()

    asyncio.run(scenario())


def test_a_remote_ignore_list_change_during_a_read_is_not_hidden(test_database: TestDatabase, tmp_path: Path) -> None:
    url = _migrated(test_database, tmp_path)

    async def scenario() -> None:
        db = open_database(url)
        try:
            service = AccountDataService(db, Notifier(StreamToken()), replicator=None)  # type: ignore[arg-type]
            # Alice's ignore list is being read for the first time on this worker...
            read_done, release = hold_reads(db)
            first = asyncio.create_task(service.ignored_users(ALICE))
            await read_done.wait()
            # ...when another worker stores her new list (she ignores Bob).
            content = b'{"ignored_users":{"%s":{}}}' % BOB.encode()
            await db.write(rooms_store.put_account_data, ALICE, "", "m.ignored_user_list", 1, content)
            await service.apply_remote([(ALICE, "", "m.ignored_user_list", 1)], 1)
            release.set()
            assert await first == frozenset()
            assert await service.ignored_users(ALICE) == frozenset({BOB})
        finally:
            await db.close()

    asyncio.run(scenario())


def test_a_load_reads_again_only_if_a_redaction_meanwhile_changed_what_it_read() -> None:
    events = EventCache(None)  # type: ignore[arg-type]
    seen = events.redactions
    assert not events.redacted_since(seen, ["$a", "$b"])
    events.note_redaction(["$x", "$state_that_copied_x"])
    assert not events.redacted_since(seen, ["$a", "$b"])  # unrelated: keep what was read
    assert events.redacted_since(seen, ["$a", "$state_that_copied_x"])
    assert not events.redacted_since(events.redactions, ["$x"])  # noted before the read began
    for n in range(1000):  # more redactions than the log keeps: assume the worst
        events.note_redaction([f"$other{n}"])
    assert events.redacted_since(seen, ["$a"])
