"""Push rules (CRUD and evaluation), unread counts, ``/notifications`` and pushers.

One evaluator decides, per user and event, what the user's push rules say; unread
counts in ``/sync``, the ``/notifications`` list and pushes to gateways all use it.

Unread counts are computed lazily, per (user, room), from the user's read position
(their newest own event or read receipt) and cached; new events are evaluated once
each as they are counted.

Pushers deliver to Matrix push gateways over HTTP. Because a pusher makes the server
send requests to a URL a user chose, gateways must match ``push.gateway_url_prefixes``
(empty by default: no HTTP pushers until the operator names the gateway).
"""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import orjson

from bastion.clock import now_ms
from bastion.core.auth_rules import user_power_level
from bastion.core.events import Event
from bastion.core.ids import is_valid_room_id, is_valid_user_id
from bastion.core.push_rules import (
    KINDS,
    EvalContext,
    default_ruleset,
    evaluate,
    notify_and_highlight,
)
from bastion.errors import BadJson, Forbidden, InvalidParam, MatrixError, NotFound
from bastion.services.account_data import AccountDataService
from bastion.services.caches import MembershipIndex, RoomCache, RoomSnapshot
from bastion.services.receipts import ReceiptsService
from bastion.services.requester import Requester
from bastion.storage import events as events_store
from bastion.storage import push as push_store
from bastion.storage.database import Database, Txn

log = logging.getLogger(__name__)

UNREAD_SCAN_LIMIT = 1000
NOTIFICATIONS_SCAN_LIMIT = 2000
VALID_ACTION_STRINGS = ("notify", "dont_notify", "coalesce")


@dataclass
class _Unread:
    read_pos: int
    counted_upto: int
    notifications: int = 0
    highlights: int = 0


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
        self._rulesets: OrderedDict[str, dict[str, Any]] = OrderedDict()
        self._unread: OrderedDict[tuple[str, str], _Unread] = OrderedDict()

    # -- rulesets ------------------------------------------------------------------------------

    async def ruleset(self, user_id: str) -> dict[str, Any]:
        cached = self._rulesets.get(user_id)
        if cached is not None:
            self._rulesets.move_to_end(user_id)
            return cached

        def load(txn: Txn) -> tuple[Any, Any]:
            return push_store.user_rules(txn, user_id), push_store.default_overrides(txn, user_id)

        user_rules, overrides = await self._db.read(load)
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
        self._rulesets[user_id] = ruleset
        if len(self._rulesets) > 10_000:
            self._rulesets.popitem(last=False)
        return ruleset

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

    async def _changed(self, user_id: str) -> None:
        self._rulesets.pop(user_id, None)
        for key in [k for k in self._unread if k[0] == user_id]:
            del self._unread[key]
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

    async def actions_for(self, user_id: str, event: Event, room: RoomSnapshot) -> list[Any] | None:
        if event.sender == user_id:
            return None
        if event.state_key is None and event.sender in await self._account_data.ignored_users(user_id):
            return None
        ruleset = await self.ruleset(user_id)
        member = room.state.get(("m.room.member", user_id))
        name = member.content.get("displayname") if member is not None else None
        pl = room.state.get(("m.room.power_levels", ""))
        levels = pl.content.get("notifications") if pl is not None else None
        ctx = EvalContext(
            user_id=user_id,
            display_name=name if isinstance(name, str) else None,
            member_count=len(room.joined),
            sender_level=user_power_level(event.sender, room.state),
            notification_levels={k: v for k, v in (levels or {}).items() if type(v) is int} if isinstance(levels, dict) else {},
        )
        return evaluate(ruleset, event.pdu, ctx)

    async def read_position(self, room: RoomSnapshot, user_id: str) -> int:
        return max(room.last_event_by.get(user_id, 0), await self._receipts.read_position(room.room_id, user_id))

    async def unread_counts(self, room: RoomSnapshot, user_id: str, upto: int) -> tuple[int, int]:
        read_pos = await self.read_position(room, user_id)
        key = (user_id, room.room_id)
        entry = self._unread.get(key)
        if entry is None or entry.read_pos != read_pos or entry.counted_upto > upto:
            entry = _Unread(read_pos=read_pos, counted_upto=read_pos)
        if entry.counted_upto < upto:
            events = room.events_after(entry.counted_upto, upto)
            if events is None:
                rows = await self._db.read(
                    events_store.get_room_events, room.room_id, after=entry.counted_upto, upto=upto,
                    limit=UNREAD_SCAN_LIMIT, backwards=True,
                )
                events = list(reversed(rows))
            for event in events:
                notify, highlight = notify_and_highlight(await self.actions_for(user_id, event, room))
                entry.notifications += notify
                entry.highlights += highlight
            entry.counted_upto = upto
        self._unread[key] = entry
        self._unread.move_to_end(key)
        if len(self._unread) > 200_000:
            self._unread.popitem(last=False)
        return entry.notifications, entry.highlights

    async def notifications(
        self, requester: Requester, from_token: str | None, limit: int, only: str | None
    ) -> dict[str, Any]:
        """GET /notifications: recent events that notified the user, newest first."""
        before = None
        if from_token:
            if not from_token.isdigit() or len(from_token) > 18:
                raise InvalidParam("Invalid 'from' token")
            before = int(from_token)
        if only not in (None, "highlight"):
            raise InvalidParam("'only' may only be 'highlight'")
        user = requester.user_id
        joined = [r for r, m in (await self._memberships.rooms_for(user)).items() if m.membership == "join"]
        rows = await self._db.read(
            events_store.recent_events_in_rooms, joined, before, NOTIFICATIONS_SCAN_LIMIT, user
        )
        out: list[dict[str, Any]] = []
        next_token = None
        now = now_ms()
        for event in rows:
            room = self._rooms.cached(event.room_id) or await self._rooms.get(event.room_id)
            if room is None:
                continue
            actions = await self.actions_for(user, event, room)
            notify, highlight = notify_and_highlight(actions)
            if not notify or (only == "highlight" and not highlight):
                continue
            out.append({
                "actions": actions,
                "event": event.client_fragment(now, requester.device_key),
                "read": event.stream_ordering <= await self.read_position(room, user),
                "room_id": event.room_id,
                "ts": event.origin_server_ts,
            })
            if len(out) >= limit:
                next_token = str(event.stream_ordering)
                break
        result: dict[str, Any] = {"notifications": out}
        if next_token is not None:
            result["next_token"] = next_token
        return result


class PusherService:
    def __init__(
        self,
        db: Database,
        rules: PushRulesService,
        rooms: RoomCache,
        gateway_prefixes: list[str],
        timeout_s: float = 10.0,
    ) -> None:
        self._db = db
        self._rules = rules
        self._rooms = rooms
        self._prefixes = gateway_prefixes
        self._timeout = timeout_s
        self._users: set[str] = set()
        self._client: Any = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        self._users = await self._db.read(push_store.users_with_pushers)

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

    # -- delivery --------------------------------------------------------------------------------

    def on_persisted(self, unit: Any) -> None:
        if not self._users:
            return
        room = unit.room
        targets = [u for u in room.joined if u in self._users]
        if not targets:
            return
        for event in unit.events:
            for user in targets:
                if user != event.sender:
                    task = asyncio.create_task(self._maybe_push(user, event, room))
                    self._tasks.add(task)
                    task.add_done_callback(self._tasks.discard)

    async def _maybe_push(self, user: str, event: Event, room: RoomSnapshot) -> None:
        try:
            actions = await self._rules.actions_for(user, event, room)
            notify, highlight = notify_and_highlight(actions)
            if not notify:
                return
            unread, _ = await self._rules.unread_counts(room, user, event.stream_ordering)
            for pusher in await self._db.read(push_store.pushers_for, user):
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
                        return
                    if 400 <= resp.status < 500:
                        log.warning("push gateway refused a notification for %s: %d", user, resp.status)
                        return
            except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
                log.info("push gateway error (attempt %d): %s", attempt + 1, exc)
            await asyncio.sleep(delay)
            delay *= 2

