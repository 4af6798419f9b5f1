"""Rooms: creation, membership, state, sending, redaction, reading history, aliases."""

from __future__ import annotations

from typing import Any

import orjson

from bastion.api.http import CLIENT_V3, Request, Response, RouteTable, body_str
from bastion.clock import now_ms
from bastion.core.filters import EventFilter
from bastion.core.ids import is_valid_room_alias, is_valid_room_id, is_valid_user_id
from bastion.errors import BadJson, InvalidParam, MissingParam
from bastion.services.room_reads import parse_direction

MAX_TXN_ID_LENGTH = 255


def _room_id(req: Request) -> str:
    room_id = req.params["roomId"]
    if not is_valid_room_id(room_id):
        raise InvalidParam("Invalid room ID")
    return room_id


def _txn_id(req: Request) -> str:
    txn_id = req.params["txnId"]
    if not txn_id or len(txn_id) > MAX_TXN_ID_LENGTH:
        raise InvalidParam("Invalid transaction ID")
    return txn_id


def _target_user(body: dict[str, Any]) -> str:
    user_id = body.get("user_id")
    if user_id is None:
        raise MissingParam("'user_id' is required")
    if not isinstance(user_id, str) or not is_valid_user_id(user_id):
        raise BadJson("'user_id' must be a valid user ID")
    return user_id


def _reason(body: dict[str, Any]) -> str | None:
    return body_str(body, "reason", max_len=4096)


def _events_json(req: Request, events: list[Any], bundles: dict[str, Any] | None = None) -> list[Any]:
    now = now_ms()
    key = req.requester.device_key
    bundles = bundles or {}
    return [e.client_fragment(now, key, bundles.get(e.event_id)) for e in events]


# -- creation and membership --------------------------------------------------------------


async def create_room(req: Request) -> dict[str, Any]:
    """POST /_matrix/client/v3/createRoom"""
    room_id = await req.hs.rooms.create_room(req.requester, await req.json())
    return {"room_id": room_id}


async def join_by_id_or_alias(req: Request) -> dict[str, Any]:
    """POST /_matrix/client/v3/join/{roomIdOrAlias}"""
    body = await req.json(allow_empty=True)
    room_id = await req.hs.rooms.join(req.requester, req.params["roomIdOrAlias"], _reason(body))
    return {"room_id": room_id}


async def join_room(req: Request) -> dict[str, Any]:
    """POST /_matrix/client/v3/rooms/{roomId}/join"""
    body = await req.json(allow_empty=True)
    room_id = await req.hs.rooms.join(req.requester, _room_id(req), _reason(body))
    return {"room_id": room_id}


async def invite(req: Request) -> dict[str, Any]:
    """POST /_matrix/client/v3/rooms/{roomId}/invite"""
    body = await req.json()
    if "user_id" not in body and any(k in body for k in ("id_server", "medium", "address")):
        raise InvalidParam("Third-party invites are not supported by this server")
    await req.hs.rooms.invite(req.requester, _room_id(req), _target_user(body), _reason(body))
    return {}


async def leave(req: Request) -> dict[str, Any]:
    """POST /_matrix/client/v3/rooms/{roomId}/leave"""
    body = await req.json(allow_empty=True)
    await req.hs.rooms.leave(req.requester, _room_id(req), _reason(body))
    return {}


async def forget(req: Request) -> dict[str, Any]:
    """POST /_matrix/client/v3/rooms/{roomId}/forget"""
    await req.json(allow_empty=True)
    await req.hs.rooms.forget(req.requester, _room_id(req))
    return {}


async def kick(req: Request) -> dict[str, Any]:
    """POST /_matrix/client/v3/rooms/{roomId}/kick"""
    body = await req.json()
    await req.hs.rooms.kick(req.requester, _room_id(req), _target_user(body), _reason(body))
    return {}


async def ban(req: Request) -> dict[str, Any]:
    """POST /_matrix/client/v3/rooms/{roomId}/ban"""
    body = await req.json()
    await req.hs.rooms.ban(req.requester, _room_id(req), _target_user(body), _reason(body))
    return {}


async def unban(req: Request) -> dict[str, Any]:
    """POST /_matrix/client/v3/rooms/{roomId}/unban"""
    body = await req.json()
    await req.hs.rooms.unban(req.requester, _room_id(req), _target_user(body), _reason(body))
    return {}


async def joined_rooms(req: Request) -> dict[str, Any]:
    """GET /_matrix/client/v3/joined_rooms"""
    rooms = await req.hs.memberships.rooms_for(req.requester.user_id)
    return {"joined_rooms": sorted(r for r, m in rooms.items() if m.membership == "join")}


async def joined_members(req: Request) -> dict[str, Any]:
    """GET /_matrix/client/v3/rooms/{roomId}/joined_members"""
    return {"joined": await req.hs.reads.joined_members(req.requester, _room_id(req))}


async def members(req: Request) -> dict[str, Any]:
    """GET /_matrix/client/v3/rooms/{roomId}/members"""
    valid = ("join", "invite", "knock", "leave", "ban")
    membership = req.query_str("membership")
    not_membership = req.query_str("not_membership")
    for value in (membership, not_membership):
        if value is not None and value not in valid:
            raise InvalidParam(f"membership filter must be one of {', '.join(valid)}")
    events = await req.hs.reads.members(req.requester, _room_id(req), req.query_str("at"), membership, not_membership)
    return {"chunk": _events_json(req, events)}


# -- state ------------------------------------------------------------------------------------


async def get_state(req: Request) -> Response:
    """GET /_matrix/client/v3/rooms/{roomId}/state"""
    events = await req.hs.reads.get_state(req.requester, _room_id(req))
    return Response(orjson.dumps(_events_json(req, events)))


async def get_state_event(req: Request) -> dict[str, Any] | Response:
    """GET /_matrix/client/v3/rooms/{roomId}/state/{eventType}/{stateKey}"""
    fmt = req.query_str("format", "content")
    if fmt not in ("content", "event"):
        raise InvalidParam("'format' must be 'content' or 'event'")
    event = await req.hs.reads.get_state_event(req.requester, _room_id(req), req.params["eventType"], req.params["stateKey"])
    if fmt == "event":
        return Response(event.client_bytes(now_ms(), req.requester.device_key))
    return Response(orjson.dumps(event.content))


async def put_state_event(req: Request) -> dict[str, Any]:
    """PUT /_matrix/client/v3/rooms/{roomId}/state/{eventType}/{stateKey}"""
    room_id = _room_id(req)
    event_type = req.params["eventType"]
    state_key = req.params["stateKey"]
    content = await req.json()
    if event_type == "m.room.member":
        event_id = await req.hs.rooms.set_membership_state(req.requester, room_id, state_key, content)
    else:
        event_id = await req.hs.events.send_client_event(req.requester, room_id, event_type, content, state_key=state_key)
    return {"event_id": event_id}


# -- events -------------------------------------------------------------------------------------


async def send_event(req: Request) -> dict[str, Any]:
    """PUT /_matrix/client/v3/rooms/{roomId}/send/{eventType}/{txnId}"""
    room_id = _room_id(req)
    txn_id = _txn_id(req)
    content = await req.json()
    event_id = await req.hs.events.send_client_event(req.requester, room_id, req.params["eventType"], content, txn_id=txn_id)
    return {"event_id": event_id}


async def redact(req: Request) -> dict[str, Any]:
    """PUT /_matrix/client/v3/rooms/{roomId}/redact/{eventId}/{txnId}"""
    room_id = _room_id(req)
    txn_id = _txn_id(req)
    body = await req.json(allow_empty=True)
    event_id = await req.hs.events.redact(req.requester, room_id, req.params["eventId"], body, txn_id)
    return {"event_id": event_id}


async def get_event(req: Request) -> Response:
    """GET /_matrix/client/v3/rooms/{roomId}/event/{eventId}"""
    event, bundles = await req.hs.reads.get_event(req.requester, _room_id(req), req.params["eventId"])
    return Response(event.client_bytes(now_ms(), req.requester.device_key, bundles.get(event.event_id)))


def _parse_room_event_filter(raw: str | None) -> EventFilter:
    if raw is None:
        return EventFilter()
    try:
        value = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise InvalidParam("'filter' must be a JSON-encoded RoomEventFilter") from None
    try:
        return EventFilter.parse(value, "filter", room_filter=True)
    except BadJson as exc:
        raise InvalidParam(exc.message) from None


async def messages(req: Request) -> dict[str, Any]:
    """GET /_matrix/client/v3/rooms/{roomId}/messages"""
    room_id = _room_id(req)
    backwards = parse_direction(req.query_str("dir"))
    limit = req.query_int("limit", 10, minimum=0, maximum=req.hs.settings.limits.messages_limit_max) or 10
    flt = _parse_room_event_filter(req.query_str("filter"))
    page = await req.hs.reads.messages(
        req.requester,
        room_id,
        from_token=req.query_str("from") or None,
        to_token=req.query_str("to") or None,
        backwards=backwards,
        limit=limit,
        event_filter=flt,
    )
    result: dict[str, Any] = {"chunk": _events_json(req, page.chunk, page.bundles), "start": page.start}
    if page.end is not None:
        result["end"] = page.end
    if page.state:
        result["state"] = _events_json(req, page.state)
    return result


async def context(req: Request) -> dict[str, Any]:
    """GET /_matrix/client/v3/rooms/{roomId}/context/{eventId}"""
    limit = req.query_int("limit", 10, minimum=0, maximum=req.hs.settings.limits.messages_limit_max)
    flt = _parse_room_event_filter(req.query_str("filter"))
    ctx = await req.hs.reads.context(req.requester, _room_id(req), req.params["eventId"], limit or 0, flt)
    now = now_ms()
    key = req.requester.device_key
    bundles = ctx["bundles"]
    return {
        "event": ctx["event"].client_fragment(now, key, bundles.get(ctx["event"].event_id)),
        "events_before": _events_json(req, ctx["events_before"], bundles),
        "events_after": _events_json(req, ctx["events_after"], bundles),
        "start": ctx["start"],
        "end": ctx["end"],
        "state": _events_json(req, ctx["state"]),
    }


# -- aliases --------------------------------------------------------------------------------------


def _alias(req: Request) -> str:
    alias = req.params["roomAlias"]
    if not is_valid_room_alias(alias):
        raise InvalidParam("Invalid room alias")
    return alias


async def get_alias(req: Request) -> dict[str, Any]:
    """GET /_matrix/client/v3/directory/room/{roomAlias}"""
    return await req.hs.aliases.resolve(_alias(req))


async def put_alias(req: Request) -> dict[str, Any]:
    """PUT /_matrix/client/v3/directory/room/{roomAlias}"""
    body = await req.json()
    room_id = body.get("room_id")
    if not isinstance(room_id, str) or not is_valid_room_id(room_id):
        raise BadJson("'room_id' must be a room ID")
    await req.hs.aliases.create(req.requester, _alias(req), room_id)
    return {}


async def delete_alias(req: Request) -> dict[str, Any]:
    """DELETE /_matrix/client/v3/directory/room/{roomAlias}"""
    await req.hs.aliases.delete(req.requester, _alias(req))
    return {}


async def room_aliases(req: Request) -> dict[str, Any]:
    """GET /_matrix/client/v3/rooms/{roomId}/aliases"""
    return {"aliases": await req.hs.aliases.for_room(req.requester, _room_id(req))}


def register(routes: RouteTable) -> None:
    r = CLIENT_V3 + "/rooms/{roomId}"
    routes.add("POST", CLIENT_V3 + "/createRoom", create_room)
    routes.add("POST", CLIENT_V3 + "/join/{roomIdOrAlias}", join_by_id_or_alias)
    routes.add("POST", r + "/join", join_room)
    routes.add("POST", r + "/invite", invite)
    routes.add("POST", r + "/leave", leave)
    routes.add("POST", r + "/forget", forget)
    routes.add("POST", r + "/kick", kick)
    routes.add("POST", r + "/ban", ban)
    routes.add("POST", r + "/unban", unban)
    routes.add("GET", CLIENT_V3 + "/joined_rooms", joined_rooms)
    routes.add("GET", r + "/joined_members", joined_members)
    routes.add("GET", r + "/members", members)
    routes.add("GET", r + "/state", get_state)
    routes.add("GET", r + "/state/{eventType}/{stateKey?}", get_state_event)
    routes.add("PUT", r + "/state/{eventType}/{stateKey?}", put_state_event)
    routes.add("PUT", r + "/send/{eventType}/{txnId}", send_event)
    routes.add("PUT", r + "/redact/{eventId}/{txnId}", redact)
    routes.add("GET", r + "/event/{eventId}", get_event)
    routes.add("GET", r + "/messages", messages)
    routes.add("GET", r + "/context/{eventId}", context)
    routes.add("GET", r + "/aliases", room_aliases)
    routes.add("GET", CLIENT_V3 + "/directory/room/{roomAlias}", get_alias, auth=False)
    routes.add("PUT", CLIENT_V3 + "/directory/room/{roomAlias}", put_alias)
    routes.add("DELETE", CLIENT_V3 + "/directory/room/{roomAlias}", delete_alias)
