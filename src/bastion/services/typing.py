"""Typing notifications: in memory only, with expiry.

Each change (start, stop, expiry) moves the typing stream on and wakes the room's
members; ``/sync`` then carries the room's current list of typing users. Nothing is
written to the database: typing state is worthless after a restart.

With several workers, each publishes its rooms' typing users (with their expiry
times) on the bus; the others merge them into what they serve. Typing positions are
clock-based (milliseconds, always moving forward) so a token from one worker is
meaningful on another. Without the bus, typing stays on the worker it was set on.
"""

from __future__ import annotations

import asyncio
from dataclasses import replace
from typing import Any

from bastion.clock import now_ms
from bastion.errors import Forbidden, InvalidParam
from bastion.services.caches import RoomCache, wake_members
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
        # room -> user -> expiry (ms), typing on other workers
        self._remote: dict[str, dict[str, int]] = {}
        self._remote_by_worker: dict[str, dict[str, dict[str, int]]] = {}
        self.bus: Any = None
        self._background: set[asyncio.Task[Any]] = set()

    async def set_typing(self, requester: Requester, room_id: str, user_id: str, typing: bool, timeout_ms: int | None) -> None:
        if user_id != requester.user_id:
            raise Forbidden("You can only set your own typing state")
        room = await self._rooms.get(room_id)
        if room is None or room.membership_of(user_id) != "join":
            raise Forbidden("You are not in this room")
        if typing and (timeout_ms is not None and timeout_ms < 0):
            raise InvalidParam("'timeout' must not be negative")
        users = self._typing.setdefault(room_id, {})
        existing = users.pop(user_id, None)
        if existing is not None:
            existing.cancel()
        remote_entry = False
        if self.bus is not None:
            # This worker now owns the user's typing state in the room: others drop theirs.
            remote_entry = self._drop_remote(room_id, user_id)
            await self.bus.publish("typing_drop", {"r": room_id, "u": user_id})
        if typing:
            if timeout_ms is None:
                timeout_ms = DEFAULT_TIMEOUT_MS
            if timeout_ms < 0:
                raise InvalidParam("'timeout' must not be negative")
            delay = min(timeout_ms, MAX_TIMEOUT_MS) / 1000
            users[user_id] = asyncio.get_running_loop().call_later(delay, self._expire, room_id, user_id)
            if existing is not None and not remote_entry:
                return  # still typing: refreshing the timeout changes nothing visible
        elif existing is None and not remote_entry:
            return  # was not typing
        self._changed(room_id)

    def _drop_remote(self, room_id: str, user_id: str) -> bool:
        """Forget what other workers said about the user in the room; True if they said anything."""
        found = False
        for users in self._remote_by_worker.get(room_id, {}).values():
            found = users.pop(user_id, None) is not None or found
        if self._remote.get(room_id, {}).pop(user_id, None) is not None:
            found = True
        return found

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

    def _changed(self, room_id: str, publish: bool = True) -> None:
        self._stream = max(now_ms(), self._stream + 1)
        self._room_stream[room_id] = self._stream
        if not self._typing.get(room_id):
            self._typing.pop(room_id, None)
        if publish and self.bus is not None:
            loop = asyncio.get_running_loop()
            now, at = now_ms(), loop.time()
            users = {u: now + int((h.when() - at) * 1000) for u, h in self._typing.get(room_id, {}).items()}
            task = loop.create_task(self.bus.publish("typing", {"r": room_id, "u": users}))
            self._background.add(task)
            task.add_done_callback(self._background.discard)
        self._notifier.advance(replace(self._notifier.current, typing=self._stream))
        room = self._rooms.cached(room_id)
        if room is not None:
            self._notifier.notify_users(room.joined)
        else:  # another worker's change, or the room left memory: its members need loading
            task = asyncio.get_running_loop().create_task(wake_members(self._rooms, self._notifier, [room_id]))
            self._background.add(task)
            task.add_done_callback(self._background.discard)

    def typing_event(self, room_id: str, after: int | None, upto: int) -> dict[str, object] | None:
        """The ``m.typing`` ephemeral event for a sync, or None if nothing to say."""
        changed_at = self._room_stream.get(room_id, 0)
        if after is not None and changed_at <= after:
            return None
        users = sorted(set(self._typing.get(room_id, {})) | self._remote_users(room_id))
        if after is None and not users:
            return None
        if changed_at > upto and after is not None:
            return None  # changed after this response's cut; the next sync says it
        return {"type": "m.typing", "content": {"user_ids": users}}

    def _remote_users(self, room_id: str) -> set[str]:
        remote = self._remote.get(room_id)
        if not remote:
            return set()
        now = now_ms()
        return {u for u, expires in remote.items() if expires > now}

    def on_bus(self, kind: str, data: dict[str, Any]) -> None:
        """Another worker's typing list for a room (it replaces what that worker said before)."""
        if kind == "typing_drop" and isinstance(data.get("r"), str) and isinstance(data.get("u"), str):
            # The user's typing state moved to another worker: drop the local entry.
            room_id, user_id = data["r"], data["u"]
            handle = self._typing.get(room_id, {}).pop(user_id, None)
            if handle is not None:
                handle.cancel()
                self._changed(room_id)
            return
        if kind != "typing" or not isinstance(data.get("r"), str) or not isinstance(data.get("u"), dict):
            return
        room_id = data["r"]
        sender = str(data.get("i"))
        per_worker = self._remote_by_worker.setdefault(room_id, {})
        per_worker[sender] = {u: int(e) for u, e in data["u"].items() if isinstance(u, str) and isinstance(e, int)}
        merged: dict[str, int] = {}
        for users in per_worker.values():
            merged.update(users)
        self._remote[room_id] = merged
        self._changed(room_id, publish=False)

    def room_stream(self, room_id: str) -> int:
        return self._room_stream.get(room_id, 0)

    def close(self) -> None:
        for users in self._typing.values():
            for handle in users.values():
                handle.cancel()
        self._typing.clear()
        for task in list(self._background):  # bus publishes, room loads for wake-ups
            task.cancel()
