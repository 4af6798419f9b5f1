"""Profiles: display name, avatar URL, time zone and custom fields (Matrix v1.16).

``displayname`` and ``avatar_url`` changes propagate into the user's member events
in every joined room. Other fields (``m.tz`` and namespaced custom keys) are stored
as JSON values; the whole profile is limited to 64 KiB as the spec requires.
"""

from __future__ import annotations

import logging
import re
from typing import Any

import orjson

from bastion.core.canonical_json import check_event_values
from bastion.core.ids import is_valid_user_id
from bastion.errors import BadJson, Forbidden, MatrixError, NotFound
from bastion.services.caches import MembershipIndex
from bastion.services.requester import Requester
from bastion.services.room_events import EventService, EventSpec
from bastion.storage import accounts as accounts_store
from bastion.storage import directory as directory_store
from bastion.storage.database import Database, Txn

log = logging.getLogger(__name__)

MAX_DISPLAYNAME = 256
MAX_AVATAR_URL = 1024
MAX_PROFILE_BYTES = 64 * 1024
MAX_KEY_BYTES = 255
KEY_RE = re.compile(r"^(avatar_url|displayname|m\.tz|[a-z][a-z0-9_]*(\.[a-z][a-z0-9_]*)+)$")
LEGACY_FIELDS = {"displayname": MAX_DISPLAYNAME, "avatar_url": MAX_AVATAR_URL}


class ProfileService:
    def __init__(
        self,
        db: Database,
        events: EventService,
        memberships: MembershipIndex,
        *,
        limit_to_visible: bool = False,
        search_all_users: bool = False,
    ) -> None:
        self._db = db
        self._events = events
        self._memberships = memberships
        self._limit = limit_to_visible
        self._search_all = search_all_users

    async def get(self, user_id: str, requester: Requester | None = None) -> dict[str, Any]:
        """A user's profile; with ``user_directory.limit_profiles``, to a ``requester`` other
        than the user or an admin only if the user directory would find the user for them
        (else 403, whether or not the user exists: no probing for accounts)."""
        if not is_valid_user_id(user_id):
            raise MatrixError("Invalid user ID", errcode="M_INVALID_PARAM", status=400)
        if (
            self._limit
            and requester is not None
            and requester.user_id != user_id
            and not requester.is_admin
            and not await self._db.read(directory_store.may_find, requester.user_id, user_id, self._search_all)
        ):
            raise Forbidden("You do not share a room with this user")

        def load(txn: Txn) -> tuple[Any, Any]:
            return accounts_store.get_profile(txn, user_id), accounts_store.get_profile_fields(txn, user_id)

        profile, custom = await self._db.read(load)
        if profile is None:
            raise NotFound("Profile not found")
        out: dict[str, Any] = {field: orjson.Fragment(value) for field, value in custom.items()}
        if profile[0] is not None:
            out["displayname"] = profile[0]
        if profile[1] is not None:
            out["avatar_url"] = profile[1]
        return out

    @staticmethod
    def check_key(field: str) -> None:
        if len(field.encode()) > MAX_KEY_BYTES:
            raise MatrixError("Profile keys are at most 255 bytes", errcode="M_KEY_TOO_LARGE", status=400)
        if not KEY_RE.match(field):
            raise MatrixError(
                "Profile keys are displayname, avatar_url, m.tz or a namespaced key like com.example.field",
                errcode="M_INVALID_PARAM",
                status=400,
            )

    async def set_field(self, requester: Requester, user_id: str, field: str, value: Any) -> None:
        if user_id != requester.user_id and not requester.is_admin:
            raise Forbidden("You can only change your own profile")
        self.check_key(field)
        if field in LEGACY_FIELDS:
            if value is not None and not isinstance(value, str):
                raise BadJson(f"'{field}' must be a string")
            if value is not None and len(value) > LEGACY_FIELDS[field]:
                raise BadJson(f"'{field}' is too long")
            if value is not None and "\x00" in value:
                raise BadJson(f"'{field}' contains a NUL character")
            if field == "avatar_url" and value and not value.startswith("mxc://"):
                raise BadJson("'avatar_url' must be an mxc:// URI")
        elif field == "m.tz" and not isinstance(value, str):
            raise BadJson("'m.tz' must be a time zone name")
        else:
            check_event_values(value, field)
        current = await self.get(user_id)
        current[field] = value
        if len(orjson.dumps(current)) > MAX_PROFILE_BYTES:
            raise MatrixError("The profile would exceed 64 KiB", errcode="M_PROFILE_TOO_LARGE", status=400)
        if field in LEGACY_FIELDS:
            await self._db.write(accounts_store.set_profile_field, user_id, field, value or None)
            await self._propagate(user_id, field, value or None)
        else:
            await self._db.write(accounts_store.set_profile_custom_field, user_id, field, orjson.dumps(value))

    async def delete_field(self, requester: Requester, user_id: str, field: str) -> None:
        if user_id != requester.user_id and not requester.is_admin:
            raise Forbidden("You can only change your own profile")
        self.check_key(field)
        await self.get(user_id)  # 404 for unknown users
        if field in LEGACY_FIELDS:
            await self._db.write(accounts_store.set_profile_field, user_id, field, None)
            await self._propagate(user_id, field, None)
        else:
            await self._db.write(accounts_store.delete_profile_custom_field, user_id, field)

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
                    content = {k: v for k, v in current.content.items() if k != "reason"}
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
