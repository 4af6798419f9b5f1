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

import orjson

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


@functools.lru_cache(maxsize=1024)
def _dot_path(key: str) -> tuple[str, ...]:
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
    return tuple(parts)


def _lookup(event: dict[str, Any], key: str) -> Any:
    return _lookup_path(event, _dot_path(key))


def _lookup_path(event: dict[str, Any], path: tuple[str, ...]) -> Any:
    value: Any = event
    for part in path:
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
    evaluator = EventEvaluator(event, ctx.member_count, ctx.sender_level, ctx.notification_levels)
    rule = evaluator.first_match(compile_ruleset(ruleset, ctx.user_id), ctx.user_id, ctx.display_name)
    return list(rule.actions) if rule is not None else None


def notify_and_highlight(actions: list[Any] | None) -> tuple[bool, bool]:
    if not actions or "notify" not in actions:
        return False, False
    highlight = any(
        isinstance(a, dict) and a.get("set_tweak") == "highlight" and a.get("value", True) is not False for a in actions
    )
    return True, highlight


# -- one event, many users ------------------------------------------------------------------
#
# Push rules are evaluated when an event is persisted, for every member of the room at
# once, so the work is shared wherever the answer cannot differ between members:
#
# * A ruleset is compiled into rules whose conditions are hashable *checks*; an
#   :class:`EventEvaluator` remembers each check's answer for its event.
# * Checks that name the member themselves (``.m.rule.is_user_mention``: "my ID is in
#   m.mentions.user_ids", ``.m.rule.invite_for_me``: "state_key is my ID") are compiled
#   with a placeholder, so members with the same rules share one *template*
#   (:class:`CompiledRuleset`, interned). Such a check can only hold for the few users the
#   event names; for every other member of a template the answer is the same, and is
#   computed once per event.
#
# The functions above (:func:`condition_matches`, :func:`rule_matches`) are the plain
# reading of the spec; the unit tests hold the compiled evaluator to the same answers.

Check = tuple[Any, ...]
_NEVER: Check = ("never",)
_DISPLAY_NAME: Check = ("display_name",)
_BODY_PATH = ("content", "body")
_ME_TAGS = frozenset({"me_is", "me_contains", "me_match"})
_EVERYONE = object()  # candidate set meaning "any member may be named"


@dataclass(frozen=True, slots=True)
class CompiledRule:
    rule_id: str
    checks: tuple[Check, ...]
    actions: tuple[Any, ...]
    notify: bool
    highlight: bool


@dataclass(frozen=True, eq=False, slots=True)
class CompiledRuleset:
    """A user's enabled rules in evaluation order; equal rulesets are one object."""

    rules: tuple[CompiledRule, ...]
    me_checks: tuple[Check, ...]  # the checks that compare with the member's own ID
    needs_name: bool  # whether a rule looks at the member's display name


def _compile_condition(cond: Any) -> Check:
    if not isinstance(cond, dict):
        return _NEVER
    kind, key = cond.get("kind"), cond.get("key")
    if kind == "event_match":
        pattern = cond.get("pattern")
        if not isinstance(key, str) or not isinstance(pattern, str):
            return _NEVER
        return ("match", _dot_path(key), pattern, key == "content.body")
    if kind in ("event_property_is", "event_property_contains"):
        if not isinstance(key, str) or "value" not in cond or not _scalar(cond["value"]):
            return _NEVER  # only scalars ever compare equal
        target = cond["value"]
        return ("is" if kind == "event_property_is" else "contains", _dot_path(key), type(target), target)
    if kind == "contains_display_name":
        return _DISPLAY_NAME
    if kind == "room_member_count":
        spec = cond.get("is")
        match = _IS_RE.match(spec) if isinstance(spec, str) else None
        return ("count", match.group(1) or "==", int(match.group(2))) if match is not None else _NEVER
    if kind == "sender_notification_permission":
        return ("permission", key) if isinstance(key, str) else _NEVER
    return _NEVER  # unknown conditions never match


def _personalise(check: Check, user_id: str | None) -> Check:
    """Replace a comparison with the user's own ID by a placeholder check.

    Only where "not named by the event" is cheap to tell exactly: equality with a string
    (``is``/``contains``) and whole-value glob matches of an ASCII ID without wildcards
    (``match`` outside content.body, which is case-insensitive).
    """
    if user_id is None:
        return check
    tag = check[0]
    if tag in ("is", "contains") and check[2] is str and check[3] == user_id:
        return ("me_" + tag, check[1])
    if tag == "match" and not check[3] and check[2] == user_id and user_id.isascii() and not set(user_id) & {"*", "?"}:
        return ("me_match", check[1])
    return check


def _compile_rule(kind: str, rule: dict[str, Any], user_id: str | None) -> CompiledRule | None:
    if not rule.get("enabled", True):
        return None
    checks: tuple[Check, ...]
    if kind in ("override", "underride"):
        conditions = rule.get("conditions") or []
        checks = (
            tuple(_personalise(_compile_condition(c), user_id) for c in conditions)
            if isinstance(conditions, list)
            else (_NEVER,)
        )
    elif kind == "room":
        checks = (("room", rule.get("rule_id")),)
    elif kind == "sender":
        checks = (("sender", rule.get("rule_id")),)
    elif kind == "content":
        pattern = rule.get("pattern")
        checks = (("match", _BODY_PATH, pattern, True),) if isinstance(pattern, str) else (_NEVER,)
    else:
        return None
    actions = clean_actions(rule.get("actions"))
    notify, highlight = notify_and_highlight(actions)
    return CompiledRule(str(rule.get("rule_id")), checks, tuple(actions), notify, highlight)


_INTERNED: dict[Any, CompiledRuleset] = {}
MAX_INTERNED = 4096


def compile_ruleset(ruleset: dict[str, Any], user_id: str | None = None) -> CompiledRuleset:
    """The enabled rules of ``user_id``'s ruleset, in evaluation order, as a shared template."""
    rules = ruleset["global"]
    master = next((r for r in rules["override"] if r.get("rule_id") == ".m.rule.master"), None)
    out: list[CompiledRule] = []
    if master is not None and master.get("enabled"):
        actions = clean_actions(master.get("actions"))
        notify, highlight = notify_and_highlight(actions)
        out.append(CompiledRule(".m.rule.master", (), tuple(actions), notify, highlight))
    else:
        for kind in KINDS:
            for rule in rules[kind]:
                if rule.get("rule_id") == ".m.rule.master":
                    continue
                compiled = _compile_rule(kind, rule, user_id)
                if compiled is not None:
                    out.append(compiled)
    key = tuple((r.rule_id, r.checks, orjson.dumps(r.actions, option=orjson.OPT_SORT_KEYS)) for r in out)
    interned = _INTERNED.get(key)
    if interned is None:
        checks = [c for r in out for c in r.checks]
        interned = CompiledRuleset(
            tuple(out),
            tuple(dict.fromkeys(c for c in checks if c[0] in _ME_TAGS)),
            any(c is _DISPLAY_NAME for c in checks),
        )
        if len(_INTERNED) >= MAX_INTERNED:
            _INTERNED.clear()  # only sharing is lost: compiled rulesets stay valid
        _INTERNED[key] = interned
    return interned


_COMPARE = {
    "==": lambda a, b: a == b,
    "<": lambda a, b: a < b,
    ">": lambda a, b: a > b,
    "<=": lambda a, b: a <= b,
    ">=": lambda a, b: a >= b,
}


class EventEvaluator:
    """One event against many users' compiled rulesets, sharing what does not depend on the user."""

    __slots__ = ("_candidates", "_event", "_levels", "_member_count", "_memo", "_names_anyone", "_sender_level", "_shared")

    def __init__(self, event: dict[str, Any], member_count: int, sender_level: int, notification_levels: dict[str, int]) -> None:
        self._event = event
        self._member_count = member_count
        self._sender_level = sender_level
        self._levels = notification_levels
        self._memo: dict[Check, bool] = {}  # answers for members the event does not name
        self._shared: dict[tuple[CompiledRuleset, str | None], CompiledRule | None] = {}
        self._candidates: dict[Check, Any] = {}
        self._names_anyone: dict[CompiledRuleset, bool] = {}

    def first_match(self, compiled: CompiledRuleset, user_id: str, display_name: str | None) -> CompiledRule | None:
        """The rule that decides for ``user_id`` (None: no rule matched)."""
        if compiled.me_checks:
            anyone = self._names_anyone.get(compiled)
            if anyone is None:  # most events name nobody: then no member needs a look of their own
                anyone = self._names_anyone[compiled] = any(self._candidate_set(c) for c in compiled.me_checks)
            if anyone and self._named(compiled.me_checks, user_id):
                return self._first(compiled.rules, user_id, display_name)
        key = (compiled, display_name if compiled.needs_name else None)
        shared = self._shared
        if key in shared:
            return shared[key]
        rule = shared[key] = self._first(compiled.rules, None, display_name)
        return rule

    def _named(self, me_checks: tuple[Check, ...], user_id: str) -> bool:
        """Whether one of the user's own-ID checks could hold (a superset of when it does)."""
        for check in me_checks:
            candidates = self._candidate_set(check)
            if candidates is _EVERYONE:
                return True
            if candidates and (user_id.lower() if check[0] == "me_match" else user_id) in candidates:
                return True
        return False

    def _candidate_set(self, check: Check) -> Any:
        candidates = self._candidates.get(check)
        if candidates is None:
            candidates = self._candidates[check] = self._candidates_for(check)
        return candidates

    def _candidates_for(self, check: Check) -> Any:
        value = _lookup_path(self._event, check[1])
        if check[0] == "me_is":
            return frozenset((value,)) if type(value) is str else frozenset()
        if check[0] == "me_contains":
            return frozenset(v for v in value if type(v) is str) if isinstance(value, list) else frozenset()
        if not isinstance(value, str):
            return frozenset()
        # ASCII on both sides: a case-insensitive whole match is equality of lower-cased strings.
        return frozenset((value.lower(),)) if value.isascii() else _EVERYONE

    def _first(self, rules: tuple[CompiledRule, ...], user_id: str | None, display_name: str | None) -> CompiledRule | None:
        """First matching rule; own-ID checks are evaluated for ``user_id`` (None: they fail)."""
        memo = self._memo
        for rule in rules:
            for check in rule.checks:
                ok: bool | None
                if user_id is not None and check[0] in _ME_TAGS:
                    ok = self._check_me(check, user_id)
                else:
                    if check is _DISPLAY_NAME:
                        check = ("display_name", display_name)
                    ok = memo.get(check)
                    if ok is None:
                        ok = memo[check] = self._check(check)
                if not ok:
                    break
            else:
                return rule
        return None

    def _check_me(self, check: Check, user_id: str) -> bool:
        value = _lookup_path(self._event, check[1])
        if check[0] == "me_is":
            return type(value) is str and value == user_id
        if check[0] == "me_contains":
            return isinstance(value, list) and any(type(v) is str and v == user_id for v in value)
        return isinstance(value, str) and _glob(user_id, False).search(value) is not None

    def _check(self, check: Check) -> bool:
        tag = check[0]
        event = self._event
        if tag == "match":
            value = _lookup_path(event, check[1])
            return isinstance(value, str) and _glob(check[2], check[3]).search(value) is not None
        if tag == "is":
            value = _lookup_path(event, check[1])
            return value is not _MISSING and _scalar(value) and type(value) is check[2] and value == check[3]
        if tag == "contains":
            value = _lookup_path(event, check[1])
            return isinstance(value, list) and any(_scalar(v) and type(v) is check[2] and v == check[3] for v in value)
        if tag == "display_name":
            name = check[1]
            body = _lookup_path(event, _BODY_PATH)
            if not isinstance(body, str) or not name:
                return False
            return _glob(name.replace("*", "").replace("?", ""), True).search(body) is not None
        if tag == "count":
            return bool(_COMPARE[check[1]](self._member_count, check[2]))
        if tag == "permission":
            return self._sender_level >= self._levels.get(check[1], 50)
        if tag == "room":
            return bool(event.get("room_id") == check[1])
        if tag == "sender":
            return bool(event.get("sender") == check[1])
        return False  # own-ID checks for members the event does not name, and _NEVER
