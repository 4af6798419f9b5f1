"""Push rules (CRUD and evaluation), unread counts, ``/notifications`` and pushers.

Push rules are evaluated once per event, when it is persisted (:meth:`PushRulesService.decide`
is an :class:`~bastion.services.room_events.EventService` persist hook): for every member
joined at that moment (and an invitee), with the room state before the event — member
count, the sender's power level, the notification power levels, the member's display
name. One row per user the event notifies is written in the event's own transaction
(to a staging table that :meth:`PushRulesService.move_staged_rows` empties in batches;
see :mod:`bastion.storage.push_actions`), so counts are there the moment ``/sync`` can
see the event, and a later rule change or a restart never rewrites them.

Unread counts are the rows after the user's read position (their newest own event or
read receipt). They are kept per (user, room) and advanced from memory — each event's
decision is remembered for a while — falling back to one indexed query when memory
does not cover the range. ``/notifications`` reads the rows.

Pushers deliver to Matrix push gateways over HTTP. Because a pusher makes the server
send requests to a URL a user chose, gateways must match ``push.gateway_url_prefixes``
(empty by default: no HTTP pushers until the operator names the gateway). Unless
``push.full_notifications`` is on, every notification is sent in the ``event_id_only``
format whatever the pusher asked: no sender, content, display name or room name
leaves the server that way.
"""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson

from bastion.clock import now_ms
from bastion.core.auth_rules import user_power_level
from bastion.core.events import Event, StateKey, thread_root
from bastion.core.ids import is_valid_room_id, is_valid_user_id, parse_digits
from bastion.core.push_rules import (
    KINDS,
    CompiledRule,
    CompiledRuleset,
    EventEvaluator,
    compile_ruleset,
    default_ruleset,
    notify_and_highlight,
)
from bastion.errors import BadJson, Forbidden, InvalidParam, MatrixError, NotFound
from bastion.services.account_data import AccountDataService
from bastion.services.caches import MembershipIndex, RoomCache, RoomSnapshot
from bastion.services.receipts import ReceiptsService
from bastion.services.requester import Requester
from bastion.storage import events as events_store
from bastion.storage import push as push_store
from bastion.storage import push_actions as push_actions_store
from bastion.storage.database import Database, Txn

log = logging.getLogger(__name__)

VALID_ACTION_STRINGS = ("notify", "dont_notify", "coalesce")
MAX_RULESETS = 10_000
MAX_UNREAD_ENTRIES = 200_000
# Decisions remembered for recent events, counted in (user, event) pairs: enough for
# every room's recent events in memory, bounded for very large rooms.
MAX_REMEMBERED_PAIRS = 1_000_000
# How often rows written with their events are moved out of the staging table.
STAGING_MOVE_INTERVAL_S = 1.0


@dataclass(slots=True)
class UnreadCounts:
    """A user's unread notifications in one room: the main timeline and each thread."""

    notifications: int = 0
    highlights: int = 0
    threads: dict[str, list[int]] = field(default_factory=dict)  # root -> [notifications, highlights]

    def total(self) -> tuple[int, int]:
        """Main timeline and threads together (for clients that do not count threads apart)."""
        return (
            self.notifications + sum(t[0] for t in self.threads.values()),
            self.highlights + sum(t[1] for t in self.threads.values()),
        )


@dataclass(slots=True)
class _Unread:
    signature: tuple[Any, ...]
    counted_upto: int
    counts: UnreadCounts
    # thread root -> the user's newest post in it, read from the database (0: none)
    # because the room's memory did not hold it; valid for as long as the entry
    own_posts: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Decision:
    """Whom one event notified and highlighted (exactly the rows stored for it)."""

    notified: frozenset[str]
    highlighted: frozenset[str]


_NOBODY = Decision(frozenset(), frozenset())


def _validate_actions(actions: Any) -> list[Any]:
    if not isinstance(actions, list):
        raise BadJson("'actions' must be a list")
    for action in actions:
        if isinstance(action, str):
            if action not in VALID_ACTION_STRINGS:
                raise BadJson(f"unknown action {action!r}")
        elif isinstance(action, dict):
            if not isinstance(action.get("set_tweak"), str):
                raise BadJson("object actions need a 'set_tweak' string")
        else:
            raise BadJson("actions are strings or objects")
    return actions


class PushRulesService:
    def __init__(
        self,
        db: Database,
        rooms: RoomCache,
        memberships: MembershipIndex,
        receipts: ReceiptsService,
        account_data: AccountDataService,
    ) -> None:
        self._db = db
        self._rooms = rooms
        self._memberships = memberships
        self._receipts = receipts
        self._account_data = account_data
        self._rulesets: OrderedDict[str, tuple[dict[str, Any], CompiledRuleset]] = OrderedDict()
        self._rules_changes = 0  # bumped on every rule change: a load that raced one is not cached
        # (user, room) -> (main timeline, threads), each counted from its own read position
        self._unread: OrderedDict[tuple[str, str], tuple[_Unread, _Unread]] = OrderedDict()
        self._decisions: dict[str, Decision] = {}  # event ID -> decision, oldest first
        self._remembered_pairs = 0
        self._staged = True  # rows may be waiting in the staging table (at start: maybe)

    # -- rulesets ------------------------------------------------------------------------------

    async def ruleset(self, user_id: str) -> dict[str, Any]:
        return (await self._rulesets_for([user_id]))[user_id][0]

    async def _rulesets_for(self, user_ids: Collection[str]) -> dict[str, tuple[dict[str, Any], CompiledRuleset]]:
        """Rulesets (and their compiled form) of many users; the missing ones in one read."""
        out: dict[str, tuple[dict[str, Any], CompiledRuleset]] = {}
        missing: list[str] = []
        cache = self._rulesets
        for user_id in user_ids:
            cached = cache.get(user_id)
            if cached is None:
                missing.append(user_id)
            else:
                cache.move_to_end(user_id)
                out[user_id] = cached
        if not missing:
            return out
        changes = self._rules_changes

        def load(txn: Txn) -> dict[str, tuple[Any, Any]]:
            return {u: (push_store.user_rules(txn, u), push_store.default_overrides(txn, u)) for u in missing}

        for user_id, (user_rules, overrides) in (await self._db.read(load)).items():
            ruleset = _merge_ruleset(user_id, user_rules, overrides)
            entry = (ruleset, compile_ruleset(ruleset, user_id))
            out[user_id] = entry
            if changes == self._rules_changes:
                cache[user_id] = entry
        while len(cache) > MAX_RULESETS:
            cache.popitem(last=False)
        return out

    def _find(self, ruleset: dict[str, Any], kind: str, rule_id: str) -> dict[str, Any] | None:
        return next((r for r in ruleset["global"].get(kind, []) if r.get("rule_id") == rule_id), None)

    @staticmethod
    def check_kind(scope: str, kind: str) -> None:
        if scope != "global":
            raise InvalidParam("The only push rule scope is 'global'")
        if kind not in KINDS:
            raise InvalidParam(f"Unknown push rule kind {kind!r}")

    async def get_rule(self, user_id: str, kind: str, rule_id: str) -> dict[str, Any]:
        rule = self._find(await self.ruleset(user_id), kind, rule_id)
        if rule is None:
            raise NotFound("Push rule not found")
        return rule

    def forget_user(self, user_id: str) -> None:
        """Another worker changed the user's rules: load them again when next needed."""
        self._rules_changes += 1
        self._rulesets.pop(user_id, None)

    async def _changed(self, user_id: str) -> None:
        # Only events that arrive from now on see the new rules: stored decisions stay.
        self._rules_changes += 1
        self._rulesets.pop(user_id, None)
        await self._account_data.put(user_id, "", "m.push_rules", await self.ruleset(user_id))

    async def put_rule(
        self, user_id: str, kind: str, rule_id: str, body: dict[str, Any], before: str | None, after: str | None
    ) -> None:
        if rule_id.startswith("."):
            raise InvalidParam("Rule IDs starting with '.' are reserved for server-default rules")
        if not rule_id or len(rule_id) > 255 or "\x00" in rule_id or "/" in rule_id or "\\" in rule_id:
            raise InvalidParam("Invalid rule ID")
        actions = _validate_actions(body.get("actions"))
        rule: dict[str, Any] = {"rule_id": rule_id, "default": False, "enabled": True, "actions": actions}
        if kind in ("override", "underride"):
            conditions = body.get("conditions", [])
            if not isinstance(conditions, list) or not all(isinstance(c, dict) and isinstance(c.get("kind"), str) for c in conditions):
                raise BadJson("'conditions' must be a list of condition objects")
            rule["conditions"] = conditions
        elif kind == "content":
            pattern = body.get("pattern")
            if not isinstance(pattern, str) or not pattern:
                raise BadJson("content rules need a 'pattern' string")
            rule["pattern"] = pattern
        elif kind == "room" and not is_valid_room_id(rule_id):
            raise InvalidParam("room rules are named by a room ID")
        elif kind == "sender" and not is_valid_user_id(rule_id):
            raise InvalidParam("sender rules are named by a user ID")
        for anchor in (before, after):
            if anchor is not None and anchor.startswith("."):
                raise MatrixError("before/after may not name a server-default rule", errcode="M_UNKNOWN", status=400)

        def txn_fn(txn: Txn) -> None:
            existing = [r for r in push_store.user_rules(txn, user_id) if r[0] == kind]
            order = [r[1] for r in existing if r[1] != rule_id]
            current = next((r for r in existing if r[1] == rule_id), None)
            if current is not None and "enabled" in current[3]:
                rule["enabled"] = current[3]["enabled"]
            if before is not None or after is not None:
                anchor = before if before is not None else after
                if anchor not in order:
                    raise MatrixError(f"before/after rule not found: {anchor}", errcode="M_UNKNOWN", status=400)
                position = order.index(anchor) + (0 if before is not None else 1)
            elif current is not None:
                position = [r[1] for r in existing].index(rule_id)
            else:
                position = 0  # new rules go first, the highest priority of their kind
            order.insert(position, rule_id)
            rules = {r[1]: r[3] for r in existing}
            rules[rule_id] = rule
            for index, rid in enumerate(order):
                push_store.put_user_rule(txn, user_id, kind, rid, len(order) - index, rules[rid])

        await self._db.write(txn_fn)
        await self._changed(user_id)

    async def delete_rule(self, user_id: str, kind: str, rule_id: str) -> None:
        if rule_id.startswith("."):
            raise MatrixError("Server-default rules cannot be deleted", errcode="M_UNKNOWN", status=400)
        if not await self._db.write(push_store.delete_user_rule, user_id, kind, rule_id):
            raise NotFound("Push rule not found")
        await self._changed(user_id)

    async def set_enabled(self, user_id: str, kind: str, rule_id: str, enabled: Any) -> None:
        if not isinstance(enabled, bool):
            raise BadJson("'enabled' must be a boolean")
        rule = await self.get_rule(user_id, kind, rule_id)
        await self._update(user_id, kind, rule, enabled=enabled)

    async def set_actions(self, user_id: str, kind: str, rule_id: str, actions: Any) -> None:
        _validate_actions(actions)
        rule = await self.get_rule(user_id, kind, rule_id)
        await self._update(user_id, kind, rule, actions=actions)

    async def _update(self, user_id: str, kind: str, rule: dict[str, Any], *, enabled: bool | None = None, actions: list[Any] | None = None) -> None:
        rule_id = rule["rule_id"]
        if rule.get("default"):
            new_enabled = rule.get("enabled", True) if enabled is None else enabled
            overrides = await self._db.read(push_store.default_overrides, user_id)
            new_actions = actions if actions is not None else (overrides.get(rule_id, (True, None))[1])
            await self._db.write(push_store.put_default_override, user_id, rule_id, new_enabled, new_actions)
        else:

            def txn_fn(txn: Txn) -> None:
                for k, rid, priority, stored in push_store.user_rules(txn, user_id):
                    if k == kind and rid == rule_id:
                        if enabled is not None:
                            stored["enabled"] = enabled
                        if actions is not None:
                            stored["actions"] = actions
                        push_store.put_user_rule(txn, user_id, kind, rid, priority, stored)

            await self._db.write(txn_fn)
        await self._changed(user_id)

    # -- evaluation ---------------------------------------------------------------------------------

    async def decide(
        self, event: Event, state: Mapping[StateKey, Event], joined: Collection[str]
    ) -> Callable[[Txn], None] | None:
        """Persist hook: evaluate ``event`` for its recipients; returns the rows' write.

        ``state`` is the room state before the event and ``joined`` its joined members.
        Recipients are the joined members but the sender, plus the target of an invite;
        users who ignore the sender get nothing for their messages or invites.
        """
        recipients = [u for u in joined if u != event.sender]
        if event.type == "m.room.member" and event.membership == "invite":
            target = event.state_key
            if target is not None and target != event.sender and target not in joined:
                recipients.append(target)
        if not recipients:
            self._remember(event.event_id, _NOBODY)
            return None
        rulesets = await self._rulesets_for(recipients)
        ignored = await self._account_data.ignored_users_many(recipients)
        pl = state.get(("m.room.power_levels", ""))
        levels = pl.content.get("notifications") if pl is not None else None
        evaluator = EventEvaluator(
            event.pdu,
            len(joined),
            user_power_level(event.sender, state),
            {k: v for k, v in levels.items() if type(v) is int} if isinstance(levels, dict) else {},
        )
        sender = event.sender
        notified: list[tuple[str, CompiledRule]] = []
        for user in recipients:
            if sender in ignored[user] and (event.state_key is None or event.state_key == user):
                continue
            compiled = rulesets[user][1]
            name = None
            if compiled.needs_name:
                member = state.get(("m.room.member", user))
                name = member.content.get("displayname") if member is not None else None
            rule = evaluator.first_match(compiled, user, name if isinstance(name, str) else None)
            if rule is not None and rule.notify:
                notified.append((user, rule))
        self._remember(
            event.event_id,
            Decision(frozenset(u for u, _ in notified), frozenset(u for u, r in notified if r.highlight))
            if notified
            else _NOBODY,
        )
        if not notified:
            return None
        encoded: dict[int, str] = {}
        for _, rule in notified:
            if id(rule) not in encoded:
                encoded[id(rule)] = orjson.dumps(list(rule.actions)).decode()

        thread = thread_root(event)

        def write(txn: Txn) -> None:
            # Runs inside the event's transaction, after its stream ordering is assigned.
            push_actions_store.insert_push_actions(txn, [
                (user, event.room_id, event.event_id, event.stream_ordering, rule.highlight, encoded[id(rule)], thread)
                for user, rule in notified
            ])
            txn.after_commit.append(self._note_staged)

        return write

    def _note_staged(self) -> None:
        self._staged = True  # on the writer thread, after the commit: a plain flag is enough

    async def move_staged_rows(self, interval_s: float = STAGING_MOVE_INTERVAL_S) -> None:
        """Background task: move staged rows to the per-user table, a batch at a time.

        The event's own commit appends its rows to the staging table, ordered by stream
        position; moving a second's worth at once writes each member's pages once per
        batch instead of once per message. Readers look at both tables, so this changes
        nothing anyone sees.
        """
        while True:
            if self._staged:
                self._staged = False
                try:
                    await self._db.write(push_actions_store.move_staged)
                except asyncio.CancelledError:
                    raise
                except Exception as exc:
                    self._staged = True
                    log.warning("moving staged push actions failed (will retry): %s", exc)
            await asyncio.sleep(interval_s)

    def decision(self, event_id: str) -> Decision | None:
        """What the rules decided for a recent event, or None if no longer remembered."""
        return self._decisions.get(event_id)

    def remember_remote(self, events: Sequence[Event], decisions: dict[str, tuple[list[str], list[str]]]) -> None:
        """Decisions another worker made for ``events`` (their stored rows), so unread
        counts over them are counted in memory here too."""
        for event in events:
            found = decisions.get(event.event_id)
            self._remember(
                event.event_id, Decision(frozenset(found[0]), frozenset(found[1])) if found else _NOBODY
            )

    def _remember(self, event_id: str, decision: Decision) -> None:
        decisions = self._decisions
        if event_id in decisions:
            return
        decisions[event_id] = decision
        self._remembered_pairs += 1 + len(decision.notified)
        while self._remembered_pairs > MAX_REMEMBERED_PAIRS and decisions:
            oldest = next(iter(decisions))
            self._remembered_pairs -= 1 + len(decisions.pop(oldest).notified)

    async def _read_positions(self, room: RoomSnapshot, user_id: str) -> tuple[int, int, dict[str, int]]:
        """(unthreaded receipt, main timeline, {thread root: position}) of what the user
        has read, as far as the room's memory tells: the main timeline up to their
        unthreaded or ``main`` receipt or their own newest message outside threads; a
        thread up to their receipt in it or their own newest post in it (spec: sending an
        event updates the sender's read receipt) — posts no longer in memory are looked
        up by the caller, when it needs them (:meth:`_look_up_thread_posts`)."""
        unthreaded, main, threads = await self._receipts.read_positions(room.room_id, user_id)
        for root, position in room.thread_posts.get(user_id, {}).items():
            if position > threads.get(root, 0):
                threads[root] = position
        return unthreaded, max(unthreaded, main, room.last_event_by.get(user_id, 0)), threads

    async def unread_counts(self, room: RoomSnapshot, user_id: str, upto: int) -> UnreadCounts:
        """Notifications the user has not read, counting events up to ``upto``.

        The main timeline is read up to the user's unthreaded or ``main`` receipt (or
        their own last message outside threads); a thread up to their unthreaded
        receipt, their receipt in that thread or their own last post in it.
        """
        return (await self.unread_counts_many([room], user_id, upto))[room.room_id]

    async def unread_counts_many(self, rooms: Collection[RoomSnapshot], user_id: str, upto: int) -> dict[str, UnreadCounts]:
        """:meth:`unread_counts` for several rooms, with at most one database transaction.

        The main timeline and the threads are counted apart, each from its own read
        position: the user's own message moves the main timeline's position, and must
        not send the threads' count (which may start at the beginning of the room when
        the user never sent a receipt) back to the database.
        """
        plans: list[tuple[RoomSnapshot, _Unread, _Unread, dict[str, int]]] = []
        for room in rooms:
            unthreaded, main_read, threads = await self._read_positions(room, user_id)
            current = self._unread.get((user_id, room.room_id))
            main_entry = current[0] if current is not None else None
            if main_entry is None or main_entry.signature != (main_read,) or main_entry.counted_upto > upto:
                main_entry = _Unread((main_read,), counted_upto=main_read, counts=UnreadCounts())
            thread_sig = (unthreaded, tuple(sorted(threads.items())))
            thread_entry = current[1] if current is not None else None
            if thread_entry is None or thread_entry.signature != thread_sig or thread_entry.counted_upto > upto:
                thread_entry = _Unread(thread_sig, counted_upto=unthreaded, counts=UnreadCounts())
            plans.append((room, main_entry, thread_entry, threads))
        rows: dict[str, list[tuple[int, bool, str | None]]] = {}
        from_db: list[tuple[str, int]] = []
        for room, main_entry, thread_entry, _ in plans:
            after = min(main_entry.counted_upto, thread_entry.counted_upto)
            if after < upto:
                found = self._rows_in_memory(room, user_id, after, upto)
                if found is None:
                    from_db.append((room.room_id, after))
                else:
                    rows[room.room_id] = found
        if from_db:
            rows.update(await self._db.read(push_actions_store.unread_rows_many, user_id, from_db, upto))
        await self._look_up_thread_posts(user_id, plans, rows)
        out: dict[str, UnreadCounts] = {}
        for room, main_entry, thread_entry, threads in plans:
            main_counts, thread_counts = main_entry.counts, thread_entry.counts
            own_posts = thread_entry.own_posts
            for stream, highlight, thread in rows.get(room.room_id, ()):
                if thread is None:
                    if stream > main_entry.counted_upto:  # counted_upto >= main_read
                        main_counts.notifications += 1
                        main_counts.highlights += highlight
                elif (
                    stream > thread_entry.counted_upto
                    and stream > threads.get(thread, 0)
                    and stream > own_posts.get(thread, 0)
                ):
                    per = thread_counts.threads.setdefault(thread, [0, 0])
                    per[0] += 1
                    per[1] += highlight
            main_entry.counted_upto = max(main_entry.counted_upto, upto)
            thread_entry.counted_upto = max(thread_entry.counted_upto, upto)
            key = (user_id, room.room_id)
            self._unread[key] = (main_entry, thread_entry)
            self._unread.move_to_end(key)
            out[room.room_id] = UnreadCounts(main_counts.notifications, main_counts.highlights, thread_counts.threads)
        while len(self._unread) > MAX_UNREAD_ENTRIES:
            self._unread.popitem(last=False)
        return out

    async def _look_up_thread_posts(
        self,
        user_id: str,
        plans: list[tuple[RoomSnapshot, _Unread, _Unread, dict[str, int]]],
        rows: dict[str, list[tuple[int, bool, str | None]]],
    ) -> None:
        """Find the user's posts in the threads about to be counted whose newest post
        the room's memory does not hold (one transaction for all; remembered in the
        count's entry). Threads nobody notified the user in cost nothing."""
        wanted: dict[tuple[str, str], _Unread] = {}
        for room, _, thread_entry, threads in plans:
            posts = room.thread_posts.get(user_id, {})
            for stream, _, thread in rows.get(room.room_id, ()):
                if (
                    thread is not None
                    and stream > thread_entry.counted_upto
                    and stream > threads.get(thread, 0)
                    and thread not in posts
                    and thread not in thread_entry.own_posts
                ):
                    wanted[(room.room_id, thread)] = thread_entry
        if wanted:
            found = await self._db.read(events_store.last_thread_posts, user_id, list(wanted))
            for key, entry in wanted.items():
                entry.own_posts[key[1]] = found.get(key, 0)

    def _rows_in_memory(self, room: RoomSnapshot, user_id: str, after: int, upto: int) -> list[tuple[int, bool, str | None]] | None:
        """(stream, highlight, thread root) of the user's notifications in (after, upto],
        or None unless every event there and its push decision is remembered."""
        events = room.events_after(after, upto)
        if events is None:
            return None
        rows: list[tuple[int, bool, str | None]] = []
        for event in events:
            decision = self._decisions.get(event.event_id)
            if decision is None:
                return None
            if user_id in decision.notified:
                rows.append((event.stream_ordering, user_id in decision.highlighted, thread_root(event)))
        return rows

    async def notifications(
        self, requester: Requester, from_token: str | None, limit: int, only: str | None
    ) -> dict[str, Any]:
        """GET /notifications: the stored notifications, newest first (rooms the user is in)."""
        before = None
        if from_token:
            before = parse_digits(from_token)
            if before is None:
                raise InvalidParam("Invalid 'from' token")
        if only not in (None, "highlight"):
            raise InvalidParam("'only' may only be 'highlight'")
        user = requester.user_id
        rows = await self._db.read(push_actions_store.notifications_for, user, before, limit + 1, only == "highlight")
        rows_out = rows[:limit]
        roots = [thread_root(row.event) for row in rows_out]
        # room -> (unthreaded, main timeline, per thread) read positions (see _read_positions)
        positions: dict[str, tuple[int, int, dict[str, int]]] = {}
        in_memory: dict[str, dict[str, int]] = {}  # room -> the user's thread posts it holds
        unknown: list[tuple[str, str]] = []  # (room, thread) whose own newest post is not in memory
        for row, root in zip(rows_out, roots, strict=True):
            if row.room_id not in positions:
                room = self._rooms.cached(row.room_id) or await self._rooms.get(row.room_id)
                positions[row.room_id] = await self._read_positions(room, user) if room is not None else (0, 0, {})
                in_memory[row.room_id] = room.thread_posts.get(user, {}) if room is not None else {}
            if root is not None and root not in in_memory[row.room_id] and (row.room_id, root) not in unknown:
                unknown.append((row.room_id, root))
        if unknown:
            for (room_id, root), position in (await self._db.read(events_store.last_thread_posts, user, unknown)).items():
                threads = positions[room_id][2]
                threads[root] = max(threads.get(root, 0), position)
        out: list[dict[str, Any]] = []
        now = now_ms()
        for row, root in zip(rows_out, roots, strict=True):
            unthreaded, main_read, threads = positions[row.room_id]
            read_pos = main_read if root is None else max(unthreaded, threads.get(root, 0))
            out.append({
                "actions": row.actions,
                "event": row.event.client_fragment(now, requester.device_key),
                "read": row.stream_ordering <= read_pos,
                "room_id": row.room_id,
                "ts": row.event.origin_server_ts,
            })
        result: dict[str, Any] = {"notifications": out}
        if len(rows) > limit and out:
            result["next_token"] = str(rows[limit - 1].stream_ordering)
        return result


def _merge_ruleset(user_id: str, user_rules: list[tuple[str, str, int, dict[str, Any]]], overrides: dict[str, Any]) -> dict[str, Any]:
    """The server defaults (with the user's changes to them) and the user's own rules."""
    ruleset = default_ruleset(user_id)
    rules = ruleset["global"]
    for kind in KINDS:
        for rule in rules[kind]:
            override = overrides.get(rule["rule_id"])
            if override is not None:
                rule["enabled"] = override[0]
                if override[1] is not None:
                    rule["actions"] = override[1]
    custom: dict[str, list[dict[str, Any]]] = {k: [] for k in KINDS}
    for kind, _rule_id, _priority, rule in user_rules:
        if kind in custom:
            custom[kind].append(rule)
    for kind in KINDS:
        defaults = rules[kind]
        if kind == "override":
            master = [r for r in defaults if r["rule_id"] == ".m.rule.master"]
            rest = [r for r in defaults if r["rule_id"] != ".m.rule.master"]
            rules[kind] = master + custom[kind] + rest
        else:
            rules[kind] = custom[kind] + defaults
    return ruleset


class PusherService:
    def __init__(
        self,
        db: Database,
        rules: PushRulesService,
        rooms: RoomCache,
        gateway_prefixes: list[str],
        timeout_s: float = 10.0,
        full_notifications: bool = False,
    ) -> None:
        self._db = db
        self._rules = rules
        self._rooms = rooms
        self._prefixes = gateway_prefixes
        self._full = full_notifications
        self._timeout = timeout_s
        self._users: set[str] = set()
        self.bus: Any = None  # with several workers: tell the others who has pushers
        self._client: Any = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        """Load (or reload) which users have pushers."""
        self._users = await self._db.read(push_store.users_with_pushers)

    async def _announce(self) -> None:
        if self.bus is not None:
            await self.bus.publish("pushers", {})

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        if self._client is not None:
            await self._client.close()

    def _allowed(self, url: str) -> bool:
        return any(url.startswith(prefix) for prefix in self._prefixes)

    async def all(self, requester: Requester) -> list[dict[str, Any]]:
        return await self._db.read(push_store.pushers_for, requester.user_id)

    async def set(self, requester: Requester, body: dict[str, Any]) -> None:
        def text(key: str, max_len: int, required: bool = True) -> str | None:
            value = body.get(key)
            if value is None and not required:
                return None
            if not isinstance(value, str) or not value or len(value) > max_len or "\x00" in value:
                raise BadJson(f"'{key}' must be a non-empty string of at most {max_len} characters")
            return value

        pushkey = text("pushkey", 512)
        app_id = text("app_id", 64)
        assert pushkey is not None and app_id is not None
        kind = body.get("kind")
        if kind is None:
            if await self._db.write(push_store.delete_pusher, requester.user_id, app_id, pushkey):
                self._users = await self._db.read(push_store.users_with_pushers)
                await self._announce()
            return
        if kind not in ("http", "email"):
            raise BadJson("'kind' must be 'http', 'email' or null")
        if kind == "email":
            raise Forbidden("Email notifications are not supported by this server")
        data = body.get("data")
        if not isinstance(data, dict):
            raise BadJson("'data' must be an object")
        url = data.get("url")
        if not isinstance(url, str) or not url.endswith("/_matrix/push/v1/notify"):
            raise BadJson("'data.url' must be a push gateway URL ending in /_matrix/push/v1/notify")
        if not self._allowed(url):
            raise Forbidden("This push gateway is not allowed by the server's configuration")
        fmt = data.get("format")
        if fmt is not None and fmt != "event_id_only":
            raise BadJson("'data.format' may only be 'event_id_only'")
        append = body.get("append", False)
        if not isinstance(append, bool):
            raise BadJson("'append' must be a boolean")
        pusher = {
            "pushkey": pushkey,
            "kind": kind,
            "app_id": app_id,
            "app_display_name": text("app_display_name", 256),
            "device_display_name": text("device_display_name", 256),
            "lang": text("lang", 64),
            "data": data,
        }
        profile_tag = text("profile_tag", 64, required=False)
        if profile_tag is not None:
            pusher["profile_tag"] = profile_tag
        await self._db.write(
            push_store.put_pusher, requester.user_id, app_id, pushkey, requester.device_id, pusher, now_ms(), append
        )
        self._users = await self._db.read(push_store.users_with_pushers)
        await self._announce()

    # -- delivery --------------------------------------------------------------------------------

    def on_persisted(self, unit: Any) -> None:
        if not self._users:
            return
        room = unit.room
        for event in unit.events:
            decision = self._rules.decision(event.event_id)
            if decision is not None:
                targets = [u for u in decision.notified if u in self._users]
            else:  # no longer remembered: the stored rows decide in _maybe_push
                targets = [u for u in room.joined if u in self._users and u != event.sender]
            for user in targets:
                task = asyncio.create_task(self._maybe_push(user, event, room))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)

    async def _maybe_push(self, user: str, event: Event, room: RoomSnapshot) -> None:
        try:

            def load(txn: Txn) -> tuple[list[Any] | None, list[dict[str, Any]]]:
                actions = push_actions_store.actions_for(txn, user, event.stream_ordering)
                return actions, (push_store.pushers_for(txn, user) if actions is not None else [])

            actions, pushers = await self._db.read(load)
            notify, highlight = notify_and_highlight(actions)
            if not notify:
                return
            unread, _ = (await self._rules.unread_counts(room, user, event.stream_ordering)).total()
            for pusher in pushers:
                await self._deliver(user, pusher, event, room, actions or [], highlight, unread)
        except Exception:
            log.exception("push to %s failed", user)

    async def _deliver(
        self, user: str, pusher: dict[str, Any], event: Event, room: RoomSnapshot, actions: list[Any], highlight: bool, unread: int
    ) -> None:
        import aiohttp

        data = dict(pusher["data"])
        url = data.pop("url")
        if not self._allowed(url):
            return
        if not self._full:
            # The gateway (and the phone vendor's push service behind it) learns which
            # event to fetch, nothing of what it says or who sent it. The device data
            # says so too, so the gateway builds its push from what it got.
            data["format"] = "event_id_only"
        tweaks = {a["set_tweak"]: a.get("value", True) for a in actions if isinstance(a, dict) and "set_tweak" in a}
        device = {"app_id": pusher["app_id"], "pushkey": pusher["pushkey"], "pushkey_ts": event.origin_server_ts // 1000, "data": data, "tweaks": tweaks}
        notification: dict[str, Any] = {
            "event_id": event.event_id,
            "room_id": event.room_id,
            "counts": {"unread": unread},
            "prio": "high" if highlight or event.type in ("m.room.encrypted", "m.call.invite") else "low",
            "devices": [device],
        }
        if data.get("format") != "event_id_only":
            notification["type"] = event.type
            notification["sender"] = event.sender
            notification["content"] = event.content
            sender_member = room.state.get(("m.room.member", event.sender))
            name = sender_member.content.get("displayname") if sender_member is not None else None
            if isinstance(name, str):
                notification["sender_display_name"] = name
            room_name = room.state.get(("m.room.name", ""))
            if room_name is not None and isinstance(room_name.content.get("name"), str):
                notification["room_name"] = room_name.content["name"]
        if self._client is None:
            self._client = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self._timeout), trust_env=False)
        delay = 1.0
        for attempt in range(5):
            try:
                async with self._client.post(
                    url,
                    data=orjson.dumps({"notification": notification}),
                    headers={"Content-Type": "application/json"},
                    allow_redirects=False,
                ) as resp:
                    if resp.status == 200:
                        answer = await resp.json(content_type=None)
                        rejected = answer.get("rejected", []) if isinstance(answer, dict) else []
                        if pusher["pushkey"] in rejected:
                            await self._db.write(push_store.delete_pushers_by_key, pusher["app_id"], pusher["pushkey"])
                            self._users = await self._db.read(push_store.users_with_pushers)
                            await self._announce()
                        return
                    if 400 <= resp.status < 500:
                        log.warning("push gateway refused a notification for %s: %d", user, resp.status)
                        return
            except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
                log.info("push gateway error (attempt %d): %s", attempt + 1, exc)
            await asyncio.sleep(delay)
            delay *= 2

