"""Pacing of ``/sync`` answers while a worker is busy.

A client that receives events faster than the server can answer gets one response per
event when the server has time, each costing a full request (HTTP, auth, the sync
computation) on both sides. Near saturation that per-response cost is what tips a
worker over: queues grow and every delivery is late. :class:`SyncPacer` trades a
little latency for fewer, fuller responses, and only when it has to:

- it measures how late the worker's event loop runs its timers (a 20 ms timer,
  averaged over 100 ms): the queueing delay every request on this worker is paying.
  An idle or moderately loaded worker runs them within a millisecond or two; one that
  is falling behind runs them later and later;
- while that mean delay is at or above ``busy_lag``, a long-poll ``/sync`` (one with a
  ``since`` token and a timeout) from a device that was answered less than
  ``interval`` ago waits out the rest of the interval first, so events committed in
  the meantime go out in one response instead of several;
- otherwise nothing waits: an idle or moderately loaded worker answers at once.

Each device gets at most one response per ``interval`` while the worker is busy, so
a delivery is at most ``interval`` later than it would have been (50 ms by default —
below what a person notices in a chat, and well inside a 100 ms delivery budget).
Requests with ``timeout=0`` (the client wants an immediate answer) and initial syncs
are never paced. The record of recent answers is per worker, in memory, and pruned
every period; a device whose next request lands on another worker is simply not
paced there.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

from bastion import metrics

DeviceKey = tuple[str, str | None]


class SyncPacer:
    def __init__(
        self,
        interval_s: float,
        busy_lag_s: float,
        *,
        tick_s: float = 0.02,
        ticks_per_sample: int = 5,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.interval = interval_s
        self.busy_lag = busy_lag_s
        self._tick = tick_s
        self._ticks_per_sample = ticks_per_sample
        self._clock = clock
        self._last_answer: dict[DeviceKey, float] = {}
        self._lag_sum = 0.0
        self._lag_count = 0
        self.lag = 0.0  # mean timer delay over the last sample, seconds

    @property
    def enabled(self) -> bool:
        return self.interval > 0

    @property
    def busy(self) -> bool:
        return self.lag >= self.busy_lag

    def delay(self, key: DeviceKey) -> float:
        """Seconds the next long-poll of ``key`` should wait before it computes."""
        if not self.enabled or not self.busy:
            return 0.0
        last = self._last_answer.get(key)
        if last is None:
            return 0.0
        return max(0.0, last + self.interval - self._clock())

    def answered(self, key: DeviceKey) -> None:
        if self.enabled:
            self._last_answer[key] = self._clock()

    async def pace(self, key: DeviceKey) -> None:
        wait = self.delay(key)
        if wait > 0:
            metrics.SYNC_PACED.inc()
            await asyncio.sleep(wait)

    def observe(self, lag: float) -> None:
        """One timer's delay; every ``ticks_per_sample`` of them update :attr:`lag`
        and forget answers older than the interval."""
        self._lag_sum += max(lag, 0.0)
        self._lag_count += 1
        if self._lag_count < self._ticks_per_sample:
            return
        self.lag = self._lag_sum / self._lag_count
        self._lag_sum, self._lag_count = 0.0, 0
        horizon = self._clock() - self.interval
        stale = [key for key, at in self._last_answer.items() if at <= horizon]
        for key in stale:
            del self._last_answer[key]

    @property
    def tracked(self) -> int:
        return len(self._last_answer)

    async def run(self) -> None:
        """Time the event loop's timers until cancelled (also the lag metric's source)."""
        while True:
            started = self._clock()
            await asyncio.sleep(self._tick)
            self.observe(self._clock() - started - self._tick)
