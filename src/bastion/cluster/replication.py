"""Keeping one worker's in-memory views in step with writes made by other workers.

Every durable stream (events, account data, receipts, to-device, device lists) has its
positions allocated inside the writing transaction (``storage/streams.py``), so
positions commit in order on every worker. Each worker tracks, per stream, the
position up to which it has *applied* changes to its caches and woken its ``/sync``
waiters. The invariant: applied positions are contiguous — a worker never shows
position *n* before it has applied everything below *n*. So:

* after a local commit of positions ``first..last``, a worker first catches up on
  ``(applied, first)`` — positions other workers committed meanwhile — then applies
  its own, then publishes ``last`` on the bus;
* a bus message "stream S is at n" makes other workers catch up to *n* (load the rows
  from the database, apply, wake waiters);
* a poller reads all stream positions every second (every 200 ms while the bus is
  down), so a lost bus message only delays a wake-up;
* a ``/sync`` whose token is ahead of this worker (issued by another) first catches
  up to it;
* the ``invalidations`` stream carries no client data: each row names cache entries
  (a user's access tokens, a device's one-time key counts) that a write on some worker
  made stale. Catching up on it drops them, so with the barrier below a revoked token
  fails on the next request to any worker, even with the bus down. Every other
  stream's catch-up applies the invalidations committed so far *before* it wakes
  anyone: a long-poll woken by, say, the to-device message that follows a one-time
  key claim on another worker must not answer with the count from before the claim.

With one process and no Redis there are no other writers: nothing is polled, and
catching up never has anything to do.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from bastion import metrics
from bastion.storage import streams as streams_store
from bastion.storage.database import Database

log = logging.getLogger(__name__)


@dataclass
class StreamHandler:
    """How one stream's remote changes are loaded and applied.

    ``load(txn, after, upto)`` runs in a read transaction and returns rows;
    ``apply(rows, upto)`` updates caches and wakes waiters (on the event loop).
    """

    load: Callable[[Any, int, int], Any]
    apply: Callable[[Any, int], Awaitable[None]]


class Replicator:
    def __init__(self, db: Database, positions: dict[str, int], clustered: bool) -> None:
        self._db = db
        self.clustered = clustered
        self.applied = dict(positions)
        self._handlers: dict[str, StreamHandler] = {}
        self._locks = {stream: asyncio.Lock() for stream in positions}
        self._bus: Any = None
        self._task: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        self._closing = False
        self._background: set[asyncio.Task[Any]] = set()
        self._barrier_task: asyncio.Task[None] | None = None
        self._barrier_generation = 0
        self._barrier_started_gen = 0
        # The stream every other stream's catch-up applies first (see the module docstring).
        self._first: str | None = None

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def register(
        self, stream: str, handler: StreamHandler, position: int | None = None, *, applied_first: bool = False
    ) -> None:
        """``position``: where a stream not in the constructor's positions starts;
        ``applied_first``: catch up on this stream before applying any other's changes."""
        if applied_first:
            self._first = stream
        if stream not in self.applied:
            if position is None:
                raise ValueError(f"stream {stream!r} needs a starting position")
            self.applied[stream] = position
            self._locks[stream] = asyncio.Lock()
        self._handlers[stream] = handler

    def lock(self, stream: str) -> asyncio.Lock:
        return self._locks[stream]

    # -- local writes -------------------------------------------------------------------------

    async def before_local_apply(self, stream: str, first: int) -> None:
        """Call with ``lock(stream)`` held, after committing positions from ``first``."""
        if self.applied[stream] < first - 1:
            await self._catch_up_locked(stream, first - 1)

    def after_local_apply(self, stream: str, last: int) -> None:
        """Call with ``lock(stream)`` held, once the local rows are applied."""
        if last > self.applied[stream]:
            self.applied[stream] = last
        if self._bus is not None:
            self._spawn(self._bus.publish("pos", {"s": stream, "p": last}))

    # -- catching up -------------------------------------------------------------------------

    async def catch_up(self, stream: str, upto: int | None = None) -> None:
        if not self.clustered:
            return
        async with self._locks[stream]:
            if upto is None:
                upto = await self._db.read(_position, stream)
            if upto > self.applied[stream]:
                await self._catch_up_locked(stream, upto)

    async def _catch_up_locked(self, stream: str, upto: int) -> None:
        handler = self._handlers.get(stream)
        after = self.applied[stream]
        started = time.perf_counter()
        if handler is not None:
            first = self._first if stream != self._first else None
            if first is None:
                rows = await self._db.read(handler.load, after, upto)
            else:
                # The invalidations' position is read after this stream's rows, in the same
                # transaction, so it covers every invalidation committed before them; its
                # rows are read (and its lock taken) only when this worker is behind.
                rows, first_at = await self._db.read(_load_and_position, handler.load, after, upto, first)
                if first_at > self.applied[first]:
                    await self.catch_up(first, first_at)
            await handler.apply(rows, upto)
        self.applied[stream] = max(self.applied[stream], upto)
        metrics.CATCHUP_SECONDS.observe(time.perf_counter() - started)

    async def catch_up_all(self) -> None:
        if not self.clustered:
            return
        current = {r[0]: int(r[1]) for r in await self._db.fetch_one_statement(streams_store.POSITIONS_SQL)}
        for stream, position in sorted(current.items(), key=lambda item: item[0] != self._first):  # first one first
            if stream in self._locks and position > self.applied[stream]:
                await self.catch_up(stream, position)

    async def barrier(self) -> None:
        """Wait until everything any worker committed before this call is applied here.

        Called before each client request with several workers, so a client whose
        requests land on different workers always reads its own writes. Concurrent
        callers share one read of the stream positions — one that started after they
        arrived (so it sees their writes).
        """
        if not self.clustered:
            return
        arrived = self._barrier_generation
        while True:
            running = self._barrier_task
            if running is not None and not running.done():
                if self._barrier_started_gen > arrived:
                    await asyncio.shield(running)
                    return
                with contextlib.suppress(Exception):
                    await asyncio.shield(running)
                continue
            self._barrier_generation += 1
            self._barrier_started_gen = self._barrier_generation
            self._barrier_task = asyncio.get_running_loop().create_task(self.catch_up_all())
            await asyncio.shield(self._barrier_task)
            return

    async def ensure(self, wanted: dict[str, int]) -> None:
        """Before serving a token issued elsewhere: catch up on every stream it is ahead in."""
        if not self.clustered:
            return
        for stream, position in wanted.items():
            if stream in self.applied and position > self.applied[stream]:
                await self.catch_up(stream)

    # -- background ---------------------------------------------------------------------------

    def attach_bus(self, bus: Any) -> None:
        self._bus = bus
        bus.on_message(self._on_bus)
        bus.on_reconnect(self._on_bus_reconnect)

    def _on_bus(self, kind: str, data: dict[str, Any]) -> None:
        if kind == "pos":
            stream, position = data.get("s"), data.get("p")
            if (
                isinstance(stream, str) and stream in self.applied and isinstance(position, int)
                and position > self.applied[stream]
            ):
                self._spawn(self._safe_catch_up(stream, position))

    async def _on_bus_reconnect(self) -> None:
        self._wake.set()  # messages may have been missed while disconnected: poll now

    async def _safe_catch_up(self, stream: str, position: int | None) -> None:
        try:
            await self.catch_up(stream, position)
        except Exception as exc:
            log.warning("catching up on %s failed (will retry on the next poll): %s", stream, exc)

    async def start(self) -> None:
        if self.clustered:
            self._task = asyncio.create_task(self._poll(), name="replication-poller")

    async def _poll(self) -> None:
        while not self._closing:
            interval = 1.0 if (self._bus is not None and self._bus.connected) else 0.2
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout=interval)
            self._wake.clear()
            try:
                await self.catch_up_all()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("stream poll failed: %s", exc)

    async def close(self) -> None:
        self._closing = True
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task


def _position(txn: Any, stream: str) -> int:
    return int(txn.fetchval("SELECT position FROM stream_positions WHERE stream = ?", (stream,)))


def _load_and_position(
    txn: Any, load: Callable[[Any, int, int], Any], after: int, upto: int, stream: str
) -> tuple[Any, int]:
    return load(txn, after, upto), _position(txn, stream)
