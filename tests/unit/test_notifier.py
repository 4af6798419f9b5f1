"""The notifier's wake-ups: every waiter woken once, a big fan-out in batches."""

from __future__ import annotations

import asyncio

import uvloop

from bastion.streams.notifier import WAKE_BATCH, Notifier
from bastion.streams.tokens import StreamToken

SINCE = StreamToken(events=1)


async def _fan_out(users: list[str]) -> tuple[list[bool], list[str], int]:
    """Every user long-polls; one notification for all of them; a callback scheduled
    just after it stands for a request arriving meanwhile. Returns what each waiter got,
    the order they ran in, and how many had run when the callback did."""
    notifier = Notifier(SINCE)
    ran: list[str] = []

    async def poll(user: str) -> bool:
        woke = await notifier.wait_for(user, SINCE, 30)
        ran.append(user)
        return woke

    tasks = [asyncio.create_task(poll(u)) for u in users]
    await asyncio.sleep(0)
    assert notifier.waiting_count == len(users)
    notifier.advance(StreamToken(events=2))
    notifier.notify_users(users)
    loop = asyncio.get_running_loop()
    meanwhile: asyncio.Future[int] = loop.create_future()
    loop.call_soon(lambda: meanwhile.set_result(len(ran)))
    woke = await asyncio.gather(*tasks)
    assert notifier.waiting_count == 0
    return list(woke), ran, await meanwhile


def test_a_big_fan_out_lets_other_work_run_between_batches() -> None:
    users = [f"@u{i}:hs" for i in range(10 * WAKE_BATCH + 5)]
    for runner in (asyncio.run, uvloop.run):
        woke, ran, before_other = runner(_fan_out(users))
        assert woke == [True] * len(users)  # each woken by the notification, not a time-out
        assert ran == users  # in the order they were notified
        # Other work got the loop after the first batch, not after the whole fan-out.
        assert 0 < before_other <= WAKE_BATCH


def test_a_small_fan_out_wakes_everyone_in_one_turn() -> None:
    users = [f"@u{i}:hs" for i in range(WAKE_BATCH)]
    woke, ran, before_other = asyncio.run(_fan_out(users))
    assert woke == [True] * len(users)
    assert ran == users
    assert before_other == len(users)


def test_a_user_notified_before_waiting_returns_at_once() -> None:
    async def scenario() -> bool:
        notifier = Notifier(SINCE)
        notifier.advance(StreamToken(events=2))
        notifier.notify_users(["@a:hs"])
        assert not notifier.nothing_since("@a:hs", SINCE)
        return await asyncio.wait_for(notifier.wait_for("@a:hs", SINCE, 30), 1)

    assert asyncio.run(scenario()) is True
