"""Synapse-compatible media administration: quarantine and deletion.

Needs a server administrator's access token *and* a client address in
``admin_api.allowed_networks``.
"""

from __future__ import annotations

from typing import Any

from bastion.api.http import Request, RouteTable
from bastion.core.ids import is_valid_user_id
from bastion.errors import Forbidden, InvalidParam, Unrecognized

ADMIN = "/_synapse/admin/v1"


def _admin(req: Request) -> None:
    if not req.hs.settings.admin_api.enabled:
        raise Unrecognized("Unrecognized request")
    if not req.requester.is_admin:
        raise Forbidden("You are not a server administrator")


def _user(req: Request) -> str:
    user_id = req.params["userId"]
    if not is_valid_user_id(user_id):
        raise InvalidParam("Invalid user ID")
    return user_id


async def quarantine(req: Request) -> dict[str, Any]:
    """POST /_synapse/admin/v1/media/quarantine/{serverName}/{mediaId}"""
    _admin(req)
    await req.hs.media.quarantine(req.params["serverName"], req.params["mediaId"], True)
    return {}


async def unquarantine(req: Request) -> dict[str, Any]:
    """POST /_synapse/admin/v1/media/unquarantine/{serverName}/{mediaId}"""
    _admin(req)
    await req.hs.media.quarantine(req.params["serverName"], req.params["mediaId"], False)
    return {}


async def quarantine_user(req: Request) -> dict[str, Any]:
    """POST /_synapse/admin/v1/user/{userId}/media/quarantine"""
    _admin(req)
    return {"num_quarantined": await req.hs.media.quarantine_user(_user(req))}


async def delete_one(req: Request) -> dict[str, Any]:
    """DELETE /_synapse/admin/v1/media/{serverName}/{mediaId}"""
    _admin(req)
    req.hs.media.check_id(req.params["serverName"], req.params["mediaId"])
    await req.hs.media.delete([req.params["mediaId"]])
    return {"deleted_media": [req.params["mediaId"]], "total": 1}


async def delete_old(req: Request) -> dict[str, Any]:
    """POST /_synapse/admin/v1/media/delete?before_ts=...&size_gt=..."""
    _admin(req)
    before = req.query_int("before_ts", None, minimum=0)
    if before is None:
        raise InvalidParam("'before_ts' is required")
    total = await req.hs.media.delete_before(before, req.query_int("size_gt", 0, minimum=0) or 0)
    return {"total": total}


async def delete_user_media(req: Request) -> dict[str, Any]:
    """DELETE /_synapse/admin/v1/users/{userId}/media"""
    _admin(req)
    return {"total": await req.hs.media.delete_user_media(_user(req))}


def register(routes: RouteTable) -> None:
    routes.add("POST", ADMIN + "/media/quarantine/{serverName}/{mediaId}", quarantine, admin_network=True)
    routes.add("POST", ADMIN + "/media/unquarantine/{serverName}/{mediaId}", unquarantine, admin_network=True)
    routes.add("POST", ADMIN + "/user/{userId}/media/quarantine", quarantine_user, admin_network=True)
    routes.add("DELETE", ADMIN + "/media/{serverName}/{mediaId}", delete_one, admin_network=True)
    routes.add("POST", ADMIN + "/media/delete", delete_old, admin_network=True)
    routes.add("DELETE", ADMIN + "/users/{userId}/media", delete_user_media, admin_network=True)
