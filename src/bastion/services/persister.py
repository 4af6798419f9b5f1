"""The single writer of room events: batches, commits, then publishes.

Callers hand over a :class:`PersistUnit` — the events of one room that must commit
together (one message, or the whole chain of a ``createRoom``) plus any extra rows
that belong in the same transaction — and await its commit. Units that arrive
while a commit is under way are written together in the next transaction (group
commit), each inside its own savepoint, so one bad unit fails alone.

Stream orderings are allocated inside the writing transaction
(:func:`bastion.storage.streams.allocate`), so they commit in order even with several
worker processes writing. Only after the commit do the in-memory views
(:mod:`bastion.services.caches`) change and ``/sync`` waiters wake: a client is
never shown something the database does not hold. Events other workers wrote are
applied by :meth:`EventPersister.apply_remote` (see :mod:`bastion.cluster.replication`).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from bastion import metrics
from bastion.cluster.replication import Replicator
from bastion.core.events import Event, redact_pdu
from bastion.errors import StorageUnavailable
from bastion.services.caches import EventCache, MembershipIndex, RoomCache, RoomSnapshot
from bastion.storage import events as events_store
from bastion.storage import streams as streams_store
from bastion.storage.database import Database, Txn
from bastion.streams.notifier import Notifier

log = logging.getLogger(__name__)

MAX_UNITS_PER_BATCH = 256

TxnKey = tuple[str, str, str, str]  # user, device, scope, txn_id


class StaleRoom(Exception):
    """Another worker added to the room after this unit was built; build it again."""


@dataclass
class PersistUnit:
    room: RoomSnapshot
    events: list[Event]
    txn_keys: list[TxnKey | None] = field(default_factory=list)
    pre_writes: list[Callable[[Txn], Any]] = field(default_factory=list)
    redaction_targets: dict[str, Event] = field(default_factory=dict)  # redaction event ID -> target
    # The room's newest event when these were built (checked at commit with several workers)
    expected_head: str | None = None
    check_head: bool = False
    # filled by the writer
    _redaction_results: list[tuple[Event, dict[str, Any], list[str], Event]] = field(default_factory=list)


def _write_batch(
    txn: Txn, units: list[PersistUnit], now_ms: int, check_heads: bool
) -> tuple[int, int, list[BaseException | None]]:
    count = sum(len(unit.events) for unit in units)
    # Allocating takes the events stream's row lock: event writers on every worker are
    # serialised from here to the commit, so the room heads read below are current.
    first = streams_store.allocate(txn, "events", count) if count else 0
    position = first
    for unit in units:
        for event in unit.events:
            event.stream_ordering = position
            position += 1
    results: list[BaseException | None] = []
    for index, unit in enumerate(units):
        name = f"unit{index}"
        txn.savepoint(name)
        try:
            if check_heads and unit.check_head and unit.events:
                latest = events_store.latest_room_event(txn, unit.room.room_id)
                if (latest[0] if latest is not None else None) != unit.expected_head:
                    raise StaleRoom(unit.room.room_id)
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
    return first, position - 1, results


class EventPersister:
    def __init__(
        self,
        db: Database,
        event_cache: EventCache,
        room_cache: RoomCache,
        memberships: MembershipIndex,
        notifier: Notifier,
        replicator: Replicator,
    ) -> None:
        self._db = db
        self._events = event_cache
        self._rooms = room_cache
        self._memberships = memberships
        self._notifier = notifier
        self._replicator = replicator
        self._queue: list[tuple[PersistUnit, asyncio.Future[None]]] = []
        self._task: asyncio.Task[None] | None = None
        self.listeners: list[Callable[[PersistUnit], None]] = []

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
            started = time.perf_counter()
            try:
                first, last, results = await self._db.write(
                    _write_batch, units, int(time.time() * 1000), self._replicator.clustered
                )
            except BaseException as exc:
                log.error("event batch failed to commit: %s", exc)
                for _, fut in batch:
                    if not fut.done():
                        fut.set_exception(exc)
                if isinstance(exc, asyncio.CancelledError):
                    raise
                continue
            metrics.PERSIST_SECONDS.observe(time.perf_counter() - started)
            metrics.PERSIST_EVENTS.inc(sum(len(u.events) for u, e in zip(units, results, strict=True) if e is None))
            woken: set[str] = set()
            lost_track = False
            async with self._replicator.lock("events"):
                if first:
                    # Positions other workers committed below ours are applied first.
                    try:
                        await self._replicator.before_local_apply("events", first)
                    except Exception as exc:
                        self._caught_up_failed(batch, results, exc)
                        continue
                applied = self._replicator.applied["events"]
                for (unit, fut), error in zip(batch, results, strict=True):
                    if error is not None:
                        if not fut.done():
                            fut.set_exception(error)
                        continue
                    try:
                        self._publish(unit, woken, applied)
                    except Exception:
                        # The unit is committed; only the in-memory view is in doubt. Retire
                        # it so the next request reloads the room from the database.
                        log.exception("updating the in-memory view of %s failed", unit.room.room_id)
                        self._retire(unit.room)
                        lost_track = True
                if first:
                    self._replicator.after_local_apply("events", last)
                self._notifier.advance(self._notifier.current.with_events(self._replicator.applied["events"]))
                if lost_track:
                    # Whom the unit concerned is unknown: long-polls compute before waiting.
                    self._notifier.lost_track()
                # The senders first: a message to a big room wakes its members' long-polls
                # a batch per turn of the loop, and its sender should not wait for them all.
                for (_, fut), error in zip(batch, results, strict=True):
                    if error is None and not fut.done():
                        fut.set_result(None)
                self._notifier.notify_users(woken)

    def _caught_up_failed(
        self,
        batch: list[tuple[PersistUnit, asyncio.Future[None]]],
        results: list[BaseException | None],
        exc: Exception,
    ) -> None:
        """The batch committed, but reading what other workers committed before it failed
        (the database went away in between): its events cannot be applied in order now.
        Its requests get a 503 — a retry with the same transaction ID answers with the
        stored event — and its rooms are reloaded from the database on next use; the
        replicator's next catch-up applies the batch like another worker's writes."""
        log.error("catching up before applying a committed event batch failed: %s", exc)
        for (unit, fut), error in zip(batch, results, strict=True):
            self._retire(unit.room)
            if not fut.done():
                fut.set_exception(error if error is not None else StorageUnavailable("Database unavailable; please retry"))
        self._notifier.lost_track()

    def _retire(self, room: RoomSnapshot) -> None:
        """Drop a room view that may not hold what was committed: its holders and the next
        request reload it (and the memberships) from the database."""
        room.stale = True
        self._rooms.discard(room.room_id)
        self._memberships.drop_all()

    def _publish(self, unit: PersistUnit, woken: set[str], already_applied: int) -> None:
        room = unit.room
        if unit.events and unit.events[0].stream_ordering <= already_applied:
            # Another worker's catch-up loaded this unit from the database first.
            self._run_listeners(unit)
            return
        for event in unit.events:
            self._events.put(event)
            room.apply(event)
            if event.type == "m.room.member" and event.state_key is not None:
                self._memberships.apply(
                    event.state_key, event.room_id, event.membership or "leave", event.stream_ordering, event.event_id
                )
                woken.add(event.state_key)
        for target, pruned, replacing, redaction in unit._redaction_results:
            self._events.note_redaction([target.event_id, *replacing])
            live = self._events.get_cached(target.event_id) or target
            live.apply_redaction(pruned, redaction)
            if target is not live:
                target.apply_redaction(pruned, redaction)
            for event_id in replacing:
                replaced = self._events.get_cached(event_id)
                if replaced is not None:
                    replaced.set_prev_content(pruned["content"])
        woken.update(room.joined)
        self._run_listeners(unit)

    def _run_listeners(self, unit: PersistUnit) -> None:
        for listener in self.listeners:
            try:
                listener(unit)
            except Exception:  # a listener bug must not lose the acknowledgement
                log.exception("persist listener failed")

    # -- other workers' events ------------------------------------------------------------------

    async def apply_remote(self, loaded: tuple[list[Event], dict[str, list[str]]], upto: int) -> None:
        """Apply events other workers committed (loaded in order from the database)."""
        events, replacing = loaded
        woken: set[str] = set()
        rooms: dict[str, RoomSnapshot | None] = {}
        for event in events:
            event = self._events.put(event)
            room = self._rooms.cached(event.room_id)
            if room is None:
                self._rooms.note_remote(event)  # a load of the room may be in flight
            elif not room.stale and event.stream_ordering > room.last_stream:  # else: loaded with it
                try:
                    room.apply(event)
                except Exception:
                    log.exception("applying a remote event to %s failed; reloading the room", event.room_id)
                    self._rooms.discard(event.room_id)
                    room = None
            rooms[event.room_id] = room
            if event.type == "m.room.member" and event.state_key is not None:
                self._memberships.apply(
                    event.state_key, event.room_id, event.membership or "leave", event.stream_ordering, event.event_id
                )
                woken.add(event.state_key)
            if event.redacts is not None:
                self._events.note_redaction([event.redacts, *replacing.get(event.redacts, [])])
                target = self._events.get_cached(event.redacts)
                if target is not None and target.redacted_because is None:
                    pruned = redact_pdu(target.pdu, target.room_version)
                    target.apply_redaction(pruned, event)
                    for event_id in replacing.get(event.redacts, []):
                        replaced = self._events.get_cached(event_id)
                        if replaced is not None:
                            replaced.set_prev_content(pruned["content"])
        for room_id, room in rooms.items():
            if room is None:
                room = await self._rooms.get(room_id)
            if room is not None:
                woken.update(room.joined)
        self._notifier.advance(self._notifier.current.with_events(upto))
        self._notifier.notify_users(woken)

    async def flush(self) -> None:
        """Wait until everything queued so far is committed (used at shutdown)."""
        while self._task is not None and not self._task.done():
            await asyncio.shield(self._task)
