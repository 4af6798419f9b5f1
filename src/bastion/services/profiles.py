"""Profiles (display name, avatar URL) and their propagation into member events."""

from __future__ import annotations

import logging
from typing import Any

from bastion.core.ids import is_valid_user_id
from bastion.errors import BadJson, Forbidden, MatrixError, NotFound
from bastion.services.caches import MembershipIndex
from bastion.services.requester import Requester
from bastion.services.room_events import EventService, EventSpec
from bastion.storage import accounts as accounts_store
from bastion.storage.database import Database

log = logging.getLogger(__name__)

MAX_DISPLAYNAME = 256
MAX_AVATAR_URL = 1024
FIELDS = {"displayname": MAX_DISPLAYNAME, "avatar_url": MAX_AVATAR_URL}


class ProfileService:
    def __init__(self, db: Database, events: EventService, memberships: MembershipIndex) -> None:
        self._db = db
        self._events = events
        self._memberships = memberships

    async def get(self, user_id: str) -> dict[str, Any]:
        if not is_valid_user_id(user_id):
            raise MatrixError("Invalid user ID", errcode="M_INVALID_PARAM", status=400)
        profile = await self._db.read(accounts_store.get_profile, user_id)
        if profile is None:
            raise NotFound("Profile not found")
        out: dict[str, Any] = {}
        if profile[0] is not None:
            out["displayname"] = profile[0]
        if profile[1] is not None:
            out["avatar_url"] = profile[1]
        return out

    async def set_field(self, requester: Requester, user_id: str, field: str, value: Any) -> None:
        if user_id != requester.user_id and not requester.is_admin:
            raise Forbidden("You can only change your own profile")
        if field not in FIELDS:
            raise MatrixError("Unknown profile field", errcode="M_UNRECOGNIZED", status=400)
        if value is not None and not isinstance(value, str):
            raise BadJson(f"'{field}' must be a string")
        if value is not None and len(value) > FIELDS[field]:
            raise BadJson(f"'{field}' is too long")
        if value is not None and "\x00" in value:
            raise BadJson(f"'{field}' contains a NUL character")
        if field == "avatar_url" and value and not value.startswith("mxc://"):
            raise BadJson("'avatar_url' must be an mxc:// URI")
        if await self._db.read(accounts_store.get_profile, user_id) is None:
            raise NotFound("Profile not found")
        await self._db.write(accounts_store.set_profile_field, user_id, field, value or None)
        await self._propagate(user_id, field, value or None)

    async def _propagate(self, user_id: str, field: str, value: str | None) -> None:
        """Send an updated m.room.member event into every room the user has joined."""
        rooms = await self._memberships.rooms_for(user_id)
        for room_id, membership in list(rooms.items()):
            if membership.membership != "join":
                continue
            room = await self._events.rooms.get(room_id)
            if room is None:
                continue
            try:
                async with room.lock:
                    current = room.state.get(("m.room.member", user_id))
                    if current is None or current.membership != "join":
                        continue
                    content = {k: v for k, v in current.content.items() if k not in ("reason",)}
                    if value is None:
                        content.pop(field, None)
                    else:
                        content[field] = value
                    if content == current.content:
                        continue
                    await self._events.send_locked(
                        room, [EventSpec(user_id, "m.room.member", content, state_key=user_id)]
                    )
            except MatrixError as exc:
                log.info("profile change not propagated to %s: %s", room_id, exc.message)
