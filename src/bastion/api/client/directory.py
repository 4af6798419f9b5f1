"""Published room directory, user directory, devices, tags, deactivation, upgrades."""

from __future__ import annotations

from typing import Any

from bastion.api.http import CLIENT_V3, Request, RouteTable
from bastion.core.ids import is_valid_room_id, is_valid_user_id
from bastion.errors import BadJson, Forbidden, InvalidParam, MissingParam
from bastion.services.auth import UiaService

MAX_TAG_LENGTH = 255


def _room(req: Request) -> str:
    room_id = req.params["roomId"]
    if not is_valid_room_id(room_id):
        raise InvalidParam("Invalid room ID")
    return room_id


def _fingerprint(req: Request) -> str:
    return UiaService.fingerprint(req.method, req.path.replace("/r0/", "/v3/"), req.requester.user_id)


# -- published room directory ------------------------------------------------------------


async def get_room_visibility(req: Request) -> dict[str, Any]:
    """GET /_matrix/client/v3/directory/list/room/{roomId}"""
    return await req.hs.directory.get_visibility(_room(req))


async def put_room_visibility(req: Request) -> dict[str, Any]:
    """PUT /_matrix/client/v3/directory/list/room/{roomId}"""
    body = await req.json()
    await req.hs.directory.set_visibility(req.requester, _room(req), body.get("visibility", "public"))
    return {}


def _check_server(server: Any, hs: Any) -> None:
    if server is not None and server != hs.settings.server_name:
        raise Forbidden("This server does not federate; only its own directory can be listed")


async def get_public_rooms(req: Request) -> dict[str, Any]:
    """GET /_matrix/client/v3/publicRooms"""
    if not req.hs.settings.room_directory.public_without_auth:
        await req.authenticate()
    _check_server(req.query_str("server"), req.hs)
    limit = req.query_int("limit", None, minimum=0)
    return await req.hs.directory.public_rooms(limit=limit, since=req.query_str("since") or None, search=None, room_types=None)


async def post_public_rooms(req: Request) -> dict[str, Any]:
    """POST /_matrix/client/v3/publicRooms"""
    _check_server(req.query_str("server"), req.hs)
    body = await req.json()
    limit = body.get("limit")
    if limit is not None and (type(limit) is not int or limit < 0):
        raise BadJson("'limit' must be a non-negative integer")
    since = body.get("since")
    if since is not None and not isinstance(since, str):
        raise BadJson("'since' must be a string")
    flt = body.get("filter") or {}
    if not isinstance(flt, dict):
        raise BadJson("'filter' must be an object")
    term = flt.get("generic_search_term")
    if term is not None and not isinstance(term, str):
        raise BadJson("'generic_search_term' must be a string")
    room_types = flt.get("room_types")
    if room_types is not None and (
        not isinstance(room_types, list) or not all(t is None or isinstance(t, str) for t in room_types)
    ):
        raise BadJson("'room_types' must be a list of strings or null")
    return await req.hs.directory.public_rooms(limit=limit, since=since or None, search=term or None, room_types=room_types)


async def search_users(req: Request) -> dict[str, Any]:
    """POST /_matrix/client/v3/user_directory/search"""
    body = await req.json()
    term = body.get("search_term")
    if term is None:
        raise MissingParam("'search_term' is required")
    if not isinstance(term, str) or len(term) > 256 or "\x00" in term:
        raise BadJson("'search_term' must be a string")
    limit = body.get("limit", 10)
    if type(limit) is not int or limit < 0:
        raise BadJson("'limit' must be a non-negative integer")
    return await req.hs.directory.search_users(req.requester, term, min(limit, 100))


# -- devices -------------------------------------------------------------------------------


async def get_devices(req: Request) -> dict[str, Any]:
    """GET /_matrix/client/v3/devices"""
    return {"devices": await req.hs.devices.all(req.requester)}


async def get_device(req: Request) -> dict[str, Any]:
    """GET /_matrix/client/v3/devices/{deviceId}"""
    return await req.hs.devices.get(req.requester, req.params["deviceId"])


async def put_device(req: Request) -> dict[str, Any]:
    """PUT /_matrix/client/v3/devices/{deviceId}"""
    await req.hs.devices.update(req.requester, req.params["deviceId"], await req.json())
    return {}


async def delete_device(req: Request) -> dict[str, Any]:
    """DELETE /_matrix/client/v3/devices/{deviceId}"""
    body = await req.json(allow_empty=True)
    await req.hs.devices.delete(req.requester, [req.params["deviceId"]], body, _fingerprint(req))
    return {}


async def delete_devices(req: Request) -> dict[str, Any]:
    """POST /_matrix/client/v3/delete_devices"""
    body = await req.json()
    devices = body.get("devices")
    if not isinstance(devices, list) or not all(isinstance(d, str) and "\x00" not in d for d in devices):
        raise BadJson("'devices' must be a list of device IDs")
    await req.hs.devices.delete(req.requester, devices, body, _fingerprint(req))
    return {}


# -- tags ------------------------------------------------------------------------------------


def _own_user(req: Request) -> str:
    user_id = req.params["userId"]
    if not is_valid_user_id(user_id) or user_id != req.requester.user_id:
        raise Forbidden("You can only access your own tags")
    return user_id


async def _tags(req: Request, user_id: str, room_id: str) -> dict[str, Any]:
    import orjson

    raw = await req.hs.account_data.get(user_id, room_id, "m.tag")
    content = orjson.loads(raw) if raw is not None else {}
    tags = content.get("tags") if isinstance(content, dict) else None
    return tags if isinstance(tags, dict) else {}


async def get_tags(req: Request) -> dict[str, Any]:
    """GET /_matrix/client/v3/user/{userId}/rooms/{roomId}/tags"""
    return {"tags": await _tags(req, _own_user(req), _room(req))}


async def put_tag(req: Request) -> dict[str, Any]:
    """PUT /_matrix/client/v3/user/{userId}/rooms/{roomId}/tags/{tag}"""
    user_id, room_id, tag = _own_user(req), _room(req), req.params["tag"]
    if not tag or len(tag.encode()) > MAX_TAG_LENGTH:
        raise InvalidParam("Tags are 1 to 255 bytes")
    body = await req.json()
    order = body.get("order")
    if order is not None and (isinstance(order, bool) or not isinstance(order, int | float)):
        raise BadJson("'order' must be a number")
    tags = await _tags(req, user_id, room_id)
    tags[tag] = body
    await req.hs.account_data.put(user_id, room_id, "m.tag", {"tags": tags})
    return {}


async def delete_tag(req: Request) -> dict[str, Any]:
    """DELETE /_matrix/client/v3/user/{userId}/rooms/{roomId}/tags/{tag}"""
    user_id, room_id, tag = _own_user(req), _room(req), req.params["tag"]
    tags = await _tags(req, user_id, room_id)
    if tags.pop(tag, None) is not None:
        await req.hs.account_data.put(user_id, room_id, "m.tag", {"tags": tags})
    return {}


# -- account deactivation and room upgrades -----------------------------------------------------------


async def deactivate(req: Request) -> dict[str, Any]:
    """POST /_matrix/client/v3/account/deactivate"""
    body = await req.json(allow_empty=True)
    erase = body.get("erase", False)
    if not isinstance(erase, bool):
        raise BadJson("'erase' must be a boolean")
    user = req.requester.user_id
    await req.hs.uia.authenticate(body, flows=[["m.login.password"]], fingerprint=_fingerprint(req), user_id=user)
    await req.hs.deactivation.deactivate(user, erase=erase)
    return {"id_server_unbind_result": "no-support"}


async def upgrade_room(req: Request) -> dict[str, Any]:
    """POST /_matrix/client/v3/rooms/{roomId}/upgrade"""
    body = await req.json()
    if "new_version" not in body:
        raise MissingParam("'new_version' is required")
    new_room = await req.hs.rooms.upgrade(req.requester, _room(req), body["new_version"])
    return {"replacement_room": new_room}


def register(routes: RouteTable) -> None:
    routes.add("GET", CLIENT_V3 + "/directory/list/room/{roomId}", get_room_visibility, auth=False)
    routes.add("PUT", CLIENT_V3 + "/directory/list/room/{roomId}", put_room_visibility)
    routes.add("GET", CLIENT_V3 + "/publicRooms", get_public_rooms, auth=False)
    routes.add("POST", CLIENT_V3 + "/publicRooms", post_public_rooms)
    routes.add("POST", CLIENT_V3 + "/user_directory/search", search_users)
    routes.add("GET", CLIENT_V3 + "/devices", get_devices)
    routes.add("GET", CLIENT_V3 + "/devices/{deviceId}", get_device)
    routes.add("PUT", CLIENT_V3 + "/devices/{deviceId}", put_device)
    routes.add("DELETE", CLIENT_V3 + "/devices/{deviceId}", delete_device)
    routes.add("POST", CLIENT_V3 + "/delete_devices", delete_devices)
    routes.add("GET", CLIENT_V3 + "/user/{userId}/rooms/{roomId}/tags", get_tags)
    routes.add("PUT", CLIENT_V3 + "/user/{userId}/rooms/{roomId}/tags/{tag}", put_tag)
    routes.add("DELETE", CLIENT_V3 + "/user/{userId}/rooms/{roomId}/tags/{tag}", delete_tag)
    routes.add("POST", CLIENT_V3 + "/account/deactivate", deactivate)
    routes.add("POST", CLIENT_V3 + "/rooms/{roomId}/upgrade", upgrade_room)


