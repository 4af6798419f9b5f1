"""Tails the ``server_signals`` table: changes made outside this process.

The CLI (``bastion user deactivate``, ``bastion user passwd --logout``) writes to the
database directly; this poller applies what those changes mean to the running
server within about a second — cached tokens dropped, deactivations finished.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from bastion.clock import now_ms
from bastion.storage import accounts as accounts_store
from bastion.storage.database import Database

log = logging.getLogger(__name__)

Handler = Callable[[str], Awaitable[None] | None]


class SignalPoller:
    def __init__(self, db: Database, interval_s: float = 1.0) -> None:
        self._db = db
        self._interval = interval_s
        self._handlers: dict[str, Handler] = {}
        self._last_id = 0
        self._task: asyncio.Task[None] | None = None
        self._lock = asyncio.Lock()  # the timer and a bus nudge may ask at once

    def on(self, kind: str, handler: Handler) -> None:
        self._handlers[kind] = handler

    async def start(self) -> None:
        self._last_id = await self._db.read(accounts_store.max_signal_id)
        self._task = asyncio.create_task(self._run(), name="signal-poller")

    async def poll_once(self) -> None:
        async with self._lock:
            await self._poll_locked()

    async def _poll_locked(self) -> None:
        rows = await self._db.read(accounts_store.signals_after, self._last_id)
        for signal_id, kind, key in rows:
            self._last_id = signal_id
            handler = self._handlers.get(kind)
            if handler is None:
                continue
            try:
                result = handler(key)
                if asyncio.iscoroutine(result):
                    await result
            except Exception:
                log.exception("handling signal %s %s failed", kind, key)

    async def _run(self) -> None:
        ticks = 0
        while True:
            await asyncio.sleep(self._interval)
            try:
                await self.poll_once()
                ticks += 1
                if ticks % 3600 == 0:
                    await self._db.write(accounts_store.prune_signals, now_ms() - 24 * 3600 * 1000)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("signal poll failed: %s", exc)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
