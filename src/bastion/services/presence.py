"""Presence: online / unavailable / offline, with an optional status message.

Kept cheap on purpose: state lives in memory; the presence stream moves only when a
user's *visible* state changes (not on every request), and a ``/sync`` looks only at
the changes since its token — usually none. Syncing marks a user online (unless
``set_presence`` says otherwise); a user with no sync for ``offline_after_s`` goes
offline, and one who is online but idle for ``idle_after_s`` becomes unavailable.
With ``presence.enabled: false`` nothing is tracked and everyone reads as offline.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from dataclasses import dataclass, replace
from typing import Any

from bastion.clock import now_ms
from bastion.errors import BadJson, Forbidden
from bastion.services.caches import MembershipIndex, RoomCache, wake_members
from bastion.services.requester import Requester
from bastion.streams.notifier import Notifier

STATES = ("online", "unavailable", "offline")
MAX_CHANGES = 10_000
MAX_STATUS_MSG = 1024


@dataclass(slots=True)
class PresenceState:
    presence: str = "offline"
    status_msg: str | None = None
    last_active_ms: int = 0
    stream: int = 0
    remote_active: bool = False  # currently syncing on another worker


class PresenceService:
    def __init__(
        self,
        *,
        enabled: bool,
        rooms: RoomCache,
        memberships: MembershipIndex,
        notifier: Notifier,
        idle_after_s: float = 300,
        offline_after_s: float = 30,
    ) -> None:
        self.enabled = enabled
        self._rooms = rooms
        self._memberships = memberships
        self._notifier = notifier
        self._idle_after = idle_after_s
        self._offline_after = offline_after_s
        self._states: dict[str, PresenceState] = {}
        self._changes: deque[tuple[int, str]] = deque(maxlen=MAX_CHANGES)
        self._stream = notifier.current.presence
        self._syncing: dict[str, int] = {}
        self._last_sync: dict[str, float] = {}
        self._task: asyncio.Task[None] | None = None
        self.bus: Any = None

    def start(self) -> None:
        if self.enabled:
            self._task = asyncio.create_task(self._sweep(), name="presence-sweeper")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass

    # -- changing state ---------------------------------------------------------------------

    async def _set(self, user_id: str, presence: str, status_msg: str | None, keep_msg: bool, explicit: bool = False) -> None:
        changed = self._update(user_id, presence, status_msg, keep_msg)
        if changed is None:
            if not (explicit and self.bus is not None):
                return
            # Unchanged here, but a worker serving the user's syncs may think otherwise.
            changed = self._states[user_id]
        if self.bus is not None:
            await self.bus.publish("presence", {
                "u": user_id, "p": changed.presence, "m": changed.status_msg, "a": changed.last_active_ms,
                "c": user_id in self._syncing,
                # Set through PUT /presence: every worker takes it, even one that is
                # serving the user's syncs (which otherwise decides their presence).
                "x": explicit,
            })
        await self._wake_watchers(user_id)

    def _update(self, user_id: str, presence: str, status_msg: str | None, keep_msg: bool) -> PresenceState | None:
        state = self._states.get(user_id)
        if state is None:
            state = PresenceState()
            self._states[user_id] = state
        if presence == "online":
            state.last_active_ms = now_ms()
        new_msg = state.status_msg if keep_msg else status_msg
        if state.presence == presence and state.status_msg == new_msg:
            return None
        state.presence = presence
        state.status_msg = new_msg
        self._stream = max(now_ms(), self._stream + 1)  # clock-based: comparable across workers
        state.stream = self._stream
        self._changes.append((self._stream, user_id))
        self._notifier.advance(replace(self._notifier.current, presence=self._stream))
        return state

    async def on_bus(self, kind: str, data: dict[str, Any]) -> None:
        """A presence change made on another worker."""
        if kind != "presence" or not self.enabled:
            return
        user_id, presence = data.get("u"), data.get("p")
        if not isinstance(user_id, str) or presence not in STATES:
            return
        status_msg = data.get("m") if isinstance(data.get("m"), str) else None
        if user_id in self._syncing and not data.get("x"):
            return  # this worker serves the user's own syncs and decides their presence
        state = self._update(user_id, presence, status_msg, keep_msg=False)
        if state is None:
            state = self._states[user_id]
        active = data.get("a")
        if isinstance(active, int):
            state.last_active_ms = max(state.last_active_ms, active)
        state.remote_active = bool(data.get("c"))
        await self._wake_watchers(user_id)

    async def _wake_watchers(self, user_id: str) -> None:
        joined = [r for r, m in (await self._memberships.rooms_for(user_id)).items() if m.membership == "join"]
        await wake_members(self._rooms, self._notifier, joined, also=[user_id])

    async def set_status(self, requester: Requester, user_id: str, body: dict[str, Any]) -> None:
        if user_id != requester.user_id:
            raise Forbidden("You can only set your own presence")
        presence = body.get("presence")
        if presence not in STATES:
            raise BadJson("'presence' must be one of online, unavailable, offline")
        status_msg = body.get("status_msg")
        if status_msg is not None and (not isinstance(status_msg, str) or len(status_msg) > MAX_STATUS_MSG):
            raise BadJson("'status_msg' must be a string of at most 1024 characters")
        if self.enabled:
            await self._set(user_id, presence, status_msg, keep_msg=False, explicit=True)

    async def sync_started(self, user_id: str, set_presence: str | None) -> None:
        if not self.enabled:
            return
        self._syncing[user_id] = self._syncing.get(user_id, 0) + 1
        self._last_sync[user_id] = time.monotonic()
        wanted = set_presence or "online"
        current = self._states.get(user_id)
        if wanted == "offline":
            return  # "don't mark me online"; does not force offline
        if wanted == "online" and current is not None and current.presence == "unavailable" and set_presence is None:
            current.last_active_ms = now_ms()
        await self._set(user_id, wanted, None, keep_msg=True)

    def sync_finished(self, user_id: str) -> None:
        if not self.enabled:
            return
        count = self._syncing.get(user_id, 0) - 1
        if count <= 0:
            self._syncing.pop(user_id, None)
        else:
            self._syncing[user_id] = count
        self._last_sync[user_id] = time.monotonic()

    async def _sweep(self) -> None:
        while True:
            await asyncio.sleep(min(10.0, self._offline_after / 2))
            now = time.monotonic()
            wall = now_ms()
            for user_id, state in list(self._states.items()):
                if state.presence == "offline" or user_id in self._syncing:
                    if state.presence == "online" and wall - state.last_active_ms > self._idle_after * 1000:
                        await self._set(user_id, "unavailable", None, keep_msg=True)
                    continue
                last = self._last_sync.get(user_id)
                if last is not None and now - last > self._offline_after:
                    await self._set(user_id, "offline", None, keep_msg=True)
                    self._last_sync.pop(user_id, None)

    # -- reading state ---------------------------------------------------------------------------

    def _content(self, user_id: str, state: PresenceState) -> dict[str, Any]:
        content: dict[str, Any] = {"presence": state.presence}
        if state.last_active_ms:
            content["last_active_ago"] = max(0, now_ms() - state.last_active_ms)
        if state.status_msg is not None:
            content["status_msg"] = state.status_msg
        content["currently_active"] = state.presence == "online" and (user_id in self._syncing or state.remote_active)
        return content

    async def get_status(self, requester: Requester, user_id: str) -> dict[str, Any]:
        if user_id != requester.user_id and not await self._share_room(requester.user_id, user_id):
            raise Forbidden("You do not share a room with this user")
        state = self._states.get(user_id) if self.enabled else None
        if state is None:
            return {"presence": "offline"}
        return self._content(user_id, state)

    async def _share_room(self, a: str, b: str) -> bool:
        mine = await self._memberships.rooms_for(a)
        theirs = await self._memberships.rooms_for(b)
        return any(
            m.membership == "join" and room_id in theirs and theirs[room_id].membership == "join"
            for room_id, m in mine.items()
        )

    async def events_for(self, user_id: str, joined_rooms: list[str], after: int | None, upto: int) -> list[dict[str, Any]]:
        """m.presence events for users sharing a room with ``user_id`` that changed in (after, upto]."""
        if not self.enabled:
            return []
        if after is not None and after >= upto:
            return []
        candidates: set[str]
        if after is None or (len(self._changes) == MAX_CHANGES and self._changes[0][0] > after):
            # Initial sync, or the change log no longer reaches back: everyone not offline.
            candidates = {u for u, s in self._states.items() if s.presence != "offline" and s.stream <= upto}
            after = None
        else:
            candidates = {u for pos, u in self._changes if after < pos <= upto}
        if not candidates:
            return []
        peers: set[str] = set()
        for room_id in joined_rooms:
            room = self._rooms.cached(room_id) or await self._rooms.get(room_id)
            if room is not None:
                peers |= room.joined & candidates
        out = []
        for other in sorted(peers):
            state = self._states.get(other)
            if state is None or (after is not None and not (after < state.stream <= upto)):
                continue
            out.append({"type": "m.presence", "sender": other, "content": self._content(other, state)})
        return out
