"""Wakes long-polling ``/sync`` requests when something relevant to a user arrives.

Called only after the database commit (publish after commit), so a woken request
always finds in storage what it was woken for.

Each user has a *last notified token*; a waiter that starts with ``since`` returns
at once if the user was notified past ``since`` (this closes the race between
computing an empty response and starting to wait, with no lock: there is no
``await`` between the check and the registration).

Every change that can appear in a user's ``/sync`` notifies that user. So when the
notifier has been watching since before ``since`` and has not notified the user
after it, nothing has changed for them: :meth:`nothing_since` lets a long-poll
start waiting without first computing a response it would throw away (half the
``/sync`` work of a busy server: each delivery used to compute twice).

A notification wakes at most :data:`WAKE_BATCH` waiters per turn of the event loop, so
a big room's fan-out does not hold up every other request until it is done.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable

from bastion import metrics
from bastion.streams.tokens import StreamToken


class Notifier:
    def __init__(self, current: StreamToken) -> None:
        self.current = current
        self._waiters: dict[str, set[asyncio.Future[float]]] = {}
        self._last: dict[str, StreamToken] = {}
        # Notifications before this token were not seen (before start-up, or lost track of).
        self._floor = current
        self._shutting_down = False

    def advance(self, token: StreamToken) -> None:
        """Move the current token forward (after a commit)."""
        self.current = self.current.max(token)

    def notify_users(self, users: Iterable[str], token: StreamToken | None = None) -> None:
        token = token or self.current
        woken: list[asyncio.Future[float]] = []
        for user in users:
            previous = self._last.get(user)
            self._last[user] = token if previous is None else previous.max(token)
            waiters = self._waiters.pop(user, None)
            if waiters:
                woken.extend(waiters)
        if woken:
            _wake(woken, 0, time.perf_counter())

    def has_news(self, user_id: str, since: StreamToken) -> bool:
        last = self._last.get(user_id)
        return last is not None and last.is_after(since)

    def nothing_since(self, user_id: str, since: StreamToken) -> bool:
        """True if nothing can have changed for the user after ``since``: every
        notification since then was seen here, and none was for them."""
        return not self._floor.is_after(since) and not self.has_news(user_id, since)

    def lost_track(self) -> None:
        """Something changed that may not have notified everyone it concerns (an error
        half-way through publishing; typing or presence in a room not in memory): stop
        vouching for anything before now."""
        self._floor = self.current

    async def wait_for(self, user_id: str, since: StreamToken, timeout_s: float) -> bool:
        """Wait until the user is notified past ``since`` or ``timeout_s`` passes.

        Returns True if woken by a notification, False on timeout or shutdown.
        """
        if self.has_news(user_id, since):
            return True
        if self._shutting_down or timeout_s <= 0:
            return False
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[float] = loop.create_future()
        waiters = self._waiters.setdefault(user_id, set())
        waiters.add(fut)
        timer = loop.call_later(timeout_s, _expire, fut)
        woke = False
        try:
            notified_at = await fut
            woke = notified_at > 0
            if woke:
                # From the commit being published on this worker to this request running again.
                metrics.SYNC_WAKE_SECONDS.observe(time.perf_counter() - notified_at)
        finally:
            timer.cancel()
            waiters.discard(fut)
            if not waiters and self._waiters.get(user_id) is waiters:
                del self._waiters[user_id]
        return bool(woke) and not self._shutting_down

    def forget_user(self, user_id: str) -> None:
        self._last.pop(user_id, None)

    def shutdown(self) -> None:
        """Release every waiter at once (graceful shutdown must not wait for long-polls)."""
        self._shutting_down = True
        for waiters in list(self._waiters.values()):
            for fut in waiters:
                if not fut.done():
                    fut.set_result(0.0)
        self._waiters.clear()

    @property
    def waiting_count(self) -> int:
        return sum(len(w) for w in self._waiters.values())


# Long-polls woken by one loop iteration at most. A message in a room of 1,000 wakes
# ~1,000 long-polls, each computing its response (~0.2 ms): woken all at once, they
# would run back to back and hold every other request — sends, other rooms' syncs — for
# the whole burst. In batches, the loop reads its sockets between them.
WAKE_BATCH = 32


def _wake(futures: list[asyncio.Future[float]], start: int, notified_at: float) -> None:
    end = start + WAKE_BATCH
    for fut in futures[start:end]:
        if not fut.done():
            fut.set_result(notified_at)
    if end < len(futures):
        # The next batch after this iteration's callbacks (the woken requests among
        # them) and the next poll of the sockets. A waiter whose time-out fires meanwhile
        # returns as timed out; the user's last notified token already holds the news,
        # so the client's next /sync is answered at once (nothing is lost).
        futures[end].get_loop().call_soon(_wake, futures, end, notified_at)


def _expire(fut: asyncio.Future[float]) -> None:
    if not fut.done():
        fut.set_result(0.0)
