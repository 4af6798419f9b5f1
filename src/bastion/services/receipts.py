"""Read receipts and read markers (``/receipt``, ``/read_markers``).

Receipts are rows with their own stream position; each room's receipts are cached
in memory on first use. A receipt only moves forward: one pointing at an older event
than the stored one is accepted (200) and ignored, as receipts describe "read up to".
``m.read.private`` receipts are delivered to their owner only. ``m.fully_read`` is
room account data, not a receipt.

The user's read position in a room — the newest event covered by their unthreaded
or main-thread ``m.read``/``m.read.private`` receipt — feeds unread counts.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import replace
from typing import Any

from bastion.clock import now_ms
from bastion.cluster.replication import Replicator
from bastion.core.events import thread_root
from bastion.core.ids import is_valid_event_id
from bastion.errors import Forbidden, InvalidParam, NotFound
from bastion.services.account_data import AccountDataService
from bastion.services.caches import EventCache, RoomCache
from bastion.services.requester import Requester
from bastion.storage import receipts as receipts_store
from bastion.storage import streams as streams_store
from bastion.storage.database import Database, Txn
from bastion.storage.receipts import ReceiptRow
from bastion.streams.notifier import Notifier

RECEIPT_TYPES = ("m.read", "m.read.private")
UNTHREADED = ""


class ReceiptsService:
    def __init__(
        self,
        db: Database,
        rooms: RoomCache,
        events: EventCache,
        notifier: Notifier,
        account_data: AccountDataService,
        replicator: Replicator,
    ) -> None:
        self._db = db
        self._rooms = rooms
        self._events = events
        self._notifier = notifier
        self._account_data = account_data
        self._replicator = replicator
        # room -> {(user, type, thread): row}; rooms loaded on demand
        self._cache: OrderedDict[str, dict[tuple[str, str, str], ReceiptRow]] = OrderedDict()
        self._room_stream: dict[str, int] = {}
        # room being loaded -> other workers' receipts for it applied meanwhile (the load
        # may have read before they were committed); merged when the load installs
        self._arrived: dict[str, list[ReceiptRow]] = {}
        self._loads: dict[str, int] = {}  # room -> loads in flight
        # room -> user -> keys of their receipts in threads (for per-thread unread counts)
        self._thread_keys: dict[str, dict[str, set[tuple[str, str, str]]]] = {}

    async def _room(self, room_id: str) -> dict[tuple[str, str, str], ReceiptRow]:
        cached = self._cache.get(room_id)
        if cached is not None:
            self._cache.move_to_end(room_id)
            return cached
        return (await self._load([room_id]))[room_id]

    async def preload(self, room_ids: Iterable[str]) -> None:
        """Load the receipts of the rooms not in memory in one database transaction."""
        missing = [r for r in room_ids if r not in self._cache]
        if missing:
            await self._load(missing)

    async def _load(self, room_ids: list[str]) -> dict[str, dict[tuple[str, str, str], ReceiptRow]]:
        for room_id in room_ids:
            self._loads[room_id] = self._loads.get(room_id, 0) + 1
            self._arrived.setdefault(room_id, [])
        try:
            loaded = await self._db.read(receipts_store.rooms_receipts, room_ids)
            return {room_id: self._install(room_id, rows + self._arrived[room_id]) for room_id, rows in loaded.items()}
        finally:
            for room_id in room_ids:
                self._loads[room_id] -= 1
                if not self._loads[room_id]:
                    del self._loads[room_id]
                    del self._arrived[room_id]

    def _install(self, room_id: str, rows: list[ReceiptRow]) -> dict[tuple[str, str, str], ReceiptRow]:
        cached = self._cache.get(room_id)  # loaded meanwhile
        if cached is None:
            cached = {}
            for row in rows:  # database rows, then any applied while they were read
                key = (row.user_id, row.receipt_type, row.thread_id)
                current = cached.get(key)
                if current is None or current.event_stream < row.event_stream:
                    cached[key] = row
            self._cache[room_id] = cached
            self._thread_keys.pop(room_id, None)
            for key in cached:
                self._index_thread_receipt(room_id, key)
            self._room_stream[room_id] = max((r.stream_id for r in rows), default=0)
            if len(self._cache) > 20_000:
                old, _ = self._cache.popitem(last=False)
                self._room_stream.pop(old, None)
                self._thread_keys.pop(old, None)
        return cached

    def room_stream(self, room_id: str) -> int | None:
        """Newest receipt position in the room, or None if the room is not cached."""
        return self._room_stream.get(room_id)

    async def post(self, requester: Requester, room_id: str, receipt_type: str, event_id: str, body: dict[str, Any]) -> None:
        if receipt_type == "m.fully_read":
            await self.read_markers(requester, room_id, {"m.fully_read": event_id})
            return
        if receipt_type not in RECEIPT_TYPES:
            raise InvalidParam(f"Unknown receipt type {receipt_type!r}")
        thread_id = body.get("thread_id")
        if thread_id is not None and (not isinstance(thread_id, str) or not thread_id):
            raise InvalidParam("thread_id field must be a non-empty string")
        if thread_id is not None and thread_id != "main" and not is_valid_event_id(thread_id):
            raise InvalidParam("thread_id must be 'main' or an event ID")
        await self._store(requester, room_id, receipt_type, event_id, thread_id or UNTHREADED)

    async def read_markers(self, requester: Requester, room_id: str, body: dict[str, Any]) -> None:
        for key in ("m.fully_read", "m.read", "m.read.private"):
            value = body.get(key)
            if value is not None and (not isinstance(value, str) or not is_valid_event_id(value)):
                raise InvalidParam(f"'{key}' must be an event ID")
        fully_read = body.get("m.fully_read")
        if fully_read is not None:
            await self._target(requester, room_id, fully_read)
            await self._account_data.put(requester.user_id, room_id, "m.fully_read", {"event_id": fully_read})
        for receipt_type in RECEIPT_TYPES:
            if body.get(receipt_type) is not None:
                await self._store(requester, room_id, receipt_type, body[receipt_type], UNTHREADED)

    async def _target(self, requester: Requester, room_id: str, event_id: str, thread_id: str = UNTHREADED) -> int:
        room = await self._rooms.get(room_id)
        if room is None or room.membership_of(requester.user_id) != "join":
            raise Forbidden("You are not in this room")
        if not is_valid_event_id(event_id):
            raise InvalidParam("Invalid event ID")
        event = await self._events.get(event_id)
        if event is None or event.room_id != room_id:
            raise NotFound("Event not found in this room")
        if thread_id != UNTHREADED:
            # spec: a threaded receipt names an event of that thread (the root counts as
            # both the main timeline and its thread); anything else is a 400.
            root = thread_root(event)
            in_thread = root == thread_id or event.event_id == thread_id
            if (thread_id == "main" and root is not None) or (thread_id != "main" and not in_thread):
                raise InvalidParam(f"The event is not in the thread {thread_id!r}")
        return event.stream_ordering

    async def _store(self, requester: Requester, room_id: str, receipt_type: str, event_id: str, thread_id: str) -> None:
        event_stream = await self._target(requester, room_id, event_id, thread_id)
        receipts = await self._room(room_id)
        key = (requester.user_id, receipt_type, thread_id)
        current = receipts.get(key)
        if current is not None and current.event_stream >= event_stream:
            return
        def txn_fn(txn: Txn) -> tuple[ReceiptRow, bool]:
            stream_id = streams_store.allocate(txn, "receipts")
            row = ReceiptRow(room_id, requester.user_id, receipt_type, thread_id, event_id, event_stream, now_ms(), stream_id)
            return row, receipts_store.upsert_receipt(txn, row)

        row, stored = await self._db.write(txn_fn)
        async with self._replicator.lock("receipts"):
            await self._replicator.before_local_apply("receipts", row.stream_id)
            if stored:
                current = receipts.get(key)
                if current is None or current.event_stream < row.event_stream:
                    receipts[key] = row
                    self._index_thread_receipt(room_id, key)
                self._room_stream[room_id] = max(self._room_stream.get(room_id, 0), row.stream_id)
            self._replicator.after_local_apply("receipts", row.stream_id)
            self._notifier.advance(replace(self._notifier.current, receipts=self._replicator.applied["receipts"]))
        if not stored:
            return
        await self._wake(room_id, receipt_type, requester.user_id)

    async def _wake(self, room_id: str, receipt_type: str, user_id: str) -> None:
        room = await self._rooms.get(room_id)
        if receipt_type == "m.read.private" or room is None:
            self._notifier.notify_users([user_id])
        else:
            self._notifier.notify_users(room.joined)

    # -- other workers' receipts ------------------------------------------------------------------

    @staticmethod
    def load_changes(txn: Txn, after: int, upto: int) -> list[ReceiptRow]:
        return receipts_store.receipts_in_range(txn, after, upto)

    async def apply_remote(self, rows: list[ReceiptRow], upto: int) -> None:
        for row in rows:
            cached = self._cache.get(row.room_id)
            if cached is None and row.room_id in self._arrived:
                self._arrived[row.room_id].append(row)
            elif cached is not None:
                key = (row.user_id, row.receipt_type, row.thread_id)
                current = cached.get(key)
                if current is None or current.event_stream < row.event_stream:
                    cached[key] = row
                    self._index_thread_receipt(row.room_id, key)
                self._room_stream[row.room_id] = max(self._room_stream.get(row.room_id, 0), row.stream_id)
        self._notifier.advance(replace(self._notifier.current, receipts=upto))
        for row in rows:
            await self._wake(row.room_id, row.receipt_type, row.user_id)

    async def receipts_event(self, room_id: str, user_id: str, after: int | None, upto: int) -> dict[str, Any] | None:
        """The ``m.receipt`` ephemeral event for a sync, or None if nothing changed."""
        if after is not None:
            known = self._room_stream.get(room_id)
            if known is not None and known <= after:
                return None
        receipts = await self._room(room_id)
        content: dict[str, dict[str, dict[str, Any]]] = {}
        for row in receipts.values():
            if row.stream_id > upto or (after is not None and row.stream_id <= after):
                continue
            if row.receipt_type == "m.read.private" and row.user_id != user_id:
                continue
            data: dict[str, Any] = {"ts": row.ts}
            if row.thread_id:
                data["thread_id"] = row.thread_id
            content.setdefault(row.event_id, {}).setdefault(row.receipt_type, {})[row.user_id] = data
        if not content:
            return None
        return {"type": "m.receipt", "content": content}

    async def read_position(self, room_id: str, user_id: str) -> int:
        """How far the user has read the room's main timeline (unthreaded or ``main`` receipts)."""
        unthreaded, main, _threads = await self.read_positions(room_id, user_id)
        return max(unthreaded, main)

    async def read_positions(self, room_id: str, user_id: str) -> tuple[int, int, dict[str, int]]:
        """(unthreaded, main timeline, {thread root: position}) of the user's read receipts.

        An unthreaded receipt marks everything up to it read, threads included; a
        ``main`` receipt the main timeline; a receipt in a thread that thread.
        """
        receipts = await self._room(room_id)
        unthreaded = main = 0
        for receipt_type in RECEIPT_TYPES:
            row = receipts.get((user_id, receipt_type, UNTHREADED))
            if row is not None:
                unthreaded = max(unthreaded, row.event_stream)
            row = receipts.get((user_id, receipt_type, "main"))
            if row is not None:
                main = max(main, row.event_stream)
        threads: dict[str, int] = {}
        for key in self._thread_keys.get(room_id, {}).get(user_id, ()):
            row = receipts.get(key)
            if row is not None:
                threads[key[2]] = max(threads.get(key[2], 0), row.event_stream)
        return unthreaded, main, threads

    def _index_thread_receipt(self, room_id: str, key: tuple[str, str, str]) -> None:
        if key[2] not in (UNTHREADED, "main"):
            self._thread_keys.setdefault(room_id, {}).setdefault(key[0], set()).add(key)
