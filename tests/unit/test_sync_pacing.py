"""SyncPacer: when a device's next long-poll waits, and for how long."""

from __future__ import annotations

import asyncio
import time

from bastion.services.sync_pacing import SyncPacer


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def make(interval: float = 0.05, busy_lag: float = 0.005) -> tuple[SyncPacer, Clock]:
    clock = Clock()
    return SyncPacer(interval, busy_lag, ticks_per_sample=4, clock=clock), clock


def feed(pacer: SyncPacer, *lags: float) -> None:
    for lag in lags:
        pacer.observe(lag)


ALICE = ("@alice:hs", "PHONE")


def test_a_worker_whose_timers_run_on_time_never_delays() -> None:
    pacer, _ = make()
    feed(pacer, 0.001, 0.0, 0.009, 0.002)  # one late timer in four: mean 3 ms
    assert abs(pacer.lag - 0.003) < 1e-9 and not pacer.busy
    pacer.answered(ALICE)
    assert pacer.delay(ALICE) == 0.0


def test_a_busy_worker_spaces_one_devices_answers_by_the_interval() -> None:
    pacer, clock = make()
    feed(pacer, 0.006, 0.012, 0.004, 0.01)
    assert pacer.busy
    assert pacer.delay(ALICE) == 0.0  # never answered: nothing to space from
    pacer.answered(ALICE)
    clock.now += 0.02
    assert abs(pacer.delay(ALICE) - 0.03) < 1e-9
    assert pacer.delay(("@alice:hs", "LAPTOP")) == 0.0  # another device is not held back
    clock.now += 0.04
    assert pacer.delay(ALICE) == 0.0


def test_the_lag_is_a_mean_per_sample_and_old_answers_are_forgotten() -> None:
    pacer, clock = make()
    feed(pacer, 0.02, 0.02, 0.02, 0.02)
    pacer.answered(ALICE)
    feed(pacer, 0.0, 0.0, 0.0)
    assert pacer.busy and pacer.tracked == 1  # the sample is not complete yet
    clock.now += 0.05
    feed(pacer, 0.0)
    assert not pacer.busy and pacer.tracked == 0  # answered an interval ago: forgotten
    pacer.answered(ALICE)
    assert pacer.delay(ALICE) == 0.0  # the load fell: answer at once


def test_interval_zero_turns_pacing_off() -> None:
    pacer, _ = make(interval=0, busy_lag=0)
    pacer.answered(ALICE)
    assert not pacer.enabled and pacer.tracked == 0 and pacer.delay(ALICE) == 0.0


def test_run_measures_a_blocked_event_loop_as_lag() -> None:
    async def measure() -> tuple[float, float]:
        pacer = SyncPacer(0.05, 0.005, tick_s=0.001, ticks_per_sample=1)
        task = asyncio.create_task(pacer.run())
        await asyncio.sleep(0.005)
        on_time = pacer.lag
        time.sleep(0.06)  # the loop is stuck: the pending timer fires ~60 ms late
        for _ in range(3):
            await asyncio.sleep(0)  # let the overdue timer run, not the next one
        task.cancel()
        return on_time, pacer.lag

    on_time, blocked = asyncio.run(measure())
    assert on_time < 0.015 and blocked >= 0.05

