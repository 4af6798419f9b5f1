"""``/sync``: initial and incremental sync, and the long-poll that waits for news.

The response describes what changed between two tokens: ``since`` (from the client,
or nothing for an initial sync) and the server's current token, read once at the
start so every part of the response is cut at the same point. A user's rooms come
from :class:`MembershipIndex`; a room's new events from its in-memory snapshot
(falling back to the database for long gaps); events are serialised once and
spliced into the response as :class:`orjson.Fragment` objects.

An incremental sync with nothing to report waits on the :class:`Notifier` until
something for the user is committed or the timeout passes, then computes again.
While the worker is busy, a long-poll from a device answered moments ago first waits
out :class:`~bastion.services.sync_pacing.SyncPacer`'s interval, so events committed
meanwhile share one response.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from dataclasses import dataclass, replace
from itertools import islice
from typing import Any

import orjson

from bastion.clock import now_ms
from bastion.core.events import Event, StateKey
from bastion.core.filters import EventFilter, Filter, apply_event_fields
from bastion.core.visibility import is_visible
from bastion.services.account_data import AccountDataService
from bastion.services.caches import EventCache, Membership, MembershipIndex, RoomCache, RoomSnapshot
from bastion.services.e2ee import KeysService
from bastion.services.presence import PresenceService
from bastion.services.push import PushRulesService
from bastion.services.receipts import ReceiptsService
from bastion.services.relations import Bundler, Bundles
from bastion.services.requester import Requester
from bastion.services.sync_pacing import SyncPacer
from bastion.services.typing import TypingService
from bastion.storage import events as events_store
from bastion.storage.database import Database
from bastion.streams.notifier import Notifier
from bastion.streams.tokens import StreamToken

MAX_DB_SCAN_ROUNDS = 5


@dataclass
class SyncRequest:
    requester: Requester
    since: StreamToken | None
    timeout_ms: int
    filter: Filter
    full_state: bool = False
    use_state_after: bool = False
    timeline_limit: int = 10
    set_presence: str | None = None


def _end_of_last_stay(history: list[tuple[int, str]]) -> int:
    """The stream position where the user's last stay in a room ended (the membership
    event that took them out), from their membership history; -1 if they never joined."""
    end, joined = -1, False
    for position, membership in history:
        if membership == "join":
            joined = True
        elif joined:
            end, joined = position, False
    return end


@dataclass
class _RoomCtx:
    """Per-request working data for one room."""

    room: RoomSnapshot
    membership: Membership
    upto: int
    history: list[tuple[int, str]] | None = None
    ignored: frozenset[str] = frozenset()
    thread_counts: bool = False  # the filter asked for unread_thread_notifications


class SyncService:
    def __init__(
        self,
        *,
        db: Database,
        rooms: RoomCache,
        event_cache: EventCache,
        memberships: MembershipIndex,
        notifier: Notifier,
        account_data: AccountDataService,
        receipts: ReceiptsService,
        typing: TypingService,
        presence: PresenceService,
        bundler: Bundler,
        push: PushRulesService,
        keys: KeysService,
        max_timeout_ms: int,
        timeline_limit_max: int,
        pacer: SyncPacer | None = None,
    ) -> None:
        self._db = db
        self._rooms = rooms
        self._cache = event_cache
        self._memberships = memberships
        self._notifier = notifier
        self._account_data = account_data
        self._receipts = receipts
        self._typing = typing
        self._presence = presence
        self._bundler = bundler
        self._push = push
        self._keys = keys
        self._max_timeout_ms = max_timeout_ms
        self._pacer = pacer
        self._timeline_limit_max = timeline_limit_max
        self._sent_members: OrderedDict[tuple[str, str | None], dict[str, dict[str, str]]] = OrderedDict()

    # -- entry point ----------------------------------------------------------------------

    async def sync(self, req: SyncRequest) -> bytes:
        user = req.requester.user_id
        await self._presence.sync_started(user, req.set_presence)
        try:
            return await self._sync(req)
        finally:
            self._presence.sync_finished(user)

    async def _sync(self, req: SyncRequest) -> bytes:
        user = req.requester.user_id
        timeout_s = min(max(req.timeout_ms, 0), self._max_timeout_ms) / 1000
        deadline = time.monotonic() + timeout_s
        since = req.since
        pacer = self._pacer
        if pacer is None or not pacer.enabled or since is None or timeout_s <= 0:
            return await self._answer(req, since, deadline)
        key = (user, req.requester.device_id)
        await pacer.pace(key)
        try:
            return await self._answer(req, since, deadline)
        finally:
            pacer.answered(key)

    async def _answer(self, req: SyncRequest, since: StreamToken | None, deadline: float) -> bytes:
        user = req.requester.user_id
        if since is not None:
            since = since.min(self._notifier.current)
            remaining = deadline - time.monotonic()
            if remaining > 0 and not req.full_state and self._notifier.nothing_since(user, since):
                # Nothing for this user since ``since``: computing now could only give an
                # empty response to throw away. Wait first (woken, or timed out, the loop
                # below computes the answer).
                await self._notifier.wait_for(user, since, remaining)
        while True:
            rooms_map = await self._memberships.rooms_for(user)
            # No await between reading the token and copying the membership map: both
            # describe the same instant.
            token = self._notifier.current
            memberships = dict(rooms_map)
            response, has_data = await self._compute(req, since, token, memberships)
            remaining = deadline - time.monotonic()
            if has_data or since is None or req.full_state or remaining <= 0:
                return response
            if not await self._notifier.wait_for(user, token, remaining):
                return response  # timed out (or the server is shutting down)

    # -- computing one response ----------------------------------------------------------------

    async def _compute(
        self, req: SyncRequest, since: StreamToken | None, token: StreamToken, memberships: dict[str, Membership]
    ) -> tuple[bytes, bool]:
        user = req.requester.user_id
        room_filter = req.filter.room
        thread_counts = room_filter.timeline.unread_thread_notifications
        limit = max(1, min(req.filter.room.timeline.limit or req.timeline_limit, self._timeline_limit_max))
        now = now_ms()
        join: dict[str, Any] = {}
        invite: dict[str, Any] = {}
        leave: dict[str, Any] = {}
        since_pos = since.events if since is not None else None
        device_key = (user, req.requester.device_id) if req.requester.device_id else None
        lazy_cache_key = (user, req.requester.device_id)
        if since is None or req.full_state:
            self._sent_members.pop(lazy_cache_key, None)

        ignored = await self._account_data.ignored_users(user)
        account_changes = await self._account_data.changes(user, since.account_data if since else 0, token.account_data)
        room_account_data: dict[str, list[dict[str, Any]]] = {}
        for room_id, data_type, content in account_changes.room:
            room_account_data.setdefault(room_id, []).append({"type": data_type, "content": orjson.Fragment(content)})

        histories = await self._prefetch(req, since_pos, token, memberships)

        for room_id, m in memberships.items():
            if m.forgotten or not room_filter.allows_room(room_id):
                continue
            changed = since_pos is None or m.stream_ordering > since_pos
            if m.stream_ordering > token.events:
                continue  # the change is newer than this response; the next sync reports it
            if m.membership == "join":
                room = self._rooms.cached(room_id) or await self._rooms.get(room_id)
                if room is None:
                    continue
                ctx = _RoomCtx(
                    room, m, token.events, histories.get(room_id), ignored=ignored, thread_counts=thread_counts
                )
                body: dict[str, Any] | None
                full = self._joined_in_full(req, room_id, m, since_pos, token)
                ephemeral_after = None if full or since is None else since
                if full:
                    body = await self._room_full(req, ctx, None if changed else since_pos, limit, now, device_key)
                else:
                    assert since is not None and since_pos is not None
                    quiet = (
                        room.last_stream <= since_pos
                        and room_id not in room_account_data
                        and self._typing.room_stream(room_id) <= since.typing
                        and (self._receipts.room_stream(room_id) or 0) <= since.receipts
                    )
                    if quiet and self._receipts.room_stream(room_id) is not None:
                        continue
                    body = await self._room_incremental(req, ctx, since_pos, limit, now, device_key)
                ephemeral = await self._ephemeral(req, room_id, ephemeral_after, token)
                if body is None:
                    if room_id not in room_account_data and not ephemeral:
                        continue
                    body = self._empty_joined(since_pos)
                body["ephemeral"] = {"events": ephemeral}
                body["account_data"] = {"events": room_account_data.get(room_id, [])}
                await self._add_summary_and_counts(body, ctx, user)
                join[room_id] = body
            elif m.membership == "invite":
                if not changed:
                    continue
                room = await self._rooms.get(room_id)
                if room is None:
                    continue
                inviter = room.state.get(("m.room.member", user))
                if inviter is not None and inviter.sender in ignored:
                    continue  # spec: invites from ignored users are not sent
                invite[room_id] = {"invite_state": {"events": await self._invite_state(room, m)}}
            elif m.membership in ("leave", "ban"):
                if since_pos is None and not room_filter.include_leave:
                    continue
                if not changed:
                    continue
                room = await self._rooms.get(room_id)
                if room is None:
                    continue
                ctx = _RoomCtx(room, m, min(token.events, m.stream_ordering), ignored=ignored, thread_counts=thread_counts)
                body = await self._room_leave(req, ctx, since_pos, limit, now, device_key)
                body["account_data"] = {"events": room_account_data.get(room_id, [])}
                leave[room_id] = body

        response: dict[str, Any] = {"next_batch": token.encode()}
        rooms_section: dict[str, Any] = {}
        if join:
            rooms_section["join"] = join
        if invite:
            rooms_section["invite"] = invite
        if leave:
            rooms_section["leave"] = leave
        response["rooms"] = rooms_section
        global_events = [
            {"type": t, "content": orjson.Fragment(c)}
            for t, c in account_changes.global_
            if req.filter.account_data.allows(t, None)
        ]
        response["account_data"] = {"events": global_events}
        joined_rooms = [r for r, m in memberships.items() if m.membership == "join"]
        presence = await self._presence.events_for(user, joined_rooms, since.presence if since else None, token.presence)
        presence = [e for e in presence if req.filter.presence.allows(e["type"], e["sender"])]
        response["presence"] = {"events": presence}
        has_data = bool(join or invite or leave or global_events or presence)

        device = req.requester.device_id
        if device is not None:
            to_device, td_position = await self._keys.to_device_for(
                user, device, since.to_device if since else None, token.to_device
            )
            response["to_device"] = {"events": to_device}
            if td_position != token.to_device:
                response["next_batch"] = replace(token, to_device=td_position).encode()
            counts, unused = await self._keys.counts(user, device)
            response["device_one_time_keys_count"] = counts
            response["device_unused_fallback_key_types"] = unused
            has_data = has_data or bool(to_device)
        if since is not None:
            dl_changed, dl_left = await self._device_list_delta(user, since, token, memberships)
            response["device_lists"] = {"changed": sorted(dl_changed), "left": sorted(dl_left)}
            has_data = has_data or bool(dl_changed or dl_left)
        return orjson.dumps(response), has_data

    async def _prefetch(
        self, req: SyncRequest, since_pos: int | None, token: StreamToken, memberships: dict[str, Membership]
    ) -> dict[str, list[tuple[int, str]]]:
        """Read what the joined rooms sent in full need (their snapshots, receipts, unread
        counts and the user's membership history) a few transactions at a time instead of
        several per room. Returns the membership histories by room."""
        wanted = [
            room_id for room_id, m in memberships.items() if self._joined_in_full(req, room_id, m, since_pos, token)
        ]
        if len(wanted) < 2:
            return {}
        user = req.requester.user_id
        rooms = await self._rooms.get_many(wanted)

        async def unread_counts() -> None:
            await self._receipts.preload(rooms)  # the counts start at the user's receipts
            await self._push.unread_counts_many(list(rooms.values()), user, token.events)

        histories, _ = await asyncio.gather(
            self._db.read(events_store.get_membership_histories, list(rooms), user), unread_counts()
        )
        return histories

    @staticmethod
    def _joined_in_full(
        req: SyncRequest, room_id: str, m: Membership, since_pos: int | None, token: StreamToken
    ) -> bool:
        """Whether this response sends ``room_id`` in the join section in full (state and
        timeline from scratch): the one rule for :meth:`_compute` and :meth:`_prefetch`."""
        return (
            m.membership == "join"
            and not m.forgotten
            and m.stream_ordering <= token.events
            and (since_pos is None or req.full_state or m.stream_ordering > since_pos)
            and req.filter.room.allows_room(room_id)
        )

    async def _device_list_delta(
        self, user: str, since: StreamToken, token: StreamToken, memberships: dict[str, Membership]
    ) -> tuple[set[str], set[str]]:
        """``device_lists``: users whose devices changed, or who started or stopped sharing a room."""
        changed = await self._keys.changes(user, since.device_lists, token.device_lists)
        newly_shared: set[str] = set()
        maybe_left: set[str] = set()
        for room_id, m in memberships.items():
            room = self._rooms.cached(room_id)
            if room is None or room.last_stream <= since.events:
                continue
            if m.stream_ordering > since.events:
                if m.membership == "join":
                    newly_shared |= room.joined  # we joined: everyone there is new to us
                elif m.membership in ("leave", "ban"):
                    # We left: the members we shared the room with are those joined just
                    # before, if we were one of them (not those who joined since, nor
                    # anyone when we had only been invited).
                    before = await self._state_at(room, m.stream_ordering - 1)
                    members = {k[1] for k, e in before.items() if k[0] == "m.room.member" and e.membership == "join"}
                    if user in members:
                        maybe_left |= members
                continue
            if m.membership != "join":
                continue
            events = room.events_after(since.events, token.events)
            if events is None:
                rows = await self._db.read(events_store.membership_changes, room_id, since.events, token.events)
            else:
                rows = [(e.state_key, e.membership or "leave") for e in events if e.type == "m.room.member" and e.state_key]
            for target, membership in rows:
                if membership == "join":
                    newly_shared.add(target)
                elif membership in ("leave", "ban"):
                    maybe_left.add(target)
        newly_shared.discard(user)
        maybe_left.discard(user)
        left = set()
        for other in maybe_left - newly_shared:
            if not await self._keys.shares_a_room(user, other):
                left.add(other)
        return (changed | newly_shared) - left, left

    async def key_changes(self, requester: Requester, start: StreamToken, end: StreamToken) -> dict[str, Any]:
        """GET /keys/changes between two sync tokens."""
        user = requester.user_id
        memberships = dict(await self._memberships.rooms_for(user))
        end = end.min(self._notifier.current)
        changed, left = await self._device_list_delta(user, start, end, memberships)
        return {"changed": sorted(changed), "left": sorted(left)}

    # -- rooms ------------------------------------------------------------------------------------

    async def _ephemeral(self, req: SyncRequest, room_id: str, since: StreamToken | None, token: StreamToken) -> list[dict[str, Any]]:
        eph_filter = req.filter.room.ephemeral
        out: list[dict[str, Any]] = []
        typing = self._typing.typing_event(room_id, since.typing if since else None, token.typing)
        if typing is not None and eph_filter.allows("m.typing", None, room_id):
            out.append(typing)
        if eph_filter.allows("m.receipt", None, room_id):
            receipts = await self._receipts.receipts_event(
                room_id, req.requester.user_id, since.receipts if since else None, token.receipts
            )
            if receipts is not None:
                out.append(receipts)
        return out

    def _empty_joined(self, since_pos: int | None) -> dict[str, Any]:
        return {
            "timeline": {"events": [], "limited": False, "prev_batch": StreamToken(events=since_pos or 0).encode()},
            "state": {"events": []},
            "ephemeral": {"events": []},
        }

    async def _bundles(self, ctx: _RoomCtx, req: SyncRequest, timeline: list[Event], limited: bool, now: int) -> Bundles | None:
        """Bundled aggregations: the spec asks for them only in limited timelines."""
        if not limited or not timeline:
            return None
        if not ctx.room.may_have_children(e for e in timeline if e.state_key is None):
            return None
        history = await self._history(ctx, req.requester.user_id)
        return await self._bundler.bundle(timeline, req.requester, history, ctx.room.visibility, now)

    async def _history(self, ctx: _RoomCtx, user: str) -> list[tuple[int, str]]:
        if ctx.history is None:
            ctx.history = await self._db.read(events_store.get_membership_history, ctx.room.room_id, user)
        return ctx.history

    @staticmethod
    def _wanted(ctx: _RoomCtx, tfilter: EventFilter, event: Event) -> bool:
        """Timeline filter, and: no non-state events from ignored users."""
        if event.sender in ctx.ignored and event.state_key is None:
            return False
        return tfilter.allows_event(event)

    async def _visible(self, ctx: _RoomCtx, user: str, event: Event) -> bool:
        m = ctx.membership
        if m.membership == "join" and event.stream_ordering > m.stream_ordering:
            return True
        history = await self._history(ctx, user)
        return is_visible(event, user, history, ctx.room.visibility)

    async def _timeline(
        self, ctx: _RoomCtx, user: str, lower: int | None, tfilter: EventFilter, limit: int
    ) -> tuple[list[Event], bool]:
        """Up to ``limit`` visible, filtered events in (lower, upto], and whether more exist."""
        room = ctx.room
        low = lower or 0
        picked: list[Event] = []  # newest first
        reached_low = False
        for event in reversed(room.recent):
            if event.stream_ordering > ctx.upto:
                continue
            if event.stream_ordering <= low:
                reached_low = True
                break
            if self._wanted(ctx, tfilter, event) and await self._visible(ctx, user, event):
                picked.append(event)
                if len(picked) > limit:
                    picked.pop()
                    picked.reverse()
                    return picked, True
        limited = False
        position = min(room.recent_floor, ctx.upto)
        if not reached_low and position > low:
            batch = limit * 2 + 10
            for _ in range(MAX_DB_SCAN_ROUNDS):
                # A filter that names its types exactly selects them in the query: the
                # scan then does not read (and decrypt) a big room's member events to
                # find its few messages.
                chunk = await self._db.read(
                    events_store.get_room_events,
                    room.room_id,
                    after=low,
                    upto=position,
                    limit=batch,
                    backwards=True,
                    types=tfilter.exact_types,
                )
                for event in self._cache.canonical(chunk):
                    position = event.stream_ordering - 1
                    if self._wanted(ctx, tfilter, event) and await self._visible(ctx, user, event):
                        picked.append(event)
                        if len(picked) > limit:
                            picked.pop()
                            picked.reverse()
                            return picked, True
                if len(chunk) < batch:
                    break
            else:
                limited = position > low
        picked.reverse()
        return picked, limited

    async def _state_at(self, room: RoomSnapshot, position: int, keys: set[StateKey] | None = None) -> dict[StateKey, Event]:
        rolled = room.state_rollback(position, keys)
        if rolled is not None:
            state, fetch = rolled
            if fetch:
                found = await self._cache.get_many(fetch.values())
                state.update({k: found[eid] for k, eid in fetch.items() if eid in found})
            return state
        ids = await self._db.read(events_store.get_state_ids_at, room.room_id, position, list(keys) if keys is not None else None)
        found = await self._cache.get_many(ids.values())
        return {k: found[eid] for k, eid in ids.items() if eid in found}

    def _serialise(
        self,
        events: list[Event],
        req: SyncRequest,
        now: int,
        device_key: tuple[str, str] | None,
        bundles: Bundles | None = None,
    ) -> list[Any]:
        flt = req.filter
        bundles = bundles or {}
        if not flt.needs_custom_serialisation:
            return [e.client_fragment(now, device_key, bundles.get(e.event_id)) for e in events]
        out = []
        for e in events:
            raw = e.client_bytes(now, device_key, bundles.get(e.event_id))
            data = e.federation_dict() if flt.event_format == "federation" else orjson.loads(raw)
            if flt.event_fields is not None:
                data = apply_event_fields(data, flt.event_fields)
            out.append(data)
        return out

    def _lazy_members(
        self,
        req: SyncRequest,
        room: RoomSnapshot,
        state: dict[StateKey, Event],
        timeline: list[Event],
        must_include: set[str],
    ) -> dict[StateKey, Event]:
        """Apply lazy-loading to a state map: keep non-member state and the members needed."""
        sfilter = req.filter.room.state
        if not sfilter.lazy_load_members:
            return state
        wanted = {e.sender for e in timeline} | must_include
        key = (req.requester.user_id, req.requester.device_id)
        sent_rooms = self._sent_members.get(key)
        if sent_rooms is None:
            sent_rooms = {}
            self._sent_members[key] = sent_rooms
            if len(self._sent_members) > 10_000:
                self._sent_members.popitem(last=False)
        sent = sent_rooms.setdefault(room.room_id, {})
        out: dict[StateKey, Event] = {}
        for k, event in state.items():
            if k[0] != "m.room.member":
                out[k] = event
                continue
            if k[1] not in wanted:
                continue
            if not sfilter.include_redundant_members and sent.get(k[1]) == event.event_id and k[1] not in must_include:
                continue
            out[k] = event
            sent[k[1]] = event.event_id
        for event in timeline:
            if event.type == "m.room.member" and event.state_key is not None:
                sent[event.state_key] = event.event_id
        return out

    def _filter_state(self, req: SyncRequest, state: dict[StateKey, Event]) -> list[Event]:
        sfilter = req.filter.room.state
        return [e for e in state.values() if sfilter.allows_event(e)]

    async def _missing_members(self, req: SyncRequest, room: RoomSnapshot, position: int, timeline: list[Event], must: set[str]) -> dict[StateKey, Event]:
        """Member events for lazy-loading that a partial state map does not already hold."""
        if not req.filter.room.state.lazy_load_members:
            return {}
        users = {e.sender for e in timeline} | must
        return await self._state_at(room, position, {("m.room.member", u) for u in users})

    async def _room_full(
        self,
        req: SyncRequest,
        ctx: _RoomCtx,
        since_pos: int | None,
        limit: int,
        now: int,
        device_key: tuple[str, str] | None,
    ) -> dict[str, Any]:
        """A room the client knows nothing about (initial sync, new join) or full_state."""
        user = req.requester.user_id
        room = ctx.room
        timeline, limited = await self._timeline(ctx, user, since_pos, req.filter.room.timeline, limit)
        start = timeline[0].stream_ordering - 1 if timeline else ctx.upto
        must = {user}
        if not self._has_name(room):
            must |= set(self._heroes(room, user))
        body: dict[str, Any] = {
            "timeline": {
                "events": self._serialise(timeline, req, now, device_key, await self._bundles(ctx, req, timeline, limited, now)),
                "limited": limited,
                "prev_batch": StreamToken(events=start).encode(),
            },
            "ephemeral": {"events": []},
        }
        if req.use_state_after:
            state = await self._state_at(room, ctx.upto)
            state = self._lazy_members(req, room, state, timeline, must)
            body["state_after"] = {"events": self._serialise(self._filter_state(req, state), req, now, device_key)}
        else:
            state = await self._state_at(room, start)
            in_timeline = {e.event_id for e in timeline}
            state = {k: e for k, e in state.items() if e.event_id not in in_timeline}
            state = self._lazy_members(req, room, state, timeline, must)
            body["state"] = {"events": self._serialise(self._filter_state(req, state), req, now, device_key)}
        return body

    async def _room_incremental(
        self,
        req: SyncRequest,
        ctx: _RoomCtx,
        since_pos: int,
        limit: int,
        now: int,
        device_key: tuple[str, str] | None,
    ) -> dict[str, Any] | None:
        user = req.requester.user_id
        room = ctx.room
        timeline, limited = await self._timeline(ctx, user, since_pos, req.filter.room.timeline, limit)
        if not timeline and not limited:
            return None
        start = timeline[0].stream_ordering - 1 if timeline else ctx.upto
        lazy = req.filter.room.state.lazy_load_members
        state: dict[StateKey, Event] = {}
        gap_members: set[str] = set()
        if req.use_state_after:
            key_name = "state_after"
            keys = await self._db.read(events_store.get_state_keys_changed, room.room_id, since_pos, ctx.upto)
            if keys:
                state = await self._state_at(room, ctx.upto, keys)
            if lazy:
                state.update(await self._missing_members(req, room, ctx.upto, timeline, set()))
        else:
            key_name = "state"
            if limited and start > since_pos:
                keys = await self._db.read(events_store.get_state_keys_changed, room.room_id, since_pos, start)
                gap_members = {k[1] for k in keys if k[0] == "m.room.member"}
                if keys:
                    state = await self._state_at(room, start, keys)
            if lazy:
                # Senders the client may never have seen (lazy loading): their membership
                # as of the start of the timeline, unless the timeline itself carries it.
                in_timeline = {e.state_key for e in timeline if e.type == "m.room.member"}
                extra = await self._missing_members(req, room, start, timeline, set())
                state.update({k: e for k, e in extra.items() if k[1] not in in_timeline})
        state = self._lazy_members(req, room, state, timeline, gap_members)
        return {
            "timeline": {
                "events": self._serialise(timeline, req, now, device_key, await self._bundles(ctx, req, timeline, limited, now)),
                "limited": limited,
                "prev_batch": StreamToken(events=start).encode(),
            },
            key_name: {"events": self._serialise(self._filter_state(req, state), req, now, device_key)},
            "ephemeral": {"events": []},
        }

    async def _room_leave(
        self,
        req: SyncRequest,
        ctx: _RoomCtx,
        since_pos: int | None,
        limit: int,
        now: int,
        device_key: tuple[str, str] | None,
    ) -> dict[str, Any]:
        user = req.requester.user_id
        room = ctx.room
        timeline, limited = await self._timeline(ctx, user, since_pos, req.filter.room.timeline, limit)
        start = timeline[0].stream_ordering - 1 if timeline else ctx.upto
        if since_pos is None:
            state = await self._state_at(room, start)
        else:
            keys = await self._db.read(events_store.get_state_keys_changed, room.room_id, since_pos, start)
            state = await self._state_at(room, start, keys) if keys else {}
        if req.use_state_after:
            key_name = "state_after"
            if since_pos is None:
                state = await self._state_at(room, ctx.upto)
            else:
                keys = await self._db.read(events_store.get_state_keys_changed, room.room_id, since_pos, ctx.upto)
                state = await self._state_at(room, ctx.upto, keys) if keys else {}
        else:
            key_name = "state"
            in_timeline = {e.event_id for e in timeline}
            state = {k: e for k, e in state.items() if e.event_id not in in_timeline}
        # The state the user knew is the state of their last stay in the room. Anything
        # set after it (they never joined at all: an invite rejected, a ban before joining;
        # or they were invited back and declined) is theirs to see only as its history
        # visibility allows, like any other event (the /state endpoint agrees) — except
        # their own membership, which is how a client learns that the room is gone from
        # its list (a rejected invite: matrix-js-sdk waits for it).
        known_upto = _end_of_last_stay(await self._history(ctx, user))
        own = ("m.room.member", user)
        state = {
            k: e for k, e in state.items()
            if k == own or e.stream_ordering <= known_upto or await self._visible(ctx, user, e)
        }
        state = self._lazy_members(req, room, state, timeline, {user})
        return {
            "timeline": {
                "events": self._serialise(timeline, req, now, device_key, await self._bundles(ctx, req, timeline, limited, now)),
                "limited": limited,
                "prev_batch": StreamToken(events=start).encode(),
            },
            key_name: {"events": self._serialise(self._filter_state(req, state), req, now, device_key)},
        }

    async def _invite_state(self, room: RoomSnapshot, m: Membership) -> list[dict[str, Any]]:
        state = await self._state_at(room, m.stream_ordering)
        out = []
        for key in (
            ("m.room.create", ""),
            ("m.room.name", ""),
            ("m.room.avatar", ""),
            ("m.room.topic", ""),
            ("m.room.join_rules", ""),
            ("m.room.canonical_alias", ""),
            ("m.room.encryption", ""),
        ):
            event = state.get(key)
            if event is not None:
                out.append(event.stripped())
        invite_event = await self._cache.get(m.event_id)
        if invite_event is not None:
            sender_member = state.get(("m.room.member", invite_event.sender))
            if sender_member is not None:
                out.append(sender_member.stripped())
            out.append(invite_event.stripped())
        return out

    # -- summaries and unread counts -------------------------------------------------------------

    @staticmethod
    def _has_name(room: RoomSnapshot) -> bool:
        for key, field_name in ((("m.room.name", ""), "name"), (("m.room.canonical_alias", ""), "alias")):
            event = room.state.get(key)
            if event is not None and event.content.get(field_name):
                return True
        return False

    @staticmethod
    def _heroes(room: RoomSnapshot, user: str) -> list[str]:
        """Up to five other members, oldest membership first: joined or invited ones,
        else those who left or were banned."""
        members = room.members_by_age()
        active = list(islice((u for _, u, m in members if u != user and m in ("join", "invite")), 5))
        if active:
            return active
        return list(islice((u for _, u, m in members if u != user and m in ("leave", "ban")), 5))

    async def _add_summary_and_counts(self, body: dict[str, Any], ctx: _RoomCtx, user: str) -> None:
        room = ctx.room
        body["summary"] = {
            "m.heroes": self._heroes(room, user),
            "m.joined_member_count": len(room.joined),
            "m.invited_member_count": len(room.invited),
        }
        counts = await self._push.unread_counts(room, user, ctx.upto)
        if ctx.thread_counts:
            # The client counts threads apart: the main timeline here, each thread below.
            notifications, highlights = counts.notifications, counts.highlights
            threads = {
                root: {"notification_count": n, "highlight_count": h}
                for root, (n, h) in counts.threads.items() if n or h
            }
            # Always present (possibly empty) when asked for, so a thread read to zero is
            # visibly zero rather than merely absent.
            body["unread_thread_notifications"] = threads
        else:
            notifications, highlights = counts.total()
        body["unread_notifications"] = {"notification_count": notifications, "highlight_count": highlights}
