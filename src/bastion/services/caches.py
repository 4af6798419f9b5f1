"""In-memory views of rooms and memberships that the hot paths read instead of SQL.

* :class:`EventCache` — recently used events by ID. Every Event object handed out
  goes through it, so one room event has one Python object, and a redaction that
  prunes it is seen everywhere at once.
* :class:`RoomSnapshot` — one room's current state, its newest events and its
  history-visibility changes, with the lock that serialises event creation in the
  room (the room's history is linear, so the lock is what keeps it so).
* :class:`MembershipIndex` — per user, the rooms they are in and since when.

All three are updated only after the database commit (by
:class:`~bastion.services.persister.EventPersister`); each can be dropped and
reloaded from the database at any time.
"""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict, deque
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from bastion.core.events import Event, StateKey, thread_root
from bastion.core.room_versions import KNOWN_ROOM_VERSIONS, RoomVersion
from bastion.core.visibility import normalise_visibility
from bastion.storage import events as events_store
from bastion.storage import rooms as rooms_store
from bastion.storage.database import Database, Txn
from bastion.streams.notifier import Notifier

log = logging.getLogger(__name__)

RECENT_EVENTS_PER_ROOM = 50
# Rooms loaded per database transaction when many are needed at once (an initial /sync).
LOAD_BATCH = 100
# Batches read side by side, a database connection each. On PostgreSQL one batch's
# statements wait on the database while another's rows are decoded (measured: a cold
# initial sync of 200 rooms ~10% faster with 2 than with 1); on SQLite, which waits on
# nothing, two reader threads only take turns at the GIL (measured no faster).
LOAD_PARALLEL = {"postgres": 2, "sqlite": 1}


class EventCache:
    def __init__(self, db: Database, max_size: int = 50_000) -> None:
        self._db = db
        self._max = max_size
        self._events: OrderedDict[str, Event] = OrderedDict()
        # Redactions applied so far, and the events each changed (its target and the
        # events whose prev_content copied the target): a load that read one of them
        # before the redaction was committed must read it again, not cache it.
        self.redactions = 0
        self._redacted: deque[tuple[int, frozenset[str]]] = deque(maxlen=1000)

    def get_cached(self, event_id: str) -> Event | None:
        event = self._events.get(event_id)
        if event is not None:
            self._events.move_to_end(event_id)
        return event

    def put(self, event: Event) -> Event:
        """Insert ``event`` unless an object for it exists; returns the canonical object."""
        existing = self._events.get(event.event_id)
        if existing is not None:
            self._events.move_to_end(event.event_id)
            return existing
        self._events[event.event_id] = event
        if len(self._events) > self._max:
            self._events.popitem(last=False)
        return event

    def note_redaction(self, changed: Iterable[str]) -> None:
        """A committed redaction changed these events (target, prev_content copies)."""
        self.redactions += 1
        self._redacted.append((self.redactions, frozenset(changed)))

    def redacted_since(self, seen: int, event_ids: Iterable[str]) -> bool:
        """Whether a redaction noted after number ``seen`` changed one of ``event_ids``."""
        if seen == self.redactions:
            return False
        if not self._redacted or self._redacted[0][0] > seen + 1:
            return True  # the log no longer reaches back that far: assume so
        wanted = set(event_ids)
        for number, changed in reversed(self._redacted):
            if number <= seen:
                break
            if not changed.isdisjoint(wanted):
                return True
        return False

    def drop_room(self, room_id: str) -> None:
        for event_id in [e.event_id for e in self._events.values() if e.room_id == room_id]:
            del self._events[event_id]

    def canonical(self, events: Iterable[Event]) -> list[Event]:
        return [self.put(e) for e in events]

    async def get_many(self, event_ids: Iterable[str], strict: bool = False) -> dict[str, Event]:
        """Events by ID. Damaged messages are left out unless ``strict`` (then: IntegrityError)."""
        found: dict[str, Event] = {}
        missing: list[str] = []
        for eid in event_ids:
            event = self.get_cached(eid)
            if event is not None:
                found[eid] = event
            else:
                missing.append(eid)
        if missing:
            while True:
                seen = self.redactions
                loaded = await self._db.read(events_store.get_events, missing, strict)
                if not self.redacted_since(seen, loaded):
                    break
            for eid, event in loaded.items():
                found[eid] = self.put(event)
        return found

    async def get(self, event_id: str) -> Event | None:
        return (await self.get_many([event_id], strict=True)).get(event_id)


class RoomSnapshot:
    """The live view of one room. Mutated only by the persister, under ``lock``."""

    def __init__(
        self,
        room_id: str,
        version: RoomVersion,
        state: dict[StateKey, Event],
        latest_event_id: str | None,
        depth: int,
        last_stream: int,
        recent: list[Event],
        recent_floor: int,
        visibility: list[tuple[int, str]],
        last_event_by: dict[str, int] | None = None,
    ) -> None:
        self.room_id = room_id
        self.version = version
        self.state = state
        self.latest_event_id = latest_event_id
        self.depth = depth
        self.last_stream = last_stream
        self.recent: deque[Event] = deque(recent, maxlen=RECENT_EVENTS_PER_ROOM)
        self.recent_floor = recent_floor
        self.visibility = visibility
        self.lock = asyncio.Lock()
        # Set when this view was retired after an error; holders must reload the room.
        self.stale = False
        # Newest stream position of each sender's events outside threads: a user's own
        # message marks the main timeline read up to it (until read receipts say more).
        self.last_event_by: dict[str, int] = dict(last_event_by or {})
        # sender -> {thread root: their newest post in that thread}, for the events in
        # memory (the recent window at load, then every event applied): a post in a
        # thread marks that thread read up to it. If a sender's newest post in a thread
        # is in memory, it is here; older ones are looked up when a count needs them.
        self.thread_posts: dict[str, dict[str, int]] = {}
        for event in self.recent:
            root = thread_root(event)
            if root is not None:
                self.thread_posts.setdefault(event.sender, {})[root] = event.stream_ordering
        self.joined: set[str] = set()
        self.invited: set[str] = set()
        # (stream, user, membership) of every member event, oldest first; built when a
        # /sync summary first needs heroes, dropped when membership changes.
        self._members_by_age: list[tuple[int, str, str | None]] | None = None
        self._recount()

    def _recount(self) -> None:
        self.joined = {k[1] for k, e in self.state.items() if k[0] == "m.room.member" and e.membership == "join"}
        self.invited = {k[1] for k, e in self.state.items() if k[0] == "m.room.member" and e.membership == "invite"}

    def members_by_age(self) -> list[tuple[int, str, str | None]]:
        """(stream ordering, user, membership) of each member event, oldest first."""
        if self._members_by_age is None:
            self._members_by_age = sorted(
                (e.stream_ordering, k[1], e.membership) for k, e in self.state.items() if k[0] == "m.room.member"
            )
        return self._members_by_age

    def membership_of(self, user_id: str) -> str:
        event = self.state.get(("m.room.member", user_id))
        return (event.membership or "leave") if event is not None else "leave"

    def apply(self, event: Event) -> None:
        """Record a newly persisted event."""
        self.latest_event_id = event.event_id
        self.depth = max(self.depth, event.depth)
        self.last_stream = event.stream_ordering
        root = thread_root(event)
        if root is None:
            self.last_event_by[event.sender] = event.stream_ordering
        else:
            self.thread_posts.setdefault(event.sender, {})[root] = event.stream_ordering
        if len(self.recent) == self.recent.maxlen:
            self.recent_floor = self.recent[0].stream_ordering
        self.recent.append(event)
        if event.state_key is not None:
            self.state[(event.type, event.state_key)] = event
            if event.type == "m.room.member":
                self._members_by_age = None
                user = event.state_key
                self.joined.discard(user)
                self.invited.discard(user)
                if event.membership == "join":
                    self.joined.add(user)
                elif event.membership == "invite":
                    self.invited.add(user)
            elif event.type == "m.room.history_visibility" and event.state_key == "":
                self.visibility.append(
                    (event.stream_ordering, normalise_visibility(event.content.get("history_visibility")))
                )

    def events_after(self, position: int, upto: int) -> list[Event] | None:
        """Events with position < stream <= upto from memory, or None if not all are cached."""
        if position < self.recent_floor:
            return None
        # Newest first and stop early: a /sync usually asks for the last few events.
        found: list[Event] = []
        for event in reversed(self.recent):
            stream = event.stream_ordering
            if stream <= position:
                break
            if stream <= upto:
                found.append(event)
        found.reverse()
        return found

    def latest_events(self, limit: int, upto: int) -> list[Event] | None:
        """The newest ``limit`` events at or before ``upto`` if memory holds them all."""
        found: list[Event] = []
        for event in reversed(self.recent):
            if event.stream_ordering <= upto:
                found.append(event)
                if len(found) == limit:
                    break
        found.reverse()
        if len(found) >= limit:
            return found
        return found if self.recent_floor == 0 else None

    def state_rollback(
        self, position: int, keys: set[StateKey] | None = None
    ) -> tuple[dict[StateKey, Event], dict[StateKey, str]] | None:
        """The state after every event at or before ``position`` (only ``keys``, if given),
        worked out from memory.

        A room's history is linear, so each state event newer than ``position`` replaced
        exactly the entry its ``replaces_state`` names (or added its key). Undoing them,
        newest first, gives the older state. Returns the state whose events memory holds
        and, apart, the keys whose older event must be fetched by ID; None when the
        events after ``position`` are not all in memory.
        """
        undone: dict[StateKey, str | None] = {}  # key -> the event it had at ``position``
        if position < self.last_stream:
            if position < self.recent_floor:
                return None
            for event in reversed(self.recent):
                if event.stream_ordering <= position:
                    break
                if event.state_key is not None:
                    key = (event.type, event.state_key)
                    if keys is None or key in keys:
                        undone[key] = event.replaces_state  # the oldest such event decides
        current = self.state
        wanted = current.keys() if keys is None else keys
        state = {k: current[k] for k in wanted if k in current and k not in undone}
        fetch = {k: eid for k, eid in undone.items() if eid is not None}
        return state, fetch

    def may_have_children(self, events: Iterable[Event]) -> bool:
        """False only when no event in the room relates to any of ``events`` (for
        bundled aggregations). A child always comes after its parent, so when every
        parent is in the recent window, so is every child. (A redacted child relates to
        nothing any more, in memory and in the database alike.)"""
        ids = set()
        oldest = None
        for event in events:
            if event.stream_ordering <= self.recent_floor:
                return True
            ids.add(event.event_id)
            oldest = event.stream_ordering if oldest is None else min(oldest, event.stream_ordering)
        if oldest is None:
            return False
        for event in reversed(self.recent):
            if event.stream_ordering <= oldest:
                break
            relates = event.content.get("m.relates_to")
            # Content is the sender's: ``event_id`` may be any JSON value, and only a
            # string names a parent (a list or object is not even hashable).
            if isinstance(relates, dict) and isinstance(target := relates.get("event_id"), str) and target in ids:
                return True
        return False

    def power_levels_content(self) -> dict[str, Any]:
        event = self.state.get(("m.room.power_levels", ""))
        return event.content if event is not None else {}


def _load_rooms_txn(txn: Txn, room_ids: list[str]) -> dict[str, tuple[Any, ...] | None]:
    """Several rooms in one transaction and a handful of statements in all (not several
    per room: on PostgreSQL each statement is a round trip)."""
    rooms = rooms_store.get_rooms(txn, room_ids)
    found = list(rooms)
    state_ids = events_store.get_current_state_ids_many(txn, found)
    newest = events_store.newest_events_many(txn, found, RECENT_EVENTS_PER_ROOM)
    # State events among the recent ones are not read (and decrypted) a second time.
    state_events = {e.event_id: e for recent, _ in newest.values() for e in recent if e.state_key is not None}
    missing = [eid for ids in state_ids.values() for eid in ids.values() if eid not in state_events]
    if missing:
        state_events.update(events_store.get_events(txn, missing))
    visibility = events_store.get_visibility_histories(txn, found)
    last_by = events_store.last_event_by_sender_many(txn, found)
    out: dict[str, tuple[Any, ...] | None] = dict.fromkeys(room_ids)
    for room_id, room in rooms.items():
        recent, latest = newest.get(room_id, ([], None))
        out[room_id] = (
            room,
            state_ids.get(room_id, {}),
            state_events,
            latest,
            recent,
            visibility[room_id],
            last_by.get(room_id, {}),
        )
    return out


def _loaded_event_ids(loaded: dict[str, tuple[Any, ...] | None]) -> Iterable[str]:
    for room in loaded.values():
        if room is not None:
            _, state_ids, _, _, recent, _, _ = room
            yield from state_ids.values()
            for event in recent:
                yield event.event_id


class RoomCache:
    """Loads :class:`RoomSnapshot` objects on first use and keeps the most recent ones."""

    def __init__(self, db: Database, event_cache: EventCache, max_rooms: int = 5000) -> None:
        self._db = db
        self._events = event_cache
        self._max = max_rooms
        self._rooms: OrderedDict[str, RoomSnapshot] = OrderedDict()
        self._loading: dict[str, asyncio.Future[RoomSnapshot | None]] = {}
        # room being loaded -> other workers' events for it applied meanwhile
        self._arrived: dict[str, list[Event]] = {}

    def cached(self, room_id: str) -> RoomSnapshot | None:
        return self._rooms.get(room_id)

    def add(self, snapshot: RoomSnapshot) -> None:
        self._rooms[snapshot.room_id] = snapshot
        self._evict()

    def discard(self, room_id: str) -> None:
        self._rooms.pop(room_id, None)

    def note_remote(self, event: Event) -> None:
        """Another worker's event, for a room not in memory. If the room is being loaded,
        the load may have read the database before the event was committed: it applies
        the event when it installs the room (unless its snapshot already has it)."""
        arrived = self._arrived.get(event.room_id)
        if arrived is not None:
            arrived.append(event)

    def _evict(self) -> None:
        while len(self._rooms) > self._max:
            for room_id, snap in self._rooms.items():
                if not snap.lock.locked():
                    del self._rooms[room_id]
                    break
            else:  # every room busy: keep them all for now
                return

    async def get(self, room_id: str) -> RoomSnapshot | None:
        snap = self._rooms.get(room_id)
        if snap is not None:
            self._rooms.move_to_end(room_id)
            return snap
        return (await self.get_many([room_id])).get(room_id)

    async def get_many(self, room_ids: Iterable[str]) -> dict[str, RoomSnapshot]:
        """Snapshots of the rooms that exist among ``room_ids``; the ones not in memory are
        loaded together, ``LOAD_BATCH`` rooms per database transaction."""
        found: dict[str, RoomSnapshot] = {}
        waiting: dict[str, asyncio.Future[RoomSnapshot | None]] = {}
        to_load: list[str] = []
        for room_id in dict.fromkeys(room_ids):
            snap = self._rooms.get(room_id)
            if snap is not None:
                self._rooms.move_to_end(room_id)
                found[room_id] = snap
            elif room_id in self._loading:
                waiting[room_id] = self._loading[room_id]
            else:
                to_load.append(room_id)
        # Every room this call will load is marked as loading before the first await, so a
        # concurrent call waits for it instead of loading it a second time.
        loop = asyncio.get_running_loop()
        futures = {room_id: loop.create_future() for room_id in to_load}
        self._loading.update(futures)
        for room_id in to_load:
            self._arrived[room_id] = []
        gate = asyncio.Semaphore(LOAD_PARALLEL[self._db.dialect])

        async def load(batch: list[str]) -> None:
            try:
                async with gate:
                    while True:
                        seen = self._events.redactions
                        loaded = await self._db.read(_load_rooms_txn, batch)
                        if not self._events.redacted_since(seen, _loaded_event_ids(loaded)):
                            break
                        # An event read was redacted meanwhile: the copy read may predate it.
                for room_id in batch:
                    snap = self._snapshot(room_id, loaded[room_id])
                    futures[room_id].set_result(snap)
                    if snap is not None:
                        found[room_id] = snap
            except BaseException as exc:
                for room_id in batch:
                    fut = futures[room_id]
                    if fut.done():
                        continue
                    if isinstance(exc, asyncio.CancelledError):
                        fut.cancel()  # not a failure of the load: its waiters load the room themselves
                    else:
                        fut.set_exception(exc)
                        fut.exception()  # mark retrieved
                raise
            finally:
                release(batch)

        def release(room_ids: list[str]) -> None:
            for room_id in room_ids:
                if self._loading.get(room_id) is futures[room_id]:
                    del self._loading[room_id]
                    del self._arrived[room_id]

        batches = [to_load[i : i + LOAD_BATCH] for i in range(0, len(to_load), LOAD_BATCH)]
        try:
            outcomes = await asyncio.gather(*(load(batch) for batch in batches), return_exceptions=True)
        finally:
            # A load that never started (this call was cancelled first) ran no code of its
            # own: its rooms are released here, and cancelled for whoever waits for them,
            # as when a started load is.
            for fut in futures.values():
                fut.cancel()  # no effect on a finished one
            release(to_load)
        for outcome in outcomes:
            if isinstance(outcome, BaseException):
                raise outcome
        orphaned: list[str] = []
        for room_id, pending in waiting.items():
            try:
                snap = await asyncio.shield(pending)
            except asyncio.CancelledError:
                task = asyncio.current_task()
                if not pending.cancelled() or (task is not None and task.cancelling()):
                    raise  # this request itself was cancelled
                # The request loading the room was cancelled (its client hung up): that is
                # no reason to fail this one, which loads the room itself.
                orphaned.append(room_id)
                continue
            if snap is not None:
                found[room_id] = snap
        if orphaned:
            found.update(await self.get_many(orphaned))
        return found

    def _snapshot(self, room_id: str, loaded: tuple[Any, ...] | None) -> RoomSnapshot | None:
        if loaded is None:
            return None
        existing = self._rooms.get(room_id)
        if existing is not None:  # created meanwhile (e.g. by createRoom)
            return existing
        room, state_ids, state_events, latest, recent, visibility, last_by = loaded
        version = KNOWN_ROOM_VERSIONS[room.room_version]
        recent_events = self._events.canonical(recent)
        state = {key: self._events.put(state_events[eid]) for key, eid in state_ids.items() if eid in state_events}
        floor = 0 if len(recent_events) < RECENT_EVENTS_PER_ROOM else recent_events[0].stream_ordering - 1
        snap = RoomSnapshot(
            room_id,
            version,
            state,
            latest[0] if latest else None,
            latest[1] if latest else 0,
            latest[2] if latest else 0,
            recent_events,
            floor,
            [(pos, normalise_visibility(v)) for pos, v in visibility],
            last_by,
        )
        for event in self._arrived.get(room_id, ()):
            if event.stream_ordering > snap.last_stream:
                snap.apply(event)
        self.add(snap)
        return snap


async def wake_members(rooms: RoomCache, notifier: Notifier, room_ids: Iterable[str], also: Iterable[str] = ()) -> None:
    """Wake the joined members of ``room_ids`` (and ``also``) for an ephemeral change
    (typing, presence), loading the rooms not in memory to learn who they are. If that
    fails, long-polls from before now compute before they wait (Notifier.nothing_since)
    instead of trusting they were woken."""
    users = set(also)
    uncached: list[str] = []
    for room_id in room_ids:
        room = rooms.cached(room_id)
        if room is not None:
            users |= room.joined
        else:
            uncached.append(room_id)
    if uncached:
        try:
            for room in (await rooms.get_many(uncached)).values():
                users |= room.joined
        except Exception as exc:
            log.warning("could not load %d room(s) to wake their members: %s", len(uncached), exc)
            notifier.lost_track()
    notifier.notify_users(users)


@dataclass(slots=True)
class Membership:
    membership: str
    stream_ordering: int
    event_id: str
    forgotten: bool = False


class MembershipIndex:
    """Per user: room ID -> current membership. Loaded lazily, updated after commits."""

    def __init__(self, db: Database, max_users: int = 100_000) -> None:
        self._db = db
        self._max = max_users
        self._users: OrderedDict[str, dict[str, Membership]] = OrderedDict()
        self._loading: dict[str, list[tuple[str, Membership]]] = {}
        self._load_futures: dict[str, asyncio.Future[dict[str, Membership]]] = {}

    async def rooms_for(self, user_id: str) -> dict[str, Membership]:
        rooms = self._users.get(user_id)
        if rooms is not None:
            self._users.move_to_end(user_id)
            return rooms
        pending = self._load_futures.get(user_id)
        if pending is not None:
            return await asyncio.shield(pending)
        fut: asyncio.Future[dict[str, Membership]] = asyncio.get_running_loop().create_future()
        self._load_futures[user_id] = fut
        self._loading[user_id] = []
        try:
            rows = await self._db.read(rooms_store.get_user_memberships, user_id)
            rooms = {r.room_id: Membership(r.membership, r.stream_ordering, r.event_id, r.forgotten) for r in rows}
            for room_id, update in self._loading.pop(user_id, []):
                current = rooms.get(room_id)
                if current is None or update.stream_ordering >= current.stream_ordering:
                    rooms[room_id] = update
            self._users[user_id] = rooms
            while len(self._users) > self._max:
                self._users.popitem(last=False)
            fut.set_result(rooms)
            return rooms
        except BaseException as exc:
            self._loading.pop(user_id, None)
            fut.set_exception(exc)
            fut.exception()
            raise
        finally:
            del self._load_futures[user_id]

    def apply(self, user_id: str, room_id: str, membership: str, stream_ordering: int, event_id: str) -> None:
        update = Membership(membership, stream_ordering, event_id)
        rooms = self._users.get(user_id)
        if rooms is not None:
            rooms[room_id] = update
        elif user_id in self._loading:
            self._loading[user_id].append((room_id, update))

    def set_forgotten(self, user_id: str, room_id: str) -> None:
        rooms = self._users.get(user_id)
        if rooms is not None and room_id in rooms:
            rooms[room_id].forgotten = True

    def drop(self, user_id: str) -> None:
        self._users.pop(user_id, None)

    def drop_all(self) -> None:
        self._users.clear()
