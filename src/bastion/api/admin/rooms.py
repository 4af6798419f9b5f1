"""Synapse-compatible room administration: delete (purge) a room, with crypto-shredding.

``DELETE /_synapse/admin/v1/rooms/{roomId}`` makes every local member leave, deletes
every row of the room and destroys the room's data keys, so its content cannot be
read from any copy of the database that lacks those keys (docs/security/encryption-at-rest.md).
Needs a server administrator's token and a client address in ``admin_api.allowed_networks``.
"""

from __future__ import annotations

from typing import Any

from bastion.api.admin.media import ADMIN, _admin
from bastion.api.http import Request, RouteTable
from bastion.core.ids import is_valid_room_id
from bastion.errors import InvalidParam


async def delete_room(req: Request) -> dict[str, Any]:
    """DELETE /_synapse/admin/v1/rooms/{roomId} (body: {"purge": true}, the default)."""
    _admin(req)
    room_id = req.params["roomId"]
    if not is_valid_room_id(room_id):
        raise InvalidParam("Invalid room ID")
    body = await req.json(allow_empty=True)
    if body.get("purge", True) is not True:
        raise InvalidParam("Only purging deletion is supported ('purge': true)")
    if body.get("new_room_user_id") is not None:
        raise InvalidParam("'new_room_user_id' is not supported")
    return await req.hs.purge.purge_room(room_id)


def register(routes: RouteTable) -> None:
    routes.add("DELETE", ADMIN + "/rooms/{roomId}", delete_room, admin_network=True)
