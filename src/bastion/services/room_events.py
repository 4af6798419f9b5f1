"""Creating room events: build, authorise, persist — the one path every event takes.

``EventService.send`` builds each event on the room's current head, checks it
against the room version's authorisation rules with the state before it, and hands
the chain to the persister, all under the room's lock. A chain (``createRoom``,
a room upgrade) commits in one transaction or not at all.

Client transaction IDs make sends idempotent per device and endpoint: the mapping is
stored in the same transaction as the event, so a retry after a restart still
returns the first event ID.
"""

from __future__ import annotations

import asyncio
import inspect
import random
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from bastion.clock import now_ms
from bastion.core.auth_rules import check_auth, named_level, select_auth_events, user_power_level
from bastion.core.canonical_json import check_event_values
from bastion.core.events import MAX_TYPE_OR_STATE_KEY_BYTES, Event, StateKey, build_event
from bastion.core.signing import SigningKey
from bastion.errors import AuthError, BadJson, Forbidden, NotFound, StorageUnavailable, TooLarge
from bastion.services.caches import EventCache, RoomCache, RoomSnapshot
from bastion.services.persister import EventPersister, PersistUnit, StaleRoom, TxnKey
from bastion.services.requester import Requester
from bastion.storage import events as events_store
from bastion.storage.database import Database, Txn

RECENT_TXNS = 20_000

Validator = Callable[[Event, dict[StateKey, Event]], Awaitable[None] | None]
# Run for each event once it is built and valid, with the state before it and the users
# joined at that point; a returned callable writes in the event's own transaction (after
# stream orderings are assigned), so what it stores is visible exactly when the event is.
PersistHook = Callable[[Event, Mapping[StateKey, Event], Collection[str]], Awaitable[Callable[[Txn], Any] | None]]


@dataclass
class EventSpec:
    """What a caller wants to send; the service fills in the rest."""

    sender: str
    type: str
    content: dict[str, Any]
    state_key: str | None = None
    redacts: str | None = None
    txn_key: TxnKey | None = None


@dataclass
class _Inflight:
    future: asyncio.Future[str] = field(default_factory=lambda: asyncio.get_running_loop().create_future())


def validate_event_fields(event_type: str, state_key: str | None, content: Any) -> None:
    if not isinstance(content, dict):
        raise BadJson("event content must be a JSON object")
    if len(event_type.encode()) > MAX_TYPE_OR_STATE_KEY_BYTES:
        raise TooLarge("event type is longer than 255 bytes")
    if state_key is not None and len(state_key.encode()) > MAX_TYPE_OR_STATE_KEY_BYTES:
        raise TooLarge("state key is longer than 255 bytes")
    if "\x00" in event_type or (state_key is not None and "\x00" in state_key):
        raise BadJson("event type and state key may not contain NUL characters")
    check_event_values(content)


MAX_STALE_RETRIES = 50


class EventService:
    def __init__(
        self,
        *,
        server_name: str,
        signing_key: SigningKey,
        db: Database,
        rooms: RoomCache,
        events: EventCache,
        persister: EventPersister,
    ) -> None:
        self.server_name = server_name
        self._key = signing_key
        self._db = db
        self.rooms = rooms
        self.events = events
        self.persister = persister
        self.replicator: Any = None  # set by the homeserver; catches up after a StaleRoom
        self._inflight: dict[TxnKey, _Inflight] = {}
        # Transaction IDs answered recently, so quick retries cost nothing; older ones
        # are found by the unique key in the same transaction that stores the event.
        self._recent_txns: OrderedDict[TxnKey, str] = OrderedDict()
        self.validators: list[Validator] = []
        self.persist_hooks: list[PersistHook] = []

    async def get_room(self, room_id: str) -> RoomSnapshot:
        room = await self.rooms.get(room_id)
        if room is None:
            raise Forbidden("You are not a member of this room")
        return room

    # -- building --------------------------------------------------------------------------

    async def send(
        self,
        room: RoomSnapshot,
        specs: Sequence[EventSpec],
        *,
        pre_writes: Sequence[Callable[[Txn], Any]] = (),
        validate: Validator | None = None,
        redaction_targets: dict[int, Event] | None = None,
    ) -> list[Event]:
        async with room.lock:
            return await self.send_locked(room, specs, pre_writes=pre_writes, validate=validate, redaction_targets=redaction_targets)

    async def send_locked(
        self,
        room: RoomSnapshot,
        specs: Sequence[EventSpec],
        *,
        pre_writes: Sequence[Callable[[Txn], Any]] = (),
        validate: Validator | None = None,
        redaction_targets: dict[int, Event] | None = None,
    ) -> list[Event]:
        """Build and persist ``specs`` in order; the caller holds ``room.lock``.

        With several workers, another one may have added to the room since this
        worker's view was current: the commit then refuses (:class:`StaleRoom`), the view
        catches up, and the events are built and authorised again on the new state.
        """
        for attempt in range(MAX_STALE_RETRIES):
            try:
                return await self._send_once(
                    room, specs, pre_writes=pre_writes, validate=validate, redaction_targets=redaction_targets
                )
            except StaleRoom:
                if self.replicator is not None:
                    await self.replicator.catch_up("events")
                # Busy room on several workers: back off a little, more each time.
                await asyncio.sleep(random.uniform(0, 0.002 * min(attempt + 1, 25)))
        raise StorageUnavailable("The room is too busy; please retry")

    async def _send_once(
        self,
        room: RoomSnapshot,
        specs: Sequence[EventSpec],
        *,
        pre_writes: Sequence[Callable[[Txn], Any]] = (),
        validate: Validator | None = None,
        redaction_targets: dict[int, Event] | None = None,
    ) -> list[Event]:
        if room.stale:
            raise StorageUnavailable("The room was reloaded; please retry")
        # A single event needs no working copy of the state; a chain does, because each
        # event is authorised against the state its predecessors produced.
        chain = len(specs) > 1
        state = dict(room.state) if chain else room.state
        joined = set(room.joined) if chain else room.joined
        hook_writes: list[Callable[[Txn], Any]] = []
        prev = room.latest_event_id
        expected_head = prev
        depth = room.depth
        built: list[Event] = []
        targets: dict[str, Event] = {}
        ts = now_ms()
        for index, spec in enumerate(specs):
            validate_event_fields(spec.type, spec.state_key, spec.content)
            auth_ids = select_auth_events(spec.type, spec.state_key, spec.sender, spec.content, state)
            try:
                event = build_event(
                    room_version=room.version,
                    room_id=room.room_id,
                    sender=spec.sender,
                    event_type=spec.type,
                    content=spec.content,
                    state_key=spec.state_key,
                    prev_events=[prev] if prev is not None else [],
                    auth_events=auth_ids,
                    depth=depth + 1,
                    origin_server_ts=ts,
                    signing_key=self._key,
                    server_name=self.server_name,
                    redacts=spec.redacts,
                )
            except ValueError as exc:
                raise TooLarge(str(exc)) from None
            try:
                check_auth(event, state, signed_by={self.server_name})
            except AuthError as exc:
                raise Forbidden(exc.reason) from None
            for check in (*self.validators, validate):
                if check is not None:
                    result = check(event, state)
                    if inspect.isawaitable(result):
                        await result
            for hook in self.persist_hooks:
                write = await hook(event, state, joined)
                if write is not None:
                    hook_writes.append(write)
            if spec.txn_key is not None:
                event.txn_device_id = spec.txn_key[1]
                event.txn_id = spec.txn_key[3]
            if event.state_key is not None:
                prior = state.get((event.type, event.state_key))
                if prior is not None:
                    event.replaces_state = prior.event_id
                    event.unsigned_static = {
                        "prev_content": prior.content,
                        "prev_sender": prior.sender,
                        "replaces_state": prior.event_id,
                    }
                if chain:
                    state[(event.type, event.state_key)] = event
                    if event.type == "m.room.member":
                        joined.discard(event.state_key)
                        if event.membership == "join":
                            joined.add(event.state_key)
            if redaction_targets and index in redaction_targets:
                targets[event.event_id] = redaction_targets[index]
            prev = event.event_id
            depth += 1
            built.append(event)
        unit = PersistUnit(
            room,
            built,
            txn_keys=[s.txn_key for s in specs],
            pre_writes=[*pre_writes, *hook_writes],
            redaction_targets=targets,
            expected_head=expected_head,
            check_head=True,
        )
        await self.persister.persist(unit)
        return built

    # -- client sends -----------------------------------------------------------------------

    async def send_with_txn(
        self,
        requester: Requester,
        txn_scope: str,
        txn_id: str | None,
        make: Callable[[TxnKey | None], Any],
    ) -> str:
        """Run ``make(txn_key)`` (which sends one event) at most once per device/scope/txn ID."""
        if txn_id is None or requester.device_id is None:
            event = await make(None)
            return event.event_id
        key: TxnKey = (requester.user_id, requester.device_id, txn_scope, txn_id)
        done = self._recent_txns.get(key)
        if done is not None:
            return done
        inflight = self._inflight.get(key)
        if inflight is not None:
            return await asyncio.shield(inflight.future)
        entry = _Inflight()
        self._inflight[key] = entry
        try:
            try:
                event_id = (await make(key)).event_id
            except events_store.DuplicateTransaction as dup:
                # Seen before (e.g. before a restart): the stored mapping wins and the
                # event just built was rolled back with its savepoint.
                event_id = dup.event_id
            entry.future.set_result(event_id)
            self._recent_txns[key] = event_id
            if len(self._recent_txns) > RECENT_TXNS:
                self._recent_txns.popitem(last=False)
            return event_id
        except BaseException as exc:
            entry.future.set_exception(exc)
            entry.future.exception()
            raise
        finally:
            del self._inflight[key]

    async def send_client_event(
        self,
        requester: Requester,
        room_id: str,
        event_type: str,
        content: Any,
        *,
        state_key: str | None = None,
        txn_id: str | None = None,
    ) -> str:
        if event_type == "m.room.redaction" and state_key is None:
            redacts = content.get("redacts") if isinstance(content, dict) else None
            if not isinstance(redacts, str):
                raise BadJson("m.room.redaction needs content.redacts")
            reason_content = {k: v for k, v in content.items() if k != "redacts"}
            return await self.redact(requester, room_id, redacts, reason_content, txn_id)

        room = await self.get_room(room_id)
        validate_event_fields(event_type, state_key, content)

        async def make(txn_key: TxnKey | None) -> Event:
            spec = EventSpec(requester.user_id, event_type, content, state_key=state_key, txn_key=txn_key)
            (event,) = await self.send(room, [spec])
            return event

        return await self.send_with_txn(requester, f"send:{room_id}:{event_type}", txn_id, make)

    async def redact(
        self,
        requester: Requester,
        room_id: str,
        target_id: str,
        content: Any,
        txn_id: str | None,
    ) -> str:
        if not isinstance(content, dict):
            raise BadJson("request body must be a JSON object")
        reason = content.get("reason")
        if reason is not None and not isinstance(reason, str):
            raise BadJson("'reason' must be a string")
        room = await self.get_room(room_id)

        async def make(txn_key: TxnKey | None) -> Event:
            target = await self.events.get(target_id)
            if target is None or target.room_id != room_id:
                raise NotFound("No such event in this room")
            async with room.lock:
                state = room.state
                if room.membership_of(requester.user_id) != "join":
                    raise Forbidden("You are not in this room")
                if target.type == "m.room.create":
                    raise Forbidden("The m.room.create event cannot be redacted")
                level = user_power_level(requester.user_id, state)
                if target.sender != requester.user_id and level < named_level("redact", state):
                    raise Forbidden("You may only redact your own events unless your power level is at least the redact level")
                spec = EventSpec(
                    requester.user_id, "m.room.redaction", dict(content), redacts=target_id, txn_key=txn_key
                )
                (event,) = await self.send_locked(room, [spec], redaction_targets={0: target})
                return event

        return await self.send_with_txn(requester, f"redact:{room_id}:{target_id}", txn_id, make)
