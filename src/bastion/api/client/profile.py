"""Profiles and account data."""

from __future__ import annotations

from typing import Any

from bastion.api.http import CLIENT_V3, Request, Response, RouteTable
from bastion.core.ids import is_valid_room_id, is_valid_user_id
from bastion.errors import Forbidden, InvalidParam, MatrixError, NotFound

MAX_ACCOUNT_DATA_TYPE = 255


def _user(req: Request) -> str:
    user_id = req.params["userId"]
    if not is_valid_user_id(user_id):
        raise InvalidParam("Invalid user ID")
    return user_id


async def get_profile(req: Request) -> dict[str, Any]:
    """GET /_matrix/client/v3/profile/{userId}"""
    return await req.hs.profiles.get(_user(req), req.requester)


async def get_profile_field(req: Request) -> dict[str, Any]:
    """GET /_matrix/client/v3/profile/{userId}/{keyName}"""
    field = req.params["keyName"]
    req.hs.profiles.check_key(field)
    profile = await req.hs.profiles.get(_user(req), req.requester)
    if field not in profile:
        raise NotFound(f"No {field} set")
    return {field: profile[field]}


async def delete_profile_field(req: Request) -> dict[str, Any]:
    """DELETE /_matrix/client/v3/profile/{userId}/{keyName}"""
    await req.hs.profiles.delete_field(req.requester, _user(req), req.params["keyName"])
    return {}


async def put_profile_field(req: Request) -> dict[str, Any]:
    """PUT /_matrix/client/v3/profile/{userId}/{keyName}"""
    field = req.params["keyName"]
    body = await req.json()
    if field not in body:
        raise MatrixError(f"'{field}' is required", errcode="M_MISSING_PARAM", status=400)
    await req.hs.profiles.set_field(req.requester, _user(req), field, body[field])
    return {}


def _own(req: Request) -> str:
    user_id = _user(req)
    if user_id != req.requester.user_id:
        raise Forbidden("You can only access your own account data")
    return user_id


def _data_type(req: Request) -> str:
    data_type = req.params["type"]
    if not data_type or len(data_type.encode()) > MAX_ACCOUNT_DATA_TYPE:
        raise InvalidParam("Invalid account data type")
    return data_type


def _room(req: Request) -> str:
    room_id = req.params["roomId"]
    if not is_valid_room_id(room_id):
        raise InvalidParam("Invalid room ID")
    return room_id


async def get_account_data(req: Request) -> Response:
    """GET /_matrix/client/v3/user/{userId}/account_data/{type}"""
    raw = await req.hs.account_data.get(_own(req), "", _data_type(req))
    if raw is None:
        raise NotFound("Account data not found")
    return Response(raw)


async def put_account_data(req: Request) -> dict[str, Any]:
    """PUT /_matrix/client/v3/user/{userId}/account_data/{type}"""
    user_id = _own(req)
    data_type = _data_type(req)
    if data_type in ("m.fully_read", "m.push_rules"):
        raise MatrixError(f"Cannot set {data_type} through this API", errcode="M_BAD_JSON", status=405)
    body = await req.json()
    await req.hs.account_data.put(user_id, "", data_type, body)
    return {}


async def get_room_account_data(req: Request) -> Response:
    """GET /_matrix/client/v3/user/{userId}/rooms/{roomId}/account_data/{type}"""
    raw = await req.hs.account_data.get(_own(req), _room(req), _data_type(req))
    if raw is None:
        raise NotFound("Account data not found")
    return Response(raw)


async def put_room_account_data(req: Request) -> dict[str, Any]:
    """PUT /_matrix/client/v3/user/{userId}/rooms/{roomId}/account_data/{type}"""
    user_id = _own(req)
    room_id = _room(req)
    data_type = _data_type(req)
    if data_type in ("m.fully_read", "m.push_rules"):
        raise MatrixError(f"Cannot set {data_type} through this API", errcode="M_BAD_JSON", status=405)
    body = await req.json()
    await req.hs.account_data.put(user_id, room_id, data_type, body)
    return {}


def register(routes: RouteTable) -> None:
    routes.add("GET", CLIENT_V3 + "/profile/{userId}", get_profile)
    routes.add("GET", CLIENT_V3 + "/profile/{userId}/{keyName}", get_profile_field)
    routes.add("PUT", CLIENT_V3 + "/profile/{userId}/{keyName}", put_profile_field)
    routes.add("DELETE", CLIENT_V3 + "/profile/{userId}/{keyName}", delete_profile_field)
    routes.add("GET", CLIENT_V3 + "/user/{userId}/account_data/{type}", get_account_data)
    routes.add("PUT", CLIENT_V3 + "/user/{userId}/account_data/{type}", put_account_data)
    routes.add("GET", CLIENT_V3 + "/user/{userId}/rooms/{roomId}/account_data/{type}", get_room_account_data)
    routes.add("PUT", CLIENT_V3 + "/user/{userId}/rooms/{roomId}/account_data/{type}", put_room_account_data)
