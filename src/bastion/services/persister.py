"""The single writer of room events: batches, commits, then publishes.

Callers hand over a :class:`PersistUnit` — the events of one room that must commit
together (one message, or the whole chain of a ``createRoom``) plus any extra rows
that belong in the same transaction — and await its commit. Units that arrive
while a commit is under way are written together in the next transaction (group
commit), each inside its own savepoint, so one bad unit fails alone.

Stream orderings are assigned here, in commit order, so the event stream has no
holes that a reader could race past. Only after the commit do the in-memory views
(:mod:`bastion.services.caches`) change and ``/sync`` waiters wake: a client is
never shown something the database does not hold.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from bastion.core.events import Event
from bastion.services.caches import EventCache, MembershipIndex, RoomCache, RoomSnapshot
from bastion.storage import events as events_store
from bastion.storage.database import Database, Txn
from bastion.streams.notifier import Notifier

log = logging.getLogger(__name__)

MAX_UNITS_PER_BATCH = 256

TxnKey = tuple[str, str, str, str]  # user, device, scope, txn_id


@dataclass
class PersistUnit:
    room: RoomSnapshot
    events: list[Event]
    txn_keys: list[TxnKey | None] = field(default_factory=list)
    pre_writes: list[Callable[[Txn], Any]] = field(default_factory=list)
    redaction_targets: dict[str, Event] = field(default_factory=dict)  # redaction event ID -> target
    # filled by the writer
    _redaction_results: list[tuple[Event, dict[str, Any], list[str], Event]] = field(default_factory=list)


def _write_batch(txn: Txn, units: list[PersistUnit], now_ms: int) -> list[BaseException | None]:
    results: list[BaseException | None] = []
    for index, unit in enumerate(units):
        name = f"unit{index}"
        txn.savepoint(name)
        try:
            for write in unit.pre_writes:
                write(txn)
            keys = unit.txn_keys or [None] * len(unit.events)
            for event, key in zip(unit.events, keys, strict=True):
                events_store.insert_event(txn, event, key, now_ms)
            unit._redaction_results = []
            for event in unit.events:
                target = unit.redaction_targets.get(event.event_id)
                if target is not None:
                    pruned = events_store.apply_redaction(txn, target, event.event_id)
                    replacing = events_store.events_replacing(txn, target.event_id)
                    unit._redaction_results.append((target, pruned, replacing, event))
            txn.release_savepoint(name)
            results.append(None)
        except Exception as exc:
            txn.rollback_to_savepoint(name)
            results.append(exc)
    return results


class EventPersister:
    def __init__(
        self,
        db: Database,
        event_cache: EventCache,
        room_cache: RoomCache,
        memberships: MembershipIndex,
        notifier: Notifier,
        last_stream_ordering: int,
    ) -> None:
        self._db = db
        self._events = event_cache
        self._rooms = room_cache
        self._memberships = memberships
        self._notifier = notifier
        self._last_stream = last_stream_ordering
        self._queue: list[tuple[PersistUnit, asyncio.Future[None]]] = []
        self._task: asyncio.Task[None] | None = None
        self.listeners: list[Callable[[PersistUnit], None]] = []

    @property
    def last_stream_ordering(self) -> int:
        return self._last_stream

    async def persist(self, unit: PersistUnit) -> None:
        """Commit ``unit`` and publish it; raises if its writes failed (nothing is kept)."""
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._queue.append((unit, fut))
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._drain(), name="event-persister")
        await fut

    async def _drain(self) -> None:
        while self._queue:
            batch = self._queue[:MAX_UNITS_PER_BATCH]
            del self._queue[: len(batch)]
            units = [u for u, _ in batch]
            for unit in units:
                for event in unit.events:
                    self._last_stream += 1
                    event.stream_ordering = self._last_stream
            try:
                results = await self._db.write(_write_batch, units, int(time.time() * 1000))
            except BaseException as exc:
                log.error("event batch failed to commit: %s", exc)
                for _, fut in batch:
                    if not fut.done():
                        fut.set_exception(exc)
                if isinstance(exc, asyncio.CancelledError):
                    raise
                continue
            woken: set[str] = set()
            for (unit, fut), error in zip(batch, results, strict=True):
                if error is not None:
                    if not fut.done():
                        fut.set_exception(error)
                    continue
                try:
                    self._publish(unit, woken)
                except Exception:
                    # The unit is committed; only the in-memory view is in doubt. Retire
                    # it so the next request reloads the room from the database.
                    log.exception("updating the in-memory view of %s failed", unit.room.room_id)
                    unit.room.stale = True
                    self._rooms.discard(unit.room.room_id)
                    self._memberships.drop_all()
            self._notifier.advance(self._notifier.current.with_events(self._last_stream))
            self._notifier.notify_users(woken)
            for (_, fut), error in zip(batch, results, strict=True):
                if error is None and not fut.done():
                    fut.set_result(None)

    def _publish(self, unit: PersistUnit, woken: set[str]) -> None:
        room = unit.room
        for event in unit.events:
            self._events.put(event)
            room.apply(event)
            if event.type == "m.room.member" and event.state_key is not None:
                self._memberships.apply(
                    event.state_key, event.room_id, event.membership or "leave", event.stream_ordering, event.event_id
                )
                woken.add(event.state_key)
        for target, pruned, replacing, redaction in unit._redaction_results:
            live = self._events.get_cached(target.event_id) or target
            live.apply_redaction(pruned, redaction)
            if target is not live:
                target.apply_redaction(pruned, redaction)
            for event_id in replacing:
                replaced = self._events.get_cached(event_id)
                if replaced is not None:
                    replaced.set_prev_content(pruned["content"])
        woken.update(room.joined)
        for listener in self.listeners:
            try:
                listener(unit)
            except Exception:  # a listener bug must not lose the acknowledgement
                log.exception("persist listener failed")

    async def flush(self) -> None:
        """Wait until everything queued so far is committed (used at shutdown)."""
        while self._task is not None and not self._task.done():
            await asyncio.shield(self._task)
