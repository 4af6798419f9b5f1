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

import asyncio
from collections import OrderedDict
from dataclasses import replace
from typing import Any

from bastion.clock import now_ms
from bastion.core.ids import is_valid_event_id
from bastion.errors import Forbidden, InvalidParam, NotFound
from bastion.services.account_data import AccountDataService
from bastion.services.caches import EventCache, RoomCache
from bastion.services.requester import Requester
from bastion.storage import receipts as receipts_store
from bastion.storage.database import Database
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
        last_stream_id: int,
    ) -> None:
        self._db = db
        self._rooms = rooms
        self._events = events
        self._notifier = notifier
        self._account_data = account_data
        self._last = last_stream_id
        self._lock = asyncio.Lock()
        # room -> {(user, type, thread): row}; rooms loaded on demand
        self._cache: OrderedDict[str, dict[tuple[str, str, str], ReceiptRow]] = OrderedDict()
        self._room_stream: dict[str, int] = {}

    async def _room(self, room_id: str) -> dict[tuple[str, str, str], ReceiptRow]:
        cached = self._cache.get(room_id)
        if cached is not None:
            self._cache.move_to_end(room_id)
            return cached
        rows = await self._db.read(receipts_store.room_receipts, room_id)
        cached = self._cache.get(room_id)  # loaded meanwhile
        if cached is None:
            cached = {(r.user_id, r.receipt_type, r.thread_id): r for r in rows}
            self._cache[room_id] = cached
            self._room_stream[room_id] = max((r.stream_id for r in rows), default=0)
            if len(self._cache) > 20_000:
                old, _ = self._cache.popitem(last=False)
                self._room_stream.pop(old, None)
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

    async def _target(self, requester: Requester, room_id: str, event_id: str) -> int:
        room = await self._rooms.get(room_id)
        if room is None or room.membership_of(requester.user_id) != "join":
            raise Forbidden("You are not in this room")
        if not is_valid_event_id(event_id):
            raise InvalidParam("Invalid event ID")
        event = await self._events.get(event_id)
        if event is None or event.room_id != room_id:
            raise NotFound("Event not found in this room")
        return event.stream_ordering

    async def _store(self, requester: Requester, room_id: str, receipt_type: str, event_id: str, thread_id: str) -> None:
        event_stream = await self._target(requester, room_id, event_id)
        receipts = await self._room(room_id)
        key = (requester.user_id, receipt_type, thread_id)
        current = receipts.get(key)
        if current is not None and current.event_stream >= event_stream:
            return
        async with self._lock:
            stream_id = self._last + 1
            row = ReceiptRow(room_id, requester.user_id, receipt_type, thread_id, event_id, event_stream, now_ms(), stream_id)
            stored = await self._db.write(receipts_store.upsert_receipt, row)
            self._last = stream_id
            if not stored:
                return
            receipts[key] = row
            self._room_stream[room_id] = stream_id
            self._notifier.advance(replace(self._notifier.current, receipts=stream_id))
        room = await self._rooms.get(room_id)
        if receipt_type == "m.read.private" or room is None:
            self._notifier.notify_users([requester.user_id])
        else:
            self._notifier.notify_users(room.joined)

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
        receipts = await self._room(room_id)
        best = 0
        for receipt_type in RECEIPT_TYPES:
            for thread in (UNTHREADED, "main"):
                row = receipts.get((user_id, receipt_type, thread))
                if row is not None and row.event_stream > best:
                    best = row.event_stream
        return best
