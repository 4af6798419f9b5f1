"""Reading rooms: single events, state, members, ``/messages`` and ``/context``.

Every read goes through :meth:`RoomReadService.access` first, which decides how far
the requester may see: members see the present; users who left see the room as it
was when they left; non-members see nothing unless the room is world-readable.
Individual events are then filtered with the history-visibility rules
(:mod:`bastion.core.visibility`).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from bastion.clock import now_ms
from bastion.core.events import Event, StateKey
from bastion.core.filters import EventFilter
from bastion.core.visibility import filter_visible, is_visible
from bastion.errors import Forbidden, InvalidParam, NotFound
from bastion.services.caches import EventCache, RoomSnapshot
from bastion.services.relations import Bundler, Bundles
from bastion.services.requester import Requester
from bastion.services.room_events import EventService
from bastion.storage import events as events_store
from bastion.storage.database import Database
from bastion.streams.notifier import Notifier
from bastion.streams.tokens import decode_pagination, encode_pagination


@dataclass(frozen=True, slots=True)
class Access:
    """How much of a room a user may read."""

    room: RoomSnapshot
    # Highest stream position the user may see (their leave event for former members).
    upto: int
    memberships: list[tuple[int, str]]
    is_member: bool


@dataclass
class MessagesPage:
    chunk: list[Event]
    start: str
    end: str | None
    state: list[Event]
    bundles: Bundles


class RoomReadService:
    def __init__(
        self,
        *,
        db: Database,
        events: EventService,
        event_cache: EventCache,
        notifier: Notifier,
        bundler: Bundler,
        max_limit: int,
        ignored_users: Callable[[str], Awaitable[frozenset[str]]] | None = None,
    ) -> None:
        self._ignored_lookup = ignored_users
        self._bundler = bundler
        self._db = db
        self._events = events
        self._cache = event_cache
        self._notifier = notifier
        self._max_limit = max_limit

    async def _ignored(self, user_id: str) -> frozenset[str]:
        return await self._ignored_lookup(user_id) if self._ignored_lookup is not None else frozenset()

    async def access(self, requester: Requester, room_id: str) -> Access:
        room = await self._events.rooms.get(room_id)
        if room is None:
            raise Forbidden("You are not a member of this room")
        user = requester.user_id
        current = room.membership_of(user)
        if current == "join":
            history = await self._db.read(events_store.get_membership_history, room_id, user)
            return Access(room, self._notifier.current.events, history, True)
        history = await self._db.read(events_store.get_membership_history, room_id, user)
        if any(m == "join" for _, m in history) and current in ("leave", "ban"):
            member_event = room.state.get(("m.room.member", user))
            upto = member_event.stream_ordering if member_event is not None else 0
            return Access(room, upto, history, False)
        if room.visibility and room.visibility[-1][1] == "world_readable":
            return Access(room, self._notifier.current.events, history, False)
        raise Forbidden("You are not a member of this room")

    async def _state_at(self, room: RoomSnapshot, position: int, types: list[StateKey] | None = None) -> dict[StateKey, Event]:
        if position >= room.last_stream:
            if types is None:
                return dict(room.state)
            return {k: room.state[k] for k in types if k in room.state}
        ids = await self._db.read(events_store.get_state_ids_at, room.room_id, position, types)
        found = await self._cache.get_many(ids.values())
        return {k: found[eid] for k, eid in ids.items() if eid in found}

    # -- single events and state -------------------------------------------------------------

    async def get_event(self, requester: Requester, room_id: str, event_id: str) -> tuple[Event, Bundles]:
        access = await self.access(requester, room_id)
        event = await self._cache.get(event_id)
        if event is None or event.room_id != room_id or event.stream_ordering > access.upto:
            raise NotFound("Event not found")
        if not is_visible(event, requester.user_id, access.memberships, access.room.visibility):
            raise NotFound("Event not found")
        return event, await self._bundle([event], requester, access)

    async def _bundle(self, events: list[Event], requester: Requester, access: Access) -> Bundles:
        return await self._bundler.bundle(events, requester, access.memberships, access.room.visibility, now_ms())

    async def get_state(self, requester: Requester, room_id: str) -> list[Event]:
        access = await self.access(requester, room_id)
        state = await self._state_at(access.room, access.upto)
        return list(state.values())

    async def get_state_event(self, requester: Requester, room_id: str, event_type: str, state_key: str) -> Event:
        access = await self.access(requester, room_id)
        state = await self._state_at(access.room, access.upto, [(event_type, state_key)])
        event = state.get((event_type, state_key))
        if event is None:
            raise NotFound("State event not found")
        return event

    async def members(
        self,
        requester: Requester,
        room_id: str,
        at: str | None,
        membership: str | None,
        not_membership: str | None,
    ) -> list[Event]:
        access = await self.access(requester, room_id)
        position = access.upto
        if at is not None:
            position = min(position, decode_pagination(at, "at"))
        state = await self._state_at(access.room, position)
        out = []
        for (etype, _), event in state.items():
            if etype != "m.room.member":
                continue
            value = event.membership or "leave"
            if membership is not None and value != membership:
                continue
            if not_membership is not None and value == not_membership:
                continue
            out.append(event)
        return out

    async def joined_members(self, requester: Requester, room_id: str) -> dict[str, dict[str, Any]]:
        access = await self.access(requester, room_id)
        if not access.is_member:
            raise Forbidden("You are not a member of this room")
        room = access.room
        out: dict[str, dict[str, Any]] = {}
        for user in sorted(room.joined):
            event = room.state[("m.room.member", user)]
            entry: dict[str, Any] = {}
            name = event.content.get("displayname")
            avatar = event.content.get("avatar_url")
            if isinstance(name, str):
                entry["display_name"] = name
            if isinstance(avatar, str):
                entry["avatar_url"] = avatar
            out[user] = entry
        return out

    # -- pagination ----------------------------------------------------------------------------

    async def messages(
        self,
        requester: Requester,
        room_id: str,
        *,
        from_token: str | None,
        to_token: str | None,
        backwards: bool,
        limit: int,
        event_filter: EventFilter,
    ) -> MessagesPage:
        access = await self.access(requester, room_id)
        limit = max(1, min(limit, self._max_limit))
        if event_filter.limit is not None:
            limit = min(limit, event_filter.limit)
        if from_token is not None:
            start_pos = decode_pagination(from_token, "from")
        else:
            start_pos = access.upto if backwards else 0
        start_pos = min(start_pos, access.upto)
        to_pos = decode_pagination(to_token, "to") if to_token is not None else None

        ignored = await self._ignored(requester.user_id)
        chunk: list[Event] = []
        position = start_pos
        exhausted = False
        scan = max(limit * 2, 20)
        for _ in range(20):  # bounded work per request
            if backwards:
                after, upto = to_pos, position
            else:
                after, upto = position, (access.upto if to_pos is None else min(access.upto, to_pos))
            rows = await self._db.read(
                events_store.get_room_events,
                room_id,
                after=after,
                upto=upto,
                limit=scan,
                backwards=backwards,
                types=event_filter.exact_types,
            )
            rows = self._cache.canonical(rows)
            for event in rows:
                position = event.stream_ordering - 1 if backwards else event.stream_ordering
                if not event_filter.allows_event(event) or (event.sender in ignored and event.state_key is None):
                    continue
                if not is_visible(event, requester.user_id, access.memberships, access.room.visibility):
                    continue
                chunk.append(event)
                if len(chunk) >= limit:
                    break
            if len(chunk) >= limit:
                break
            if len(rows) < scan:
                exhausted = True
                break
        end = None if exhausted else encode_pagination(position)
        state: list[Event] = []
        if event_filter.lazy_load_members and chunk:
            senders = sorted({e.sender for e in chunk})
            at = max(e.stream_ordering for e in chunk)
            member_state = await self._state_at(access.room, at, [("m.room.member", s) for s in senders])
            state = list(member_state.values())
        # The spec: `start` "will be the same as the value given in `from`".
        start = from_token if from_token is not None else encode_pagination(start_pos)
        return MessagesPage(chunk, start, end, state, await self._bundle(chunk, requester, access))

    async def context(
        self, requester: Requester, room_id: str, event_id: str, limit: int, event_filter: EventFilter
    ) -> dict[str, Any]:
        access = await self.access(requester, room_id)
        event = await self._cache.get(event_id)
        if (
            event is None
            or event.room_id != room_id
            or event.stream_ordering > access.upto
            or not is_visible(event, requester.user_id, access.memberships, access.room.visibility)
        ):
            raise NotFound("Event not found")
        limit = max(0, min(limit, self._max_limit))
        before_n = limit // 2
        after_n = limit - before_n
        before: list[Event] = []
        after: list[Event] = []
        if before_n:
            rows = await self._db.read(
                events_store.get_room_events, room_id, upto=event.stream_ordering - 1, limit=before_n * 3 + 10, backwards=True
            )
            before = [
                e for e in filter_visible(self._cache.canonical(rows), requester.user_id, access.memberships, access.room.visibility)
                if event_filter.allows_event(e)
            ][:before_n]
        if after_n:
            rows = await self._db.read(
                events_store.get_room_events, room_id, after=event.stream_ordering, upto=access.upto,
                limit=after_n * 3 + 10, backwards=False,
            )
            after = [
                e for e in filter_visible(self._cache.canonical(rows), requester.user_id, access.memberships, access.room.visibility)
                if event_filter.allows_event(e)
            ][:after_n]
        start_pos = (before[-1].stream_ordering - 1) if before else event.stream_ordering - 1
        end_pos = after[-1].stream_ordering if after else event.stream_ordering
        last = after[-1] if after else event
        state = await self._state_at(access.room, last.stream_ordering)
        if event_filter.lazy_load_members:
            senders = {e.sender for e in [event, *before, *after]}
            state_events = [e for k, e in state.items() if k[0] != "m.room.member" or k[1] in senders]
        else:
            state_events = list(state.values())
        return {
            "event": event,
            "events_before": before,
            "events_after": after,
            "start": encode_pagination(start_pos),
            "end": encode_pagination(end_pos),
            "state": state_events,
            "bundles": await self._bundle([event, *before, *after], requester, access),
        }


def parse_direction(value: str | None) -> bool:
    """True for backwards. The spec requires ``dir``; absent means backwards, like Synapse."""
    if value is None or value == "b":
        return True
    if value == "f":
        return False
    raise InvalidParam("'dir' must be 'b' or 'f'")
