"""Receipts, read markers, typing and presence."""

from __future__ import annotations

from typing import Any

from bastion.api.http import CLIENT_V3, Request, RouteTable
from bastion.core.ids import is_valid_room_id, is_valid_user_id
from bastion.errors import BadJson, InvalidParam


def _room(req: Request) -> str:
    room_id = req.params["roomId"]
    if not is_valid_room_id(room_id):
        raise InvalidParam("Invalid room ID")
    return room_id


def _user(req: Request) -> str:
    user_id = req.params["userId"]
    if not is_valid_user_id(user_id):
        raise InvalidParam("Invalid user ID")
    return user_id


async def post_receipt(req: Request) -> dict[str, Any]:
    """POST /_matrix/client/v3/rooms/{roomId}/receipt/{receiptType}/{eventId}"""
    body = await req.json(allow_empty=True)
    await req.hs.receipts.post(req.requester, _room(req), req.params["receiptType"], req.params["eventId"], body)
    return {}


async def post_read_markers(req: Request) -> dict[str, Any]:
    """POST /_matrix/client/v3/rooms/{roomId}/read_markers"""
    await req.hs.receipts.read_markers(req.requester, _room(req), await req.json())
    return {}


async def put_typing(req: Request) -> dict[str, Any]:
    """PUT /_matrix/client/v3/rooms/{roomId}/typing/{userId}"""
    body = await req.json()
    typing = body.get("typing")
    if not isinstance(typing, bool):
        raise BadJson("'typing' must be a boolean")
    timeout = body.get("timeout")
    if timeout is not None and type(timeout) is not int:
        raise BadJson("'timeout' must be an integer")
    await req.hs.typing.set_typing(req.requester, _room(req), _user(req), typing, timeout)
    return {}


async def get_presence(req: Request) -> dict[str, Any]:
    """GET /_matrix/client/v3/presence/{userId}/status"""
    return await req.hs.presence.get_status(req.requester, _user(req))


async def put_presence(req: Request) -> dict[str, Any]:
    """PUT /_matrix/client/v3/presence/{userId}/status"""
    await req.hs.presence.set_status(req.requester, _user(req), await req.json())
    return {}


def register(routes: RouteTable) -> None:
    r = CLIENT_V3 + "/rooms/{roomId}"
    routes.add("POST", r + "/receipt/{receiptType}/{eventId}", post_receipt)
    routes.add("POST", r + "/read_markers", post_read_markers)
    routes.add("PUT", r + "/typing/{userId}", put_typing)
    routes.add("GET", CLIENT_V3 + "/presence/{userId}/status", get_presence)
    routes.add("PUT", CLIENT_V3 + "/presence/{userId}/status", put_presence)
