"""A worker's in-memory view of a room (and of single events) must not miss, or repeat,
what another worker committed while the view was being loaded from the database.

One real server writes (it plays "the other worker"); the test builds a second
worker's caches on the same database (:mod:`tests.inprocess`), holds its first read
after the query ran, applies the server's new rows through
``EventPersister.apply_remote`` — the path replication takes — and checks what the
caches then serve.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from tests.harness import MatrixHttp, ServerProcess, hold_reads
from tests.inprocess import InProcessWorker, in_process_worker


async def _while_held(w: InProcessWorker, load: Callable[[], Any], write: Callable[[], Any]) -> tuple[Any, int]:
    """Start ``load``; once its first read has run, make the server ``write`` and apply
    that write here; then let the load finish. Returns (load's result, new position)."""
    before = await w.position()
    read_done, release = hold_reads(w.db)
    task = asyncio.ensure_future(load())
    await asyncio.wait_for(read_done.wait(), 10)  # else the load read nothing: a test bug
    await asyncio.to_thread(write)
    loaded, upto = await w.committed(before)
    applying = asyncio.ensure_future(w.persister.apply_remote(loaded, upto))
    for _ in range(5):  # it applies the rows, then waits for the held room load (if one)
        await asyncio.sleep(0)
    release.set()
    result = await asyncio.wait_for(task, 10)
    await asyncio.wait_for(applying, 10)
    return result, upto


def _room_with_message(srv: ServerProcess) -> tuple[MatrixHttp, str, str]:
    alice = MatrixHttp(srv.base_url, srv.server_name).register()
    room = alice.create_room(preset="private_chat")
    return alice, room, alice.send(room, "first")


def test_an_event_committed_while_the_room_loads_reaches_the_loaded_room(make_server) -> None:
    srv = make_server(workers=1)
    alice, room, _ = _room_with_message(srv)

    async def scenario() -> None:
        async with in_process_worker(srv) as w:
            before = await w.position()
            sent: list[str] = []
            snap, after = await _while_held(w, lambda: w.rooms.get(room), lambda: sent.append(alice.send(room, "second")))
            assert w.rooms.cached(room) is snap
            assert snap.last_stream == after
            assert [e.event_id for e in snap.events_after(before, after)] == sent
            assert snap.latest_event_id == sent[0]

    asyncio.run(scenario())


def test_an_event_the_loaded_room_already_has_is_not_applied_twice(make_server) -> None:
    srv = make_server(workers=1)
    alice, room, _ = _room_with_message(srv)

    async def scenario() -> None:
        async with in_process_worker(srv) as w:
            before = await w.position()
            second = alice.send(room, "second")
            # This worker loads the room after the commit but before replication applies it.
            snap = await w.rooms.get(room)
            after = await w.apply_committed(before)
            assert [e.event_id for e in snap.events_after(before, after)] == [second]
            assert sum(e.event_id == second for e in snap.recent) == 1

    asyncio.run(scenario())


def test_a_redaction_committed_while_an_event_loads_is_not_undone(make_server) -> None:
    srv = make_server(workers=1)
    alice, room, first = _room_with_message(srv)

    def redact(event_id: str) -> Callable[[], Any]:
        return lambda: alice.call("PUT", f"/_matrix/client/v3/rooms/{room}/redact/{event_id}/t-{event_id[1:9]}", {})

    async def scenario() -> None:
        async with in_process_worker(srv) as w:
            # An event read on its own (EventCache.get)...
            await _while_held(w, lambda: w.events.get(first), redact(first))
            event = await w.events.get(first)
            assert event is not None and event.redacted_because is not None
            assert event.content == {}
            # ...and one read with its room (RoomCache.get), neither in memory here yet.
            w.rooms.discard(room)
            second = alice.send(room, "second")
            assert w.events.get_cached(second) is None
            snap, _ = await _while_held(w, lambda: w.rooms.get(room), redact(second))
            loaded = next(e for e in snap.recent if e.event_id == second)
            assert loaded.content == {} and loaded.redacted_because is not None
            assert w.events.get_cached(second) is loaded

    asyncio.run(scenario())
