"""Room aliases (the ``/directory/room`` endpoints)."""

from __future__ import annotations

from typing import Any

from bastion.clock import now_ms
from bastion.core.auth_rules import required_power_level, user_power_level
from bastion.core.ids import server_of
from bastion.errors import Forbidden, MatrixError, NotFound
from bastion.services.requester import Requester
from bastion.services.room_events import EventService
from bastion.storage import rooms as rooms_store
from bastion.storage.database import Database


class AliasService:
    def __init__(self, server_name: str, db: Database, events: EventService) -> None:
        self.server_name = server_name
        self._db = db
        self._events = events
        # Aliases being created in a transaction that has not committed yet (createRoom
        # inserts the alias and the m.room.canonical_alias event together).
        self.pending: dict[str, str] = {}

    async def resolve(self, alias: str) -> dict[str, Any]:
        found = await self._db.read(rooms_store.get_alias, alias)
        if found is None:
            raise NotFound(f"Room alias {alias} not found")
        return {"room_id": found[0], "servers": [self.server_name]}

    async def create(self, requester: Requester, alias: str, room_id: str) -> None:
        if server_of(alias) != self.server_name:
            raise MatrixError("Aliases must be on this server", errcode="M_INVALID_PARAM", status=400)
        room = await self._events.rooms.get(room_id)
        if room is None or room.membership_of(requester.user_id) != "join":
            raise Forbidden("You must be in the room to give it an alias")
        if not await self._db.write(rooms_store.insert_alias, alias, room_id, requester.user_id, now_ms()):
            raise MatrixError("Room alias already exists", errcode="M_UNKNOWN", status=409)

    async def delete(self, requester: Requester, alias: str) -> None:
        found = await self._db.read(rooms_store.get_alias, alias)
        if found is None:
            raise NotFound(f"Room alias {alias} not found")
        room_id, creator = found
        allowed = requester.is_admin or creator == requester.user_id
        if not allowed:
            room = await self._events.rooms.get(room_id)
            if room is not None and room.membership_of(requester.user_id) == "join":
                needed = required_power_level("m.room.canonical_alias", True, room.state)
                allowed = user_power_level(requester.user_id, room.state) >= needed
        if not allowed:
            raise Forbidden("You may not delete this alias")
        await self._db.write(rooms_store.delete_alias, alias)

    async def for_room(self, requester: Requester, room_id: str) -> list[str]:
        room = await self._events.rooms.get(room_id)
        readable = room is not None and (
            room.membership_of(requester.user_id) == "join"
            or (room.visibility and room.visibility[-1][1] == "world_readable")
        )
        if not readable:
            raise Forbidden("You are not a member of this room")
        return await self._db.read(rooms_store.aliases_for_room, room_id)

    async def alias_points_to(self, alias: str, room_id: str) -> bool:
        if self.pending.get(alias) == room_id:
            return True
        found = await self._db.read(rooms_store.get_alias, alias)
        return found is not None and found[0] == room_id
