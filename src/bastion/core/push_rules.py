"""Push rules: the spec's server-default rule set (Matrix v1.17) and the evaluator.

:func:`default_ruleset` gives a user's server-default rules; user rules are merged
in by the push service. :func:`evaluate` runs a ruleset against an event exactly as
the spec's "Push Rules" section describes (override, content, room, sender,
underride; the first match wins; ``.m.rule.master`` first of all), and feeds unread
counts, ``/notifications`` and pushers alike.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from typing import Any

_SOUND = {"set_tweak": "sound", "value": "default"}
_HIGHLIGHT = {"set_tweak": "highlight"}


def _rule(rule_id: str, conditions: list[dict[str, Any]], actions: list[Any], enabled: bool = True) -> dict[str, Any]:
    return {"rule_id": rule_id, "default": True, "enabled": enabled, "conditions": conditions, "actions": actions}


def _match(key: str, pattern: str) -> dict[str, Any]:
    return {"kind": "event_match", "key": key, "pattern": pattern}


def default_ruleset(user_id: str) -> dict[str, Any]:
    override = [
        _rule(".m.rule.master", [], [], enabled=False),
        _rule(".m.rule.suppress_notices", [_match("content.msgtype", "m.notice")], []),
        _rule(
            ".m.rule.invite_for_me",
            [_match("type", "m.room.member"), _match("content.membership", "invite"), _match("state_key", user_id)],
            ["notify", _SOUND],
        ),
        _rule(".m.rule.member_event", [_match("type", "m.room.member")], []),
        _rule(
            ".m.rule.is_user_mention",
            [{"kind": "event_property_contains", "key": "content.m\\.mentions.user_ids", "value": user_id}],
            ["notify", _SOUND, _HIGHLIGHT],
        ),
        _rule(
            ".m.rule.is_room_mention",
            [
                {"kind": "event_property_is", "key": "content.m\\.mentions.room", "value": True},
                {"kind": "sender_notification_permission", "key": "room"},
            ],
            ["notify", _HIGHLIGHT],
        ),
        _rule(".m.rule.tombstone", [_match("type", "m.room.tombstone"), _match("state_key", "")], ["notify", _HIGHLIGHT]),
        _rule(".m.rule.reaction", [_match("type", "m.reaction")], []),
        _rule(".m.rule.room.server_acl", [_match("type", "m.room.server_acl"), _match("state_key", "")], []),
        _rule(
            ".m.rule.suppress_edits",
            [{"kind": "event_property_is", "key": "content.m\\.relates_to.rel_type", "value": "m.replace"}],
            [],
        ),
    ]
    underride = [
        _rule(".m.rule.call", [_match("type", "m.call.invite")], ["notify", {"set_tweak": "sound", "value": "ring"}]),
        _rule(
            ".m.rule.encrypted_room_one_to_one",
            [{"kind": "room_member_count", "is": "2"}, _match("type", "m.room.encrypted")],
            ["notify", _SOUND],
        ),
        _rule(
            ".m.rule.room_one_to_one",
            [{"kind": "room_member_count", "is": "2"}, _match("type", "m.room.message")],
            ["notify", _SOUND],
        ),
        _rule(".m.rule.message", [_match("type", "m.room.message")], ["notify"]),
        _rule(".m.rule.encrypted", [_match("type", "m.room.encrypted")], ["notify"]),
    ]
    return {"global": {"override": override, "content": [], "room": [], "sender": [], "underride": underride}}


# -- evaluation ---------------------------------------------------------------------------------

KINDS = ("override", "content", "room", "sender", "underride")
_IS_RE = re.compile(r"^(==|<=|>=|<|>)?([0-9]+)$")


def _dot_path(key: str) -> list[str]:
    parts: list[str] = []
    current: list[str] = []
    i = 0
    while i < len(key):
        ch = key[i]
        if ch == "\\" and i + 1 < len(key) and key[i + 1] in ".\\":
            current.append(key[i + 1])
            i += 2
            continue
        if ch == ".":
            parts.append("".join(current))
            current = []
        else:
            current.append(ch)
        i += 1
    parts.append("".join(current))
    return parts


def _lookup(event: dict[str, Any], key: str) -> Any:
    value: Any = event
    for part in _dot_path(key):
        if not isinstance(value, dict) or part not in value:
            return _MISSING
        value = value[part]
    return value


_MISSING = object()


@functools.lru_cache(maxsize=4096)
def _glob(pattern: str, word_boundary: bool) -> re.Pattern[str]:
    body = "".join(".*" if c == "*" else "." if c == "?" else re.escape(c) for c in pattern)
    if word_boundary:
        return re.compile(r"(?:^|[^A-Za-z0-9_])" + body + r"(?:$|[^A-Za-z0-9_])", re.IGNORECASE | re.DOTALL)
    return re.compile(r"\A" + body + r"\Z", re.IGNORECASE | re.DOTALL)


def _scalar(value: Any) -> bool:
    return value is None or isinstance(value, bool | str) or (isinstance(value, int) and -(2**53) < value < 2**53)


@dataclass(frozen=True)
class EvalContext:
    """What conditions need besides the event."""

    user_id: str
    display_name: str | None
    member_count: int
    sender_level: int
    notification_levels: dict[str, int]


def condition_matches(cond: Any, event: dict[str, Any], ctx: EvalContext) -> bool:
    if not isinstance(cond, dict):
        return False
    kind = cond.get("kind")
    if kind == "event_match":
        key, pattern = cond.get("key"), cond.get("pattern")
        if not isinstance(key, str) or not isinstance(pattern, str):
            return False
        value = _lookup(event, key)
        if not isinstance(value, str):
            return False
        regex = _glob(pattern, key == "content.body")
        return regex.search(value) is not None
    if kind == "event_property_is":
        key = cond.get("key")
        if not isinstance(key, str) or "value" not in cond:
            return False
        value = _lookup(event, key)
        target = cond["value"]
        return value is not _MISSING and _scalar(value) and type(value) is type(target) and value == target
    if kind == "event_property_contains":
        key = cond.get("key")
        if not isinstance(key, str) or "value" not in cond:
            return False
        value = _lookup(event, key)
        target = cond["value"]
        return isinstance(value, list) and any(_scalar(v) and type(v) is type(target) and v == target for v in value)
    if kind == "contains_display_name":
        body = _lookup(event, "content.body")
        if not isinstance(body, str) or not ctx.display_name:
            return False
        return _glob(ctx.display_name.replace("*", "").replace("?", ""), True).search(body) is not None
    if kind == "room_member_count":
        spec = cond.get("is")
        if not isinstance(spec, str):
            return False
        match = _IS_RE.match(spec)
        if match is None:
            return False
        op, number = match.group(1) or "==", int(match.group(2))
        count = ctx.member_count
        return {"==": count == number, "<": count < number, ">": count > number, "<=": count <= number, ">=": count >= number}[op]
    if kind == "sender_notification_permission":
        key = cond.get("key")
        if not isinstance(key, str):
            return False
        return ctx.sender_level >= ctx.notification_levels.get(key, 50)
    return False  # unknown conditions never match


def rule_matches(kind: str, rule: dict[str, Any], event: dict[str, Any], ctx: EvalContext) -> bool:
    if not rule.get("enabled", True):
        return False
    if kind in ("override", "underride"):
        return all(condition_matches(c, event, ctx) for c in rule.get("conditions") or [])
    if kind == "room":
        return event.get("room_id") == rule.get("rule_id")
    if kind == "sender":
        return event.get("sender") == rule.get("rule_id")
    if kind == "content":
        pattern = rule.get("pattern")
        body = _lookup(event, "content.body")
        return isinstance(pattern, str) and isinstance(body, str) and _glob(pattern, True).search(body) is not None
    return False


def clean_actions(actions: Any) -> list[Any]:
    """Actions with the historical ``dont_notify``/``coalesce`` removed."""
    if not isinstance(actions, list):
        return []
    return [a for a in actions if a not in ("dont_notify", "coalesce")]


def evaluate(ruleset: dict[str, Any], event: dict[str, Any], ctx: EvalContext) -> list[Any] | None:
    """Actions of the first matching rule (master first), or None if none matches."""
    rules = ruleset["global"]
    master = next((r for r in rules["override"] if r.get("rule_id") == ".m.rule.master"), None)
    if master is not None and master.get("enabled"):
        return clean_actions(master.get("actions"))
    for kind in KINDS:
        for rule in rules[kind]:
            if rule.get("rule_id") == ".m.rule.master":
                continue
            if rule_matches(kind, rule, event, ctx):
                return clean_actions(rule.get("actions"))
    return None


def notify_and_highlight(actions: list[Any] | None) -> tuple[bool, bool]:
    if not actions or "notify" not in actions:
        return False, False
    highlight = any(
        isinstance(a, dict) and a.get("set_tweak") == "highlight" and a.get("value", True) is not False for a in actions
    )
    return True, highlight
