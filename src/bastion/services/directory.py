"""The published room directory and the user directory.

Who may publish a room is server policy (``room_directory.publishers``): by default
only server administrators, because a published room is visible to every account.
Room moderators (those who may set ``m.room.canonical_alias``) may always take their
room *out* of the directory.

The user directory returns users who share a room with the searcher or are joined to
a room whose join rule is ``public`` or whose history is ``world_readable`` (the
spec's minimum; not the room directory's publication flag) — or, with
``user_directory.search_all_users``, every active account (an enterprise directory).
Display names are encrypted at rest, so names are matched after decryption.
"""

from __future__ import annotations

import base64
from typing import Any

from bastion.core.auth_rules import join_rule, required_power_level, user_power_level
from bastion.core.ids import parse_digits
from bastion.core.visibility import normalise_visibility
from bastion.errors import BadJson, Forbidden, InvalidParam, NotFound
from bastion.services.caches import RoomCache, RoomSnapshot
from bastion.services.requester import Requester
from bastion.storage import directory as directory_store
from bastion.storage.database import Database

MAX_PUBLIC_ROOMS_LIMIT = 500


def _str_state(room: RoomSnapshot, event_type: str, key: str) -> str | None:
    event = room.state.get((event_type, ""))
    value = event.content.get(key) if event is not None else None
    return value if isinstance(value, str) and value else None


def room_chunk(room: RoomSnapshot) -> dict[str, Any]:
    """A PublishedRoomsChunk for one room."""
    history = room.state.get(("m.room.history_visibility", ""))
    guest = room.state.get(("m.room.guest_access", ""))
    create = room.state.get(("m.room.create", ""))
    chunk: dict[str, Any] = {
        "room_id": room.room_id,
        "num_joined_members": len(room.joined),
        "world_readable": normalise_visibility(history.content.get("history_visibility") if history else None)
        == "world_readable",
        "guest_can_join": guest is not None and guest.content.get("guest_access") == "can_join",
        "join_rule": join_rule(room.state),
    }
    for key, (event_type, field) in {
        "name": ("m.room.name", "name"),
        "topic": ("m.room.topic", "topic"),
        "canonical_alias": ("m.room.canonical_alias", "alias"),
        "avatar_url": ("m.room.avatar", "url"),
    }.items():
        value = _str_state(room, event_type, field)
        if value is not None:
            chunk[key] = value
    room_type = create.content.get("type") if create is not None else None
    if isinstance(room_type, str):
        chunk["room_type"] = room_type
    return chunk


def _encode_offset(offset: int) -> str:
    return base64.urlsafe_b64encode(f"o{offset}".encode()).decode().rstrip("=")


def _decode_offset(token: str) -> int:
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)).decode()
    except (ValueError, UnicodeDecodeError):
        raise InvalidParam("Invalid 'since' token") from None
    number = parse_digits(raw[1:], max_digits=11) if raw.startswith("o") else None
    if number is None:
        raise InvalidParam("Invalid 'since' token")
    return number


class DirectoryService:
    def __init__(
        self,
        db: Database,
        rooms: RoomCache,
        server_name: str,
        publishers: str = "admins",
        search_all_users: bool = False,
    ) -> None:
        self._db = db
        self._rooms = rooms
        self.server_name = server_name
        self._publishers = publishers
        self._search_all = search_all_users
        self._names: directory_store.NameCache = {}  # decrypted display names by ciphertext
        self._room_settings_filled = False

    def may_publish(self, requester: Requester, room: RoomSnapshot | None) -> bool:
        """Whether ``requester`` may publish ``room`` (None: a room they are creating)."""
        if requester.is_admin:
            return True
        if self._publishers == "room_moderators":
            return room is None or self._is_moderator(requester.user_id, room)
        return False

    @staticmethod
    def _is_moderator(user_id: str, room: RoomSnapshot) -> bool:
        if room.membership_of(user_id) != "join":
            return False
        needed = required_power_level("m.room.canonical_alias", True, room.state)
        return user_power_level(user_id, room.state) >= needed

    async def get_visibility(self, room_id: str) -> dict[str, str]:
        public = await self._db.read(directory_store.is_public, room_id)
        if public is None:
            raise NotFound("Room not found")
        return {"visibility": "public" if public else "private"}

    async def set_visibility(self, requester: Requester, room_id: str, visibility: Any) -> None:
        if visibility not in ("public", "private"):
            raise BadJson("'visibility' must be 'public' or 'private'")
        room = await self._rooms.get(room_id)
        if room is None:
            raise NotFound("Room not found")
        if visibility == "public":
            if not self.may_publish(requester, room):
                raise Forbidden("Only server administrators may publish rooms to the directory")
        elif not (requester.is_admin or self._is_moderator(requester.user_id, room)):
            raise Forbidden("You may not change this room's directory visibility")
        await self._db.write(directory_store.set_public, room_id, visibility == "public")

    async def public_rooms(self, *, limit: int | None, since: str | None, search: str | None, room_types: list[Any] | None) -> dict[str, Any]:
        room_ids = await self._db.read(directory_store.public_room_ids)
        chunks = []
        needle = search.lower() if search else None
        for room_id in room_ids:
            room = await self._rooms.get(room_id)
            if room is None:
                continue
            chunk = room_chunk(room)
            if room_types is not None and chunk.get("room_type") not in room_types:
                continue
            if needle is not None:
                haystack = " ".join(str(chunk.get(k, "")) for k in ("name", "topic", "canonical_alias", "room_id")).lower()
                if needle not in haystack:
                    continue
            chunks.append(chunk)
        chunks.sort(key=lambda c: (-c["num_joined_members"], c["room_id"]))
        offset = _decode_offset(since) if since else 0
        size = min(limit, MAX_PUBLIC_ROOMS_LIMIT) if limit and limit > 0 else len(chunks) or 1
        page = chunks[offset : offset + size]
        result: dict[str, Any] = {"chunk": page, "total_room_count_estimate": len(chunks)}
        if offset + size < len(chunks):
            result["next_batch"] = _encode_offset(offset + size)
        if offset > 0:
            result["prev_batch"] = _encode_offset(max(0, offset - size))
        return result

    async def search_users(self, requester: Requester, term: str, limit: int) -> dict[str, Any]:
        if not self._room_settings_filled:
            # Rooms created before the columns existed (once per start; a no-op after).
            await self._db.write(directory_store.fill_room_settings)
            self._room_settings_filled = True
        rows = await self._db.read(
            directory_store.search_users, requester.user_id, term, limit + 1, self._search_all, self._names
        )
        results = [
            {k: v for k, v in (("user_id", r[0]), ("display_name", r[1]), ("avatar_url", r[2])) if v is not None}
            for r in rows[:limit]
        ]
        return {"limited": len(rows) > limit, "results": results}
