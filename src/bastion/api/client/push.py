"""Push rules, /notifications and pushers."""

from __future__ import annotations

from typing import Any

from bastion.api.http import CLIENT_V3, Request, RouteTable


async def get_all(req: Request) -> dict[str, Any]:
    """GET /_matrix/client/v3/pushrules/"""
    return await req.hs.push_rules.ruleset(req.requester.user_id)


async def get_scope(req: Request) -> dict[str, Any]:
    """GET /_matrix/client/v3/pushrules/global/"""
    req.hs.push_rules.check_kind(req.params["scope"], "override")
    return (await req.hs.push_rules.ruleset(req.requester.user_id))["global"]


def _rule_path(req: Request) -> tuple[str, str]:
    req.hs.push_rules.check_kind(req.params["scope"], req.params["kind"])
    return req.params["kind"], req.params["ruleId"]


async def get_rule(req: Request) -> dict[str, Any]:
    """GET /_matrix/client/v3/pushrules/global/{kind}/{ruleId}"""
    kind, rule_id = _rule_path(req)
    return await req.hs.push_rules.get_rule(req.requester.user_id, kind, rule_id)


async def put_rule(req: Request) -> dict[str, Any]:
    """PUT /_matrix/client/v3/pushrules/global/{kind}/{ruleId}"""
    kind, rule_id = _rule_path(req)
    body = await req.json()
    await req.hs.push_rules.put_rule(
        req.requester.user_id, kind, rule_id, body, req.query_str("before") or None, req.query_str("after") or None
    )
    return {}


async def delete_rule(req: Request) -> dict[str, Any]:
    """DELETE /_matrix/client/v3/pushrules/global/{kind}/{ruleId}"""
    kind, rule_id = _rule_path(req)
    await req.hs.push_rules.delete_rule(req.requester.user_id, kind, rule_id)
    return {}


async def get_enabled(req: Request) -> dict[str, Any]:
    """GET /_matrix/client/v3/pushrules/global/{kind}/{ruleId}/enabled"""
    kind, rule_id = _rule_path(req)
    return {"enabled": (await req.hs.push_rules.get_rule(req.requester.user_id, kind, rule_id)).get("enabled", True)}


async def put_enabled(req: Request) -> dict[str, Any]:
    """PUT /_matrix/client/v3/pushrules/global/{kind}/{ruleId}/enabled"""
    kind, rule_id = _rule_path(req)
    body = await req.json()
    await req.hs.push_rules.set_enabled(req.requester.user_id, kind, rule_id, body.get("enabled"))
    return {}


async def get_actions(req: Request) -> dict[str, Any]:
    """GET /_matrix/client/v3/pushrules/global/{kind}/{ruleId}/actions"""
    kind, rule_id = _rule_path(req)
    return {"actions": (await req.hs.push_rules.get_rule(req.requester.user_id, kind, rule_id)).get("actions", [])}


async def put_actions(req: Request) -> dict[str, Any]:
    """PUT /_matrix/client/v3/pushrules/global/{kind}/{ruleId}/actions"""
    kind, rule_id = _rule_path(req)
    body = await req.json()
    await req.hs.push_rules.set_actions(req.requester.user_id, kind, rule_id, body.get("actions"))
    return {}


async def notifications(req: Request) -> dict[str, Any]:
    """GET /_matrix/client/v3/notifications"""
    limit = req.query_int("limit", 20, minimum=1, maximum=100) or 20
    return await req.hs.push_rules.notifications(req.requester, req.query_str("from") or None, limit, req.query_str("only"))


async def get_pushers(req: Request) -> dict[str, Any]:
    """GET /_matrix/client/v3/pushers"""
    return {"pushers": await req.hs.pushers.all(req.requester)}


async def set_pusher(req: Request) -> dict[str, Any]:
    """POST /_matrix/client/v3/pushers/set"""
    await req.hs.pushers.set(req.requester, await req.json())
    return {}


def register(routes: RouteTable) -> None:
    base = CLIENT_V3 + "/pushrules"
    routes.add("GET", base + "/", get_all)
    routes.add("GET", base, get_all)
    routes.add("GET", base + "/{scope}/", get_scope)
    routes.add("GET", base + "/{scope}/{kind}/{ruleId}", get_rule)
    routes.add("PUT", base + "/{scope}/{kind}/{ruleId}", put_rule)
    routes.add("DELETE", base + "/{scope}/{kind}/{ruleId}", delete_rule)
    routes.add("GET", base + "/{scope}/{kind}/{ruleId}/enabled", get_enabled)
    routes.add("PUT", base + "/{scope}/{kind}/{ruleId}/enabled", put_enabled)
    routes.add("GET", base + "/{scope}/{kind}/{ruleId}/actions", get_actions)
    routes.add("PUT", base + "/{scope}/{kind}/{ruleId}/actions", put_actions)
    routes.add("GET", CLIENT_V3 + "/notifications", notifications)
    routes.add("GET", CLIENT_V3 + "/pushers", get_pushers)
    routes.add("POST", CLIENT_V3 + "/pushers/set", set_pusher)
