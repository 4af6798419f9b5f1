"""Typing and presence changes wake the room's members on a worker that does not have
the room in memory (another worker's change, or a room that left the cache): the
worker loads the room to learn who they are. Before, long-polls already waiting slept
on until their timeout and the typing notice arrived late or not at all."""

from __future__ import annotations

import asyncio

from bastion.clock import now_ms
from bastion.services.presence import PresenceService
from bastion.services.typing import TypingService
from tests.harness import MatrixHttp, ServerProcess
from tests.inprocess import in_process_worker


def _room_of_two(srv: ServerProcess) -> tuple[str, str, str]:
    alice = MatrixHttp(srv.base_url, srv.server_name).register()
    bob = alice.new_user()
    room = alice.create_room(preset="public_chat")
    bob.join(room)
    assert alice.user_id is not None and bob.user_id is not None
    return room, alice.user_id, bob.user_id


def test_another_workers_typing_wakes_a_member_waiting_here(make_server) -> None:
    srv = make_server(workers=1)
    room, alice, bob = _room_of_two(srv)

    async def scenario() -> None:
        async with in_process_worker(srv) as w:
            typing = TypingService(w.rooms, w.notifier)
            since = w.notifier.current
            waiting = asyncio.ensure_future(w.notifier.wait_for(bob, since, timeout_s=5))
            await asyncio.sleep(0)
            assert w.rooms.cached(room) is None
            typing.on_bus("typing", {"r": room, "u": {alice: now_ms() + 30_000}, "i": "worker-2"})
            assert await waiting, "bob's long-poll was not woken"
            event = typing.typing_event(room, since.typing, w.notifier.current.typing)
            assert event == {"type": "m.typing", "content": {"user_ids": [alice]}}
            typing.close()

    asyncio.run(scenario())


def test_another_workers_presence_change_wakes_a_room_member_waiting_here(make_server) -> None:
    srv = make_server(workers=1, presence={"enabled": True})
    room, alice, bob = _room_of_two(srv)

    async def scenario() -> None:
        async with in_process_worker(srv) as w:
            presence = PresenceService(enabled=True, rooms=w.rooms, memberships=w.memberships, notifier=w.notifier)
            since = w.notifier.current
            waiting = asyncio.ensure_future(w.notifier.wait_for(bob, since, timeout_s=5))
            await asyncio.sleep(0)
            assert w.rooms.cached(room) is None
            await presence.on_bus("presence", {"u": alice, "p": "unavailable", "a": now_ms()})
            assert await waiting, "bob's long-poll was not woken"
            assert w.rooms.cached(room) is not None

    asyncio.run(scenario())
