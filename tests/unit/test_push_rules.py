"""The compiled push-rule evaluator gives the same answers as the plain reading of the spec."""

from __future__ import annotations

import random
from typing import Any

from bastion.core.push_rules import (
    KINDS,
    EvalContext,
    EventEvaluator,
    clean_actions,
    compile_ruleset,
    default_ruleset,
    evaluate,
    rule_matches,
)

USER = "@bob:example.org"


def reference(ruleset: dict[str, Any], event: dict[str, Any], ctx: EvalContext) -> list[Any] | None:
    rules = ruleset["global"]
    master = next((r for r in rules["override"] if r.get("rule_id") == ".m.rule.master"), None)
    if master is not None and master.get("enabled"):
        return clean_actions(master.get("actions"))
    for kind in KINDS:
        for rule in rules[kind]:
            if rule.get("rule_id") != ".m.rule.master" and rule_matches(kind, rule, event, ctx):
                return clean_actions(rule.get("actions"))
    return None


USERS = [USER, "@Bob:example.org", "@carol:example.org", "@b*b:example.org", "@bob:example.org\u017f"]


def _ruleset(rng: random.Random, user: str) -> dict[str, Any]:
    ruleset = default_ruleset(user)
    rules = ruleset["global"]
    for rule in rules["override"] + rules["underride"]:
        if rng.random() < 0.1:
            rule["enabled"] = not rule["enabled"]
    if rng.random() < 0.5:
        return ruleset  # plain server defaults: the common case, shared between users
    rules["content"].append({"rule_id": "kw", "pattern": rng.choice(["picnic", "pic*", "b?b", "release"]),
                             "enabled": rng.random() < 0.8, "actions": ["notify", {"set_tweak": "highlight"}]})
    rules["room"].append({"rule_id": "!quiet:example.org", "enabled": True, "actions": rng.choice([[], ["notify"]])})
    rules["sender"].append({"rule_id": "@loud:example.org", "enabled": True, "actions": ["notify", "coalesce"]})
    rules["override"].insert(1, {"rule_id": "odd", "enabled": True, "actions": ["notify"], "conditions": rng.choice([
        [{"kind": "contains_display_name"}],
        [{"kind": "event_property_is", "key": "content.n", "value": 1}],
        [{"kind": "event_property_is", "key": "content.n", "value": True}],
        [{"kind": "event_property_is", "key": "state_key", "value": user}],
        [{"kind": "event_property_contains", "key": "content.tags", "value": "x"}],
        [{"kind": "event_match", "key": "content.body", "pattern": user}],
        [{"kind": "room_member_count", "is": rng.choice(["<3", ">=10", "2", "bogus"])}],
        [{"kind": "sender_notification_permission", "key": "room"}],
        [{"kind": "unknown_kind"}],
        [{"kind": "event_match", "key": "content.msgtype", "pattern": "m.no*"}],
    ])})
    return ruleset


def _member_event(rng: random.Random) -> dict[str, Any]:
    return {"type": "m.room.member", "room_id": "!busy:example.org", "sender": "@alice:example.org",
            "state_key": rng.choice([*USERS, USER.upper(), "@BOB:EXAMPLE.ORG", "@bob:example.org\u212a"]),
            "content": {"membership": rng.choice(["invite", "join"])}}


def _event(rng: random.Random) -> dict[str, Any]:
    if rng.random() < 0.2:
        return _member_event(rng)
    content: dict[str, Any] = {"msgtype": rng.choice(["m.text", "m.notice"]),
                               "body": rng.choice(["hello", "the picnic is on", "Bob!", "bab", "release v2", "Bobby",
                                                   f"hi {rng.choice(USERS)}"])}
    if rng.random() < 0.4:
        content["m.mentions"] = rng.choice([{"user_ids": [rng.choice(USERS)]}, {"user_ids": ["@carol:example.org", 7]},
                                            {"user_ids": USER}, {"room": True}, {"room": 1}])
    if rng.random() < 0.3:
        content["n"] = rng.choice([1, True, "1", 1.5])
    if rng.random() < 0.3:
        content["tags"] = rng.choice([["x"], ["y"], "x"])
    if rng.random() < 0.2:
        content["m.relates_to"] = {"rel_type": "m.replace", "event_id": "$x"}
    return {"type": rng.choice(["m.room.message", "m.room.message", "m.room.encrypted", "m.reaction"]),
            "room_id": rng.choice(["!quiet:example.org", "!busy:example.org"]),
            "sender": rng.choice(["@loud:example.org", "@alice:example.org"]), "content": content}


def test_compiled_evaluator_agrees_with_the_reference() -> None:
    """One evaluator per event, shared by many members, as when an event is persisted."""
    rng = random.Random(7)
    for _ in range(1500):
        event = _event(rng)
        count, level, levels = rng.choice([2, 3, 12]), rng.choice([0, 50, 100]), rng.choice([{}, {"room": 100}])
        evaluator = EventEvaluator(event, count, level, levels)
        for _ in range(4):
            user = rng.choice(USERS)
            ruleset = _ruleset(rng, user)
            ctx = EvalContext(user, rng.choice([None, "Bob", "B*b"]), count, level, levels)
            rule = evaluator.first_match(compile_ruleset(ruleset, user), user, ctx.display_name)
            expected = reference(ruleset, event, ctx)
            assert (list(rule.actions) if rule else None) == expected, (ruleset, event, ctx)
            assert evaluate(ruleset, event, ctx) == expected


def test_one_evaluator_serves_many_users() -> None:
    event = {"type": "m.room.message", "room_id": "!r:x", "sender": "@a:x",
             "content": {"msgtype": "m.text", "body": "hi Carol", "m.mentions": {"user_ids": ["@b:x"]}}}
    evaluator = EventEvaluator(event, 3, 0, {})
    templates = {compile_ruleset(default_ruleset(u), u) for u in ("@b:x", "@c:x", "@d:x")}
    assert len(templates) == 1  # the server defaults compile to one shared template
    by_user = {}
    for user, name in (("@b:x", "Bee"), ("@c:x", "Carol"), ("@d:x", "Dan")):
        rule = evaluator.first_match(compile_ruleset(default_ruleset(user), user), user, name)
        assert rule is not None
        by_user[user] = (rule.rule_id, rule.notify, rule.highlight)
    assert by_user == {"@b:x": (".m.rule.is_user_mention", True, True), "@c:x": (".m.rule.message", True, False),
                       "@d:x": (".m.rule.message", True, False)}
