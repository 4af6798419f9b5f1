"""An initial /sync over many rooms straight after a restart (cold caches).

Such a sync reads the rooms' snapshots, receipts, unread counts and the user's
membership histories a few transactions at a time, works out the state before each
timeline from memory (undoing the newer state events), and asks the database for
bundled aggregations only when an event in memory relates to the timeline. These
tests check that it answers exactly what the same server answers with warm caches,
and that the in-memory shortcuts agree with the database on real rooms.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import uuid
from collections.abc import AsyncIterator
from typing import Any

from bastion.app import open_migrated_database
from bastion.services import caches
from bastion.services.caches import EventCache, RoomCache
from bastion.settings import load_settings
from bastion.storage import events as events_store
from bastion.storage import relations as relations_store
from bastion.storage.database import Txn
from tests.harness import MatrixHttp, ServerProcess

FILTERS = {
    "default": None,
    "short timelines": json.dumps({"room": {"timeline": {"limit": 3}}}),
    "lazy members": json.dumps({"room": {"timeline": {"limit": 4}, "state": {"lazy_load_members": True}}}),
}


def _put_state(client: MatrixHttp, room: str, event_type: str, content: dict[str, Any], key: str = "") -> str:
    return client.call("PUT", f"/_matrix/client/v3/rooms/{room}/state/{event_type}/{key}", content)["event_id"]


def _redact(client: MatrixHttp, room: str, event_id: str) -> None:
    client.call("PUT", f"/_matrix/client/v3/rooms/{room}/redact/{event_id}/{uuid.uuid4().hex}", {"reason": "test"})


def _build_rooms(alice: MatrixHttp, bob: MatrixHttp, carol: MatrixHttp) -> dict[str, str]:
    """Rooms that exercise every shortcut; bob is the user who syncs."""
    rooms: dict[str, str] = {}

    # Invited, then joined (his join replaces the invite); renamed and re-topiced at the end,
    # so the state before a short timeline differs from the current state.
    r = alice.create_room(preset="private_chat", name="first name", topic="first topic", invite=[bob.user_id])
    bob.join(r)
    for i in range(12):
        alice.send(r, f"chatter {i}")
    _put_state(alice, r, "m.room.name", {"name": "second name"})
    alice.send(r, "after rename")
    _put_state(alice, r, "m.room.topic", {"topic": "second topic"})
    _put_state(alice, r, "m.room.name", {"name": "third name"})
    rooms["renamed"] = r

    # An edit, a thread and a reference near the end: bundled aggregations in limited timelines.
    r = alice.create_room(preset="public_chat", name="relations")
    bob.join(r)
    for i in range(8):
        alice.send(r, f"filler {i}")
    root = alice.send(r, "thread root and edit target")
    alice.send(r, {"msgtype": "m.text", "body": "in thread", "m.relates_to": {"rel_type": "m.thread", "event_id": root}})
    alice.send(
        r,
        {
            "msgtype": "m.text",
            "body": "* edited",
            "m.new_content": {"msgtype": "m.text", "body": "edited"},
            "m.relates_to": {"rel_type": "m.replace", "event_id": root},
        },
    )
    alice.send(r, {"msgtype": "m.text", "body": "see above", "m.relates_to": {"rel_type": "m.reference", "event_id": root}})
    alice.send(r, "last word")
    rooms["relations"] = r

    # A redacted edit: memory cannot tell a redacted child from no child, the database can.
    r = alice.create_room(preset="public_chat", name="redacted edit")
    bob.join(r)
    target = alice.send(r, "original")
    edit = alice.send(
        r,
        {
            "msgtype": "m.text",
            "body": "* changed",
            "m.new_content": {"msgtype": "m.text", "body": "changed"},
            "m.relates_to": {"rel_type": "m.replace", "event_id": target},
        },
    )
    _redact(alice, r, edit)
    for i in range(4):
        alice.send(r, f"more {i}")
    rooms["redacted edit"] = r

    # history_visibility "joined": what was said before bob joined stays hidden; mentions
    # of bob after he joined count as highlights.
    r = alice.create_room(preset="public_chat", name="joined only")
    _put_state(alice, r, "m.room.history_visibility", {"history_visibility": "joined"})
    for i in range(5):
        alice.send(r, f"before bob {i}")
    bob.join(r)
    carol.join(r)
    alice.send(r, {"msgtype": "m.text", "body": "hello bob", "m.mentions": {"user_ids": [bob.user_id]}})
    carol.send(r, "hi all")
    rooms["joined only"] = r

    # More than the 50 events a room keeps in memory, with read receipts: the database path.
    r = alice.create_room(preset="public_chat", name="long")
    bob.join(r)
    carol.join(r)
    for i in range(60):
        (alice if i % 3 else carol).send(r, f"long {i}")
        if i == 30:
            _put_state(alice, r, "m.room.topic", {"topic": "halfway"})
    read_up_to = alice.send(r, "read up to here")
    bob.call("POST", f"/_matrix/client/v3/rooms/{r}/receipt/m.read/{read_up_to}", {})
    for i in range(3):
        alice.send(r, f"unread {i}")
    carol.call("POST", f"/_matrix/client/v3/rooms/{r}/leave", {})
    rooms["long"] = r

    # bob's own message after others' marks the room read for him.
    r = alice.create_room(preset="public_chat", name="own message")
    bob.join(r)
    alice.send(r, "question?")
    bob.send(r, "answer")
    rooms["own message"] = r
    return rooms


def _normalised(value: Any) -> Any:
    """The response without what changes with the clock (ages, the next_batch token)."""
    if isinstance(value, dict):
        return {k: _normalised(v) for k, v in value.items() if k not in ("age", "next_batch")}
    if isinstance(value, list):
        return [_normalised(v) for v in value]
    return value


def _room_sections(sync: dict[str, Any], rooms: dict[str, str]) -> dict[str, Any]:
    joined = sync["rooms"]["join"]
    out = {}
    for name, room_id in rooms.items():
        section = _normalised(joined[room_id])
        # State is a set: its order carries no meaning.
        section["state"]["events"].sort(key=lambda e: (e["type"], e["state_key"]))
        out[name] = section
    return out


def test_initial_sync_after_a_restart_matches_the_warm_one(make_server) -> None:
    srv: ServerProcess = make_server()
    alice, bob, carol = (srv.client().register() for _ in range(3))
    rooms = _build_rooms(alice, bob, carol)

    warm: dict[str, dict[str, Any]] = {}
    for name, flt in FILTERS.items():
        params = {"filter": flt} if flt else {}
        bob.sync(**params)  # fills the caches
        warm[name] = _room_sections(bob.sync(**params), rooms)
    for name, flt in FILTERS.items():
        srv.restart()  # every cache empty
        cold = _room_sections(bob.sync(**({"filter": flt} if flt else {})), rooms)
        for room_name in rooms:
            assert cold[room_name] == warm[name][room_name], f"{name}: room {room_name!r} differs after a restart"

    # The rooms do exercise what the shortcuts replace.
    short = warm["short timelines"]
    names = [e["content"].get("name") for e in short["renamed"]["state"]["events"] if e["type"] == "m.room.name"]
    assert names == ["second name"]  # the state before the timeline, not the current state
    default = warm["default"]
    assert default["relations"]["timeline"]["limited"] is True
    root = next(e for e in default["relations"]["timeline"]["events"] if e["content"].get("body") == "thread root and edit target")
    relations = root["unsigned"]["m.relations"]
    assert relations["m.thread"]["count"] == 1
    assert relations["m.replace"]["content"]["m.new_content"]["body"] == "edited"
    assert relations["m.reference"]["chunk"]
    redacted_target = next(
        e for e in default["redacted edit"]["timeline"]["events"] if e["content"].get("body") == "original"
    )
    assert "m.replace" not in redacted_target.get("unsigned", {}).get("m.relations", {})
    bodies = [e["content"].get("body") for e in default["joined only"]["timeline"]["events"]]
    assert not any(b and b.startswith("before bob") for b in bodies)
    assert default["joined only"]["unread_notifications"] == {"notification_count": 2, "highlight_count": 1}
    assert default["long"]["unread_notifications"]["notification_count"] == 3
    assert default["long"]["timeline"]["limited"] is True
    assert default["own message"]["unread_notifications"]["notification_count"] == 0


def test_in_memory_state_and_relations_agree_with_the_database(make_server) -> None:
    """For every position in real rooms: the state worked out by undoing newer state events
    is the state the database reports, and "no child in memory" is never wrong."""
    srv: ServerProcess = make_server()
    alice, bob, carol = (srv.client().register() for _ in range(3))
    rooms = _build_rooms(alice, bob, carol)
    srv.stop()

    async def check() -> None:
        db = open_migrated_database(load_settings(srv.config_path))
        try:
            cache = RoomCache(db, EventCache(db))
            snapshots = await cache.get_many(rooms.values())
            assert set(snapshots) == set(rooms.values())
            rolled_back = fell_back = 0
            for name, room_id in rooms.items():
                snap = snapshots[room_id]
                history = await db.read(
                    events_store.get_room_events, room_id, limit=1000, backwards=False
                )
                first = history[0].stream_ordering
                for position in range(first - 1, snap.last_stream + 1):
                    expected = await db.read(events_store.get_state_ids_at, room_id, position, None)
                    rolled = snap.state_rollback(position)
                    if rolled is None:
                        assert position < snap.recent_floor
                        fell_back += 1
                        continue
                    state, fetch = rolled
                    got = {k: e.event_id for k, e in state.items()} | fetch
                    assert got == expected, f"{name}: state at {position}"
                    # Only some keys (what lazy-loading asks for), one of them absent then.
                    keys = {("m.room.name", ""), ("m.room.member", bob.user_id), ("m.room.member", "@nobody:x")}
                    state, fetch = snap.state_rollback(position, keys) or ({}, {})
                    got = {k: e.event_id for k, e in state.items()} | fetch
                    assert got == {k: v for k, v in expected.items() if k in keys}, f"{name}: keys at {position}"
                    rolled_back += 1
                non_state = [e for e in snap.recent if e.state_key is None]
                for start in range(len(non_state)):
                    parents = non_state[start:]
                    if not snap.may_have_children(parents):
                        children = await db.read(
                            relations_store.children_of, room_id, [e.event_id for e in parents]
                        )
                        assert children == [], f"{name}: children missed for {parents[0]}"
            assert rolled_back > 100 and fell_back > 0
        finally:
            await db.close()

    asyncio.run(check())


def test_loading_many_rooms_takes_a_few_statements_not_a_few_per_room(make_server, test_database, monkeypatch) -> None:
    """A cold initial sync loads its rooms' snapshots in batches. On PostgreSQL every
    statement is a network round trip, so a batch of rooms must take about as many
    statements as its costliest room alone (keys for decryption included), not a few more
    per room: at most two more, for reads only some rooms need (state older than the
    newest events, redaction events), which a batch makes once for all of its rooms.
    SQLite runs in-process and may spend one statement per room on the newest events."""
    srv: ServerProcess = make_server()
    alice, bob, carol = (srv.client().register() for _ in range(3))
    rooms = list(_build_rooms(alice, bob, carol).values())
    srv.stop()
    counted: list[str] = []
    for method in ("execute", "fetchone", "fetchall", "fetchval"):
        original = getattr(Txn, method)

        def counting(self: Txn, sql: str, params: Any = (), _original: Any = original) -> Any:
            counted.append(sql)
            return _original(self, sql, params)

        monkeypatch.setattr(Txn, method, counting)

    async def statements_to_load(room_ids: list[str]) -> int:
        db = open_migrated_database(load_settings(srv.config_path))  # fresh caches and keyring
        try:
            cache = RoomCache(db, EventCache(db))
            counted.clear()
            snapshots = await cache.get_many(room_ids)
            assert set(snapshots) == set(room_ids)
            assert all(snap.recent and snap.state for snap in snapshots.values())
            return len(counted)
        finally:
            await db.close()

    assert len(rooms) >= 5
    costliest = max(asyncio.run(statements_to_load([room])) for room in rooms)
    every = asyncio.run(statements_to_load(rooms))
    per_room = 0 if test_database.is_postgres else 1
    assert every <= costliest + 2 + per_room * (len(rooms) - 1), (
        f"{every} statements for {len(rooms)} rooms; the costliest room alone takes {costliest}"
    )


def test_concurrent_cold_loads_of_the_same_rooms_share_one_load(make_server) -> None:
    """Several requests that need the same cold rooms at once (initial syncs of members of
    one room after a restart) get the same snapshots, each room read once, and no error:
    a request that finds a room being loaded waits for that load instead of starting a
    second one."""
    srv: ServerProcess = make_server()
    alice, bob, carol = (srv.client().register() for _ in range(3))
    rooms = list(_build_rooms(alice, bob, carol).values())
    srv.stop()

    async def check() -> None:
        db = open_migrated_database(load_settings(srv.config_path))
        try:
            cache = RoomCache(db, EventCache(db))
            orders = [rooms, rooms[::-1], rooms[1:3], rooms[2:], rooms[:1] + rooms[-1:]]
            results = await asyncio.gather(*(cache.get_many(order) for order in orders))
            for order, found in zip(orders, results, strict=True):
                assert set(found) == set(order)
                for room_id, snap in found.items():
                    assert snap is results[0][room_id]  # one snapshot per room, shared
        finally:
            await db.close()

    asyncio.run(check())


def _rooms_loaded_one_at_a_time(make_server, monkeypatch) -> tuple[ServerProcess, list[str]]:
    """A stopped server's rooms, for a RoomCache of the test's own that loads them one
    room per batch, one batch at a time (so a load can be caught half-way)."""
    srv: ServerProcess = make_server()
    alice, bob, carol = (srv.client().register() for _ in range(3))
    rooms = list(_build_rooms(alice, bob, carol).values())
    srv.stop()
    monkeypatch.setattr(caches, "LOAD_BATCH", 1)
    monkeypatch.setattr(caches, "LOAD_PARALLEL", {"sqlite": 1, "postgres": 1})
    return srv, rooms


@contextlib.asynccontextmanager
async def _load_under_way(srv: ServerProcess, rooms: list[str]) -> AsyncIterator[tuple[RoomCache, asyncio.Future[Any]]]:
    """A RoomCache on the stopped server's database, and a ``get_many(rooms)`` that has
    marked every room as loading and is reading the first."""
    db = open_migrated_database(load_settings(srv.config_path))
    try:
        cache = RoomCache(db, EventCache(db))
        first = asyncio.ensure_future(cache.get_many(rooms))
        while not cache._loading:
            await asyncio.sleep(0)
        yield cache, first
    finally:
        await db.close()


async def _cancelled(task: asyncio.Future[Any]) -> None:
    task.cancel()
    try:
        await task
    except asyncio.CancelledError:
        pass


def test_a_cancelled_cold_load_leaves_no_room_marked_as_loading(make_server, monkeypatch) -> None:
    """A request cancelled (its client hung up) while its rooms are loading, some batches
    not even started, must not leave those rooms marked as loading: the next request for
    them would wait forever."""
    srv, rooms = _rooms_loaded_one_at_a_time(make_server, monkeypatch)

    async def check() -> None:
        async with _load_under_way(srv, rooms) as (cache, first):
            await _cancelled(first)
            assert cache._loading == {}
            found = await asyncio.wait_for(cache.get_many(rooms), timeout=30)
            assert set(found) == set(rooms)

    asyncio.run(check())


def test_a_request_waiting_for_a_cancelled_load_loads_the_rooms_itself(make_server, monkeypatch) -> None:
    """Two requests need the same cold rooms; the one that started loading them is
    cancelled (its client hung up). The other one waited for that load: it must still
    get every room, not fail because someone else's client went away."""
    srv, rooms = _rooms_loaded_one_at_a_time(make_server, monkeypatch)

    async def check() -> None:
        async with _load_under_way(srv, rooms) as (cache, first):
            second = asyncio.ensure_future(cache.get_many(rooms))
            for _ in range(3):
                await asyncio.sleep(0)
            assert not second.done()  # it waits for the first one's loads
            await _cancelled(first)
            found = await asyncio.wait_for(second, timeout=30)
            assert set(found) == set(rooms)
            assert all(found[room_id] is cache.cached(room_id) for room_id in rooms)
            assert cache._loading == {}

    asyncio.run(check())
