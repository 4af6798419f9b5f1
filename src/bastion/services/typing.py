"""Typing notifications: in memory only, with expiry.

Each change (start, stop, expiry) moves the typing stream on and wakes the room's
members; ``/sync`` then carries the room's current list of typing users. Nothing is
written to the database: typing state is worthless after a restart.
"""

from __future__ import annotations

import asyncio
from dataclasses import replace

from bastion.errors import Forbidden, InvalidParam
from bastion.services.caches import RoomCache
from bastion.services.requester import Requester
from bastion.streams.notifier import Notifier

MAX_TIMEOUT_MS = 120_000
DEFAULT_TIMEOUT_MS = 30_000


class TypingService:
    def __init__(self, rooms: RoomCache, notifier: Notifier) -> None:
        self._rooms = rooms
        self._notifier = notifier
        self._typing: dict[str, dict[str, asyncio.TimerHandle]] = {}
        self._room_stream: dict[str, int] = {}
        self._stream = notifier.current.typing

    async def set_typing(self, requester: Requester, room_id: str, user_id: str, typing: bool, timeout_ms: int | None) -> None:
        if user_id != requester.user_id:
            raise Forbidden("You can only set your own typing state")
        room = await self._rooms.get(room_id)
        if room is None or room.membership_of(user_id) != "join":
            raise Forbidden("You are not in this room")
        users = self._typing.setdefault(room_id, {})
        existing = users.pop(user_id, None)
        if existing is not None:
            existing.cancel()
        if typing:
            if timeout_ms is None:
                timeout_ms = DEFAULT_TIMEOUT_MS
            if timeout_ms < 0:
                raise InvalidParam("'timeout' must not be negative")
            delay = min(timeout_ms, MAX_TIMEOUT_MS) / 1000
            users[user_id] = asyncio.get_running_loop().call_later(delay, self._expire, room_id, user_id)
            if existing is not None:
                return  # still typing: refreshing the timeout changes nothing visible
        elif existing is None:
            return  # was not typing
        self._changed(room_id)

    def _expire(self, room_id: str, user_id: str) -> None:
        users = self._typing.get(room_id)
        if users is not None and users.pop(user_id, None) is not None:
            self._changed(room_id)

    def stop_user(self, room_id: str, user_id: str) -> None:
        """A member left (or sent a message): they are no longer typing."""
        users = self._typing.get(room_id)
        handle = users.pop(user_id, None) if users is not None else None
        if handle is not None:
            handle.cancel()
            self._changed(room_id)

    def _changed(self, room_id: str) -> None:
        self._stream += 1
        self._room_stream[room_id] = self._stream
        if not self._typing.get(room_id):
            self._typing.pop(room_id, None)
        self._notifier.advance(replace(self._notifier.current, typing=self._stream))
        room = self._rooms.cached(room_id)
        if room is not None:
            self._notifier.notify_users(room.joined)

    def typing_event(self, room_id: str, after: int | None, upto: int) -> dict[str, object] | None:
        """The ``m.typing`` ephemeral event for a sync, or None if nothing to say."""
        changed_at = self._room_stream.get(room_id, 0)
        if after is not None and changed_at <= after:
            return None
        users = sorted(self._typing.get(room_id, {}))
        if after is None and not users:
            return None
        if changed_at > upto and after is not None:
            return None  # changed after this response's cut; the next sync says it
        return {"type": "m.typing", "content": {"user_ids": users}}

    def room_stream(self, room_id: str) -> int:
        return self._room_stream.get(room_id, 0)

    def close(self) -> None:
        for users in self._typing.values():
            for handle in users.values():
                handle.cancel()
        self._typing.clear()
