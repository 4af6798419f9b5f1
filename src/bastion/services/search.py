"""Server-side search over room events (``POST /search``).

Searches the rooms the user is joined to, using the database's own full-text index
(SQLite FTS5, PostgreSQL text search); results the user may not see under the
room's history visibility are dropped, and encrypted events are never indexed.
"""

from __future__ import annotations

from typing import Any

from bastion.clock import now_ms
from bastion.core.events import Event
from bastion.core.filters import EventFilter
from bastion.core.ids import parse_digits
from bastion.core.visibility import is_visible, normalise_visibility, visible_ranges
from bastion.errors import BadJson, InvalidParam
from bastion.services.caches import EventCache, MembershipIndex, RoomCache
from bastion.services.relations import Bundler
from bastion.services.requester import Requester
from bastion.services.room_reads import RoomReadService
from bastion.storage import events as events_store
from bastion.storage import search as search_store
from bastion.storage.database import Database, Txn

ALL_KEYS = ("content.body", "content.name", "content.topic")
MAX_LIMIT = 100


def _int(obj: dict[str, Any], key: str, default: int, maximum: int) -> int:
    value = obj.get(key, default)
    if type(value) is not int or value < 0:
        raise BadJson(f"'{key}' must be a non-negative integer")
    return min(value, maximum)


class SearchService:
    def __init__(
        self,
        db: Database,
        rooms: RoomCache,
        events: EventCache,
        memberships: MembershipIndex,
        reads: RoomReadService,
        bundler: Bundler,
    ) -> None:
        self._db = db
        self._rooms = rooms
        self._events = events
        self._memberships = memberships
        self._reads = reads
        self._bundler = bundler

    async def search(self, requester: Requester, body: dict[str, Any], next_batch: str | None) -> dict[str, Any]:
        categories = body.get("search_categories")
        if not isinstance(categories, dict):
            raise BadJson("'search_categories' must be an object")
        criteria = categories.get("room_events")
        if criteria is None:
            return {"search_categories": {}}
        if not isinstance(criteria, dict):
            raise BadJson("'room_events' must be an object")
        term = criteria.get("search_term")
        if not isinstance(term, str):
            raise BadJson("'search_term' is required and must be a string")
        keys = criteria.get("keys", list(ALL_KEYS))
        if not isinstance(keys, list) or not all(k in ALL_KEYS for k in keys):
            raise BadJson(f"'keys' must be a list of {', '.join(ALL_KEYS)}")
        order_by = criteria.get("order_by", "rank")
        if order_by not in ("rank", "recent"):
            raise BadJson("'order_by' must be 'rank' or 'recent'")
        flt = EventFilter.parse(criteria.get("filter"), "filter", room_filter=True)
        limit = min(flt.limit or 10, MAX_LIMIT)
        context = criteria.get("event_context")
        if context is not None and not isinstance(context, dict):
            raise BadJson("'event_context' must be an object")
        include_state = criteria.get("include_state", False)
        if not isinstance(include_state, bool):
            raise BadJson("'include_state' must be a boolean")
        groupings = criteria.get("groupings")
        group_by_room = False
        if groupings is not None:
            if not isinstance(groupings, dict) or not isinstance(groupings.get("group_by", []), list):
                raise BadJson("'groupings' must be an object with a 'group_by' list")
            group_by_room = any(isinstance(g, dict) and g.get("key") == "room_id" for g in groupings.get("group_by", []))

        offset, before = 0, None
        if next_batch:
            kind, _, value = next_batch.partition(":")
            number = parse_digits(value)
            if number is None or kind not in ("rank", "recent"):
                raise InvalidParam("Invalid 'next_batch' token")
            if kind == "rank":
                offset = number
            else:
                before = number

        memberships = await self._memberships.rooms_for(requester.user_id)
        room_ids = sorted(r for r, m in memberships.items() if m.membership == "join" and flt.allows_room(r))
        term_words = search_store.words(term)
        user = requester.user_id

        def find(txn: Txn) -> tuple[list[tuple[str, int, float]], int, dict[str, list[tuple[int, str]]]]:
            # Only where the user may see: neither the results nor the count may tell of
            # events before they joined (say) that history visibility hides.
            histories = events_store.get_membership_histories(txn, room_ids, user)
            settings = events_store.get_visibility_histories(txn, room_ids)
            ranges = {
                room_id: visible_ranges(
                    histories[room_id], [(p, normalise_visibility(v)) for p, v in settings[room_id]]
                )
                for room_id in room_ids
            }
            rows, total = search_store.search(
                txn, term_words, ranges, keys, order_by_rank=order_by == "rank", before=before, offset=offset, limit=limit
            )
            return rows, total, histories

        rows, total, histories = await self._db.read(find)
        found = await self._events.get_many([r[0] for r in rows])
        results: list[tuple[float, Event]] = []
        for event_id, _stream, rank in rows:
            event = found.get(event_id)
            if event is None or not flt.allows_event(event):
                continue
            room = await self._rooms.get(event.room_id)
            if room is None:
                continue
            if is_visible(event, user, histories[event.room_id], room.visibility):  # the query's ranges, checked again
                results.append((rank, event))

        now = now_ms()
        key = requester.device_key
        out_results = []
        for rank, event in results:
            room = await self._rooms.get(event.room_id)
            bundles = await self._bundler.bundle(
                [event], requester, histories[event.room_id], room.visibility if room else [], now
            )
            entry: dict[str, Any] = {"rank": rank, "result": event.client_fragment(now, key, bundles.get(event.event_id))}
            if context is not None:
                entry["context"] = await self._context(requester, event, context)
            out_results.append(entry)

        category: dict[str, Any] = {"count": total, "highlights": term_words, "results": out_results}
        if len(rows) == limit:
            category["next_batch"] = f"rank:{offset + limit}" if order_by == "rank" else f"recent:{rows[-1][1]}"
        if include_state:
            state: dict[str, Any] = {}
            for room_id in {e.room_id for _, e in results}:
                room = await self._rooms.get(room_id)
                if room is not None:
                    state[room_id] = [e.client_fragment(now, key) for e in room.state.values()]
            category["state"] = state
        if group_by_room:
            groups: dict[str, Any] = {}
            for order, (_, event) in enumerate(results):
                group = groups.setdefault(event.room_id, {"results": [], "order": order})
                group["results"].append(event.event_id)
            category["groups"] = {"room_id": groups}
        return {"search_categories": {"room_events": category}}

    async def _context(self, requester: Requester, event: Event, spec: dict[str, Any]) -> dict[str, Any]:
        before = _int(spec, "before_limit", 5, 20)
        after = _int(spec, "after_limit", 5, 20)
        include_profile = spec.get("include_profile", False)
        ctx = await self._reads.context(requester, event.room_id, event.event_id, before + after, EventFilter())
        now = now_ms()
        key = requester.device_key
        out: dict[str, Any] = {
            "events_before": [e.client_fragment(now, key) for e in ctx["events_before"][:before]],
            "events_after": [e.client_fragment(now, key) for e in ctx["events_after"][:after]],
            "start": ctx["start"],
            "end": ctx["end"],
        }
        if include_profile is True:
            profiles: dict[str, Any] = {}
            for state_event in ctx["state"]:
                if state_event.type == "m.room.member" and state_event.state_key is not None:
                    content = state_event.content
                    profile = {k: content[k] for k in ("displayname", "avatar_url") if isinstance(content.get(k), str)}
                    profiles[state_event.state_key] = profile
            senders = {event.sender} | {e.sender for e in ctx["events_before"] + ctx["events_after"]}
            out["profile_info"] = {s: profiles.get(s, {}) for s in senders}
        return out
