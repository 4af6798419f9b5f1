"""/relations and /threads (Client-Server API v1), and /search."""

from __future__ import annotations

from typing import Any

from bastion.api.http import CLIENT_V1, CLIENT_V3, Request, RouteTable
from bastion.clock import now_ms
from bastion.core.ids import is_valid_room_id
from bastion.errors import InvalidParam
from bastion.services.room_reads import parse_direction


def _room(req: Request) -> str:
    room_id = req.params["roomId"]
    if not is_valid_room_id(room_id):
        raise InvalidParam("Invalid room ID")
    return room_id


async def relations(req: Request) -> dict[str, Any]:
    """GET /_matrix/client/v1/rooms/{roomId}/relations/{eventId}[/{relType}[/{eventType}]]"""
    limit = req.query_int("limit", 50, minimum=1, maximum=req.hs.settings.limits.messages_limit_max) or 50
    events, next_batch, depth, bundles, _ = await req.hs.relations.relations(
        req.requester,
        _room(req),
        req.params["eventId"],
        req.params.get("relType"),
        req.params.get("eventType"),
        from_token=req.query_str("from") or None,
        to_token=req.query_str("to") or None,
        limit=limit,
        backwards=parse_direction(req.query_str("dir")),
        recurse=req.query_bool("recurse"),
    )
    now = now_ms()
    key = req.requester.device_key
    result: dict[str, Any] = {"chunk": [e.client_fragment(now, key, bundles.get(e.event_id)) for e in events]}
    if next_batch is not None:
        result["next_batch"] = next_batch
    if depth is not None:
        result["recursion_depth"] = depth
    return result


async def threads(req: Request) -> dict[str, Any]:
    """GET /_matrix/client/v1/rooms/{roomId}/threads"""
    limit = req.query_int("limit", 20, minimum=1, maximum=100) or 20
    chunk, next_batch, bundles = await req.hs.relations.threads(
        req.requester, _room(req), req.query_str("include", "all") or "all", req.query_str("from") or None, limit
    )
    now = now_ms()
    key = req.requester.device_key
    result: dict[str, Any] = {"chunk": [e.client_fragment(now, key, bundles.get(e.event_id)) for e in chunk]}
    if next_batch is not None:
        result["next_batch"] = next_batch
    return result


async def search(req: Request) -> dict[str, Any]:
    """POST /_matrix/client/v3/search"""
    return await req.hs.search.search(req.requester, await req.json(), req.query_str("next_batch") or None)


def register(routes: RouteTable) -> None:
    routes.add("POST", CLIENT_V3 + "/search", search)
    base = CLIENT_V1 + "/rooms/{roomId}"
    routes.add("GET", base + "/relations/{eventId}", relations)
    routes.add("GET", base + "/relations/{eventId}/{relType}", relations)
    routes.add("GET", base + "/relations/{eventId}/{relType}/{eventType}", relations)
    routes.add("GET", base + "/threads", threads)
