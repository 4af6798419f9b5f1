"""/sync and filters."""

from __future__ import annotations

from typing import Any

from bastion.api.http import CLIENT_V3, Request, Response, RouteTable
from bastion.core.filters import Filter
from bastion.errors import Forbidden, InvalidParam, NotFound
from bastion.services.sync import SyncRequest
from bastion.streams.tokens import StreamToken, durable_positions


def _check_user(req: Request) -> str:
    user_id = req.params["userId"]
    if user_id != req.requester.user_id:
        raise Forbidden("You can only manage your own filters")
    return user_id


async def _resolve_filter(req: Request, raw: str | None) -> Filter:
    if raw is None or raw == "":
        return Filter()
    if raw.startswith("{"):
        return req.hs.filters.parse_inline(raw)
    return await req.hs.filters.get(req.requester.user_id, raw)


async def sync(req: Request) -> Response:
    """GET /_matrix/client/v3/sync"""
    since_raw = req.query_str("since")
    since = StreamToken.decode(since_raw) if since_raw else None
    if since is not None:
        # A token another worker issued may be ahead of this one: catch up first, so
        # nothing between the two positions is skipped or sent twice.
        await req.hs.replicator.ensure(durable_positions(since))
    set_presence = req.query_str("set_presence")
    if set_presence is not None and set_presence not in ("offline", "online", "unavailable"):
        raise InvalidParam("'set_presence' must be offline, online or unavailable")
    flt = await _resolve_filter(req, req.query_str("filter"))
    request = SyncRequest(
        requester=req.requester,
        since=since,
        timeout_ms=req.query_int("timeout", 0, minimum=0, maximum=10**9) or 0,
        filter=flt,
        full_state=req.query_bool("full_state"),
        use_state_after=req.query_bool("use_state_after"),
        timeline_limit=req.hs.settings.limits.timeline_limit_default,
        set_presence=set_presence,
    )
    if request.timeout_ms > 0:
        # A long-poll: stop waiting (and free what it holds) if the client hangs up.
        return Response(await req.cancel_on_disconnect(req.hs.sync.sync(request)))
    return Response(await req.hs.sync.sync(request))


async def post_filter(req: Request) -> dict[str, Any]:
    """POST /_matrix/client/v3/user/{userId}/filter"""
    user_id = _check_user(req)
    body = await req.json()
    filter_id = await req.hs.filters.create(user_id, body)
    return {"filter_id": filter_id}


async def get_filter(req: Request) -> Response:
    """GET /_matrix/client/v3/user/{userId}/filter/{filterId}"""
    user_id = _check_user(req)
    raw = await req.hs.filters.get_raw(user_id, req.params["filterId"])
    if raw is None:
        raise NotFound("No such filter")
    return Response(raw)


def register(routes: RouteTable) -> None:
    routes.add("GET", CLIENT_V3 + "/sync", sync)
    routes.add("POST", CLIENT_V3 + "/user/{userId}/filter", post_filter)
    routes.add("GET", CLIENT_V3 + "/user/{userId}/filter/{filterId}", get_filter)
