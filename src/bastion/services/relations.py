"""Relationships between events: bundled aggregations, ``/relations`` and ``/threads``.

Bundled aggregations (``unsigned.m.relations``) are computed per response with one
query for all events in it: the latest valid edit (``m.replace``), the thread summary
(``m.thread``: latest event, count, whether the requester took part) and references
(``m.reference``). Children the requester may not see (history visibility) are left
out. As the spec allows, ``/sync`` bundles only in limited timelines.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from bastion.core.events import Event
from bastion.core.ids import is_valid_event_id, parse_digits
from bastion.core.visibility import is_visible, visible_at
from bastion.errors import InvalidParam, MatrixError, NotFound
from bastion.services.caches import EventCache
from bastion.services.requester import Requester
from bastion.storage import relations as relations_store
from bastion.storage.database import Database

if TYPE_CHECKING:
    from bastion.services.room_reads import RoomReadService
from bastion.streams.tokens import decode_pagination, encode_pagination

MAX_RECURSION = 3
Bundles = dict[str, dict[str, Any]]


class Bundler:
    """Computes bundled aggregations for a batch of events."""

    def __init__(self, db: Database, events: EventCache) -> None:
        self._db = db
        self._events = events

    async def bundle(
        self,
        events: Sequence[Event],
        requester: Requester,
        memberships: Sequence[tuple[int, str]],
        visibilities: Sequence[tuple[int, str]],
        now: int,
        depth: int = 0,
    ) -> Bundles:
        parents = [e for e in events if e.state_key is None]
        if not parents:
            return {}
        room_id = parents[0].room_id
        by_id = {e.event_id: e for e in parents}
        rows = await self._db.read(relations_store.children_of, room_id, list(by_id))
        rows = [r for r in rows if not r.has_state_key and visible_at(r.stream_ordering, memberships, visibilities)]
        if not rows:
            return {}
        out: Bundles = {}
        edits: dict[str, relations_store.ChildRow] = {}
        threads: dict[str, list[relations_store.ChildRow]] = {}
        for row in rows:
            parent = by_id[row.parent]
            if row.rel_type == "m.replace":
                if row.sender != parent.sender or row.type != parent.type or parent.redacted_because is not None:
                    continue
                best = edits.get(row.parent)
                if best is None or (row.origin_server_ts, row.event_id) > (best.origin_server_ts, best.event_id):
                    edits[row.parent] = row
            elif row.rel_type == "m.thread":
                threads.setdefault(row.parent, []).append(row)
            elif row.rel_type == "m.reference":
                out.setdefault(row.parent, {}).setdefault("m.reference", {"chunk": []})["chunk"].append(
                    {"event_id": row.event_id}
                )
        wanted = [r.event_id for r in edits.values()] + [t[-1].event_id for t in threads.values()]
        loaded = await self._events.get_many(wanted)
        latest_events = [loaded[t[-1].event_id] for t in threads.values() if t[-1].event_id in loaded]
        nested = (
            await self.bundle(latest_events, requester, memberships, visibilities, now, depth + 1)
            if latest_events and depth < 1
            else {}
        )
        device_key = requester.device_key
        for parent_id, row in edits.items():
            edit = loaded.get(row.event_id)
            if edit is not None:
                out.setdefault(parent_id, {})["m.replace"] = _as_json(edit, now, device_key, None)
        for parent_id, replies in threads.items():
            latest = loaded.get(replies[-1].event_id)
            if latest is None:
                continue
            participated = by_id[parent_id].sender == requester.user_id or any(
                r.sender == requester.user_id for r in replies
            )
            out.setdefault(parent_id, {})["m.thread"] = {
                "latest_event": _as_json(latest, now, device_key, nested.get(latest.event_id)),
                "count": len(replies),
                "current_user_participated": participated,
            }
        return out



class RelationsService:
    def __init__(self, db: Database, events: EventCache, reads: RoomReadService, bundler: Bundler) -> None:
        self._db = db
        self._events = events
        self._reads = reads
        self._bundler = bundler

    # -- /relations ---------------------------------------------------------------------------

    async def relations(
        self,
        requester: Requester,
        room_id: str,
        event_id: str,
        rel_type: str | None,
        event_type: str | None,
        *,
        from_token: str | None,
        to_token: str | None,
        limit: int,
        backwards: bool,
        recurse: bool,
    ) -> tuple[list[Event], str | None, int | None, Bundles, Any]:
        access = await self._reads.access(requester, room_id)
        parent = await self._events.get(event_id)
        if parent is None or parent.room_id != room_id or not is_visible(
            parent, requester.user_id, access.memberships, access.room.visibility
        ):
            raise NotFound("Event not found")
        position = decode_pagination(from_token, "from") if from_token else None
        boundary = decode_pagination(to_token, "to") if to_token else None
        if backwards:
            after, upto = boundary, position if position is not None else access.upto
        else:
            after, upto = position, boundary if boundary is not None else access.upto
        upto = min(upto, access.upto) if upto is not None else access.upto
        parents = [event_id]
        depth = 0
        ids: list[str] = []
        seen = {event_id}
        while parents:
            found = await self._db.read(
                relations_store.relating_events, room_id, parents, rel_type, event_type,
                after=after, upto=upto, backwards=backwards, limit=limit + 1 if not recurse else 10_000,
            )
            fresh = [i for i in found if i not in seen]
            seen.update(fresh)
            ids += fresh
            if not recurse or depth + 1 >= MAX_RECURSION:
                break
            depth += 1
            parents = fresh
        events = list((await self._events.get_many(ids)).values())
        events.sort(key=lambda e: e.stream_ordering, reverse=backwards)
        events = [e for e in events if is_visible(e, requester.user_id, access.memberships, access.room.visibility)]
        next_batch = None
        if len(events) > limit:
            events = events[:limit]
            last = events[-1].stream_ordering
            next_batch = encode_pagination(last - 1 if backwards else last)
        bundles = await self._bundler.bundle(events, requester, access.memberships, access.room.visibility, _now())
        return events, next_batch, (depth + 1 if recurse else None), bundles, access

    # -- /threads -------------------------------------------------------------------------------

    async def threads(
        self, requester: Requester, room_id: str, include: str, from_token: str | None, limit: int
    ) -> tuple[list[Event], str | None, Bundles]:
        if include not in ("all", "participated"):
            raise InvalidParam("'include' must be 'all' or 'participated'")
        access = await self._reads.access(requester, room_id)
        before = None
        if from_token:
            before = parse_digits(from_token[2:]) if from_token.startswith("th") else None
            if before is None:
                raise InvalidParam("Invalid 'from' token")
        rows = await self._db.read(
            relations_store.thread_roots, room_id, requester.user_id if include == "participated" else None,
            before, limit + 1,
        )
        roots = await self._events.get_many([r[0] for r in rows])
        chunk = []
        for root_id, _latest in rows[:limit]:
            root = roots.get(root_id)
            if root is not None and root.stream_ordering <= access.upto and is_visible(
                root, requester.user_id, access.memberships, access.room.visibility
            ):
                chunk.append(root)
        next_batch = f"th{rows[limit - 1][1]}" if len(rows) > limit else None
        bundles = await self._bundler.bundle(chunk, requester, access.memberships, access.room.visibility, _now())
        return chunk, next_batch, bundles

    # -- validation ------------------------------------------------------------------------------

    async def validate_new_event(self, event: Event, state: Any) -> None:
        """Relation rules checked before an event is stored.

        A thread may not start from an event that itself relates to another; a user may
        not annotate an event twice with the same type and key (until they redact the
        first: ``M_DUPLICATE_ANNOTATION``).
        """
        relates = event.content.get("m.relates_to")
        if not isinstance(relates, dict):
            return
        rel_type = relates.get("rel_type")
        target_id = relates.get("event_id")
        if not is_valid_event_id(target_id):
            return  # relates to nothing (storage/events.py: _relation)
        if rel_type == "m.thread":
            target = await self._events.get(target_id)
            target_rel = target.content.get("m.relates_to") if target is not None else None
            if isinstance(target_rel, dict) and target_rel.get("rel_type") is not None:
                raise MatrixError("Cannot start a thread from an event that has a relation", errcode="M_UNKNOWN", status=400)
        elif rel_type == "m.annotation" and event.state_key is None:
            await self._check_duplicate_annotation(event, target_id, relates.get("key"))

    async def _check_duplicate_annotation(self, event: Event, target_id: str, key: Any) -> None:
        if not isinstance(key, str):
            return
        ids = await self._db.read(
            relations_store.live_annotations, event.room_id, target_id, event.sender, event.type
        )
        if not ids:
            return
        for earlier in (await self._events.get_many(ids)).values():
            if earlier.redacted_because is not None:
                continue  # redacted since the query (the cached object knows first)
            rel = earlier.content.get("m.relates_to")
            if isinstance(rel, dict) and rel.get("key") == key:
                raise MatrixError(
                    "You have already sent this annotation to this event", errcode="M_DUPLICATE_ANNOTATION", status=400
                )


def _as_json(event: Event, now: int, device_key: tuple[str, str] | None, relations: dict[str, Any] | None) -> Any:
    import orjson

    return orjson.Fragment(event.client_bytes(now, device_key, relations))


def _now() -> int:
    from bastion.clock import now_ms

    return now_ms()
