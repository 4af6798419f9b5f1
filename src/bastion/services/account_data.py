"""Account data (global and per room), with its own position in the sync token.

Writes are serialised with a lock so the stream position only ever moves forward
over committed rows: a ``/sync`` that reads position *n* has every change up to *n*.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field, replace

import orjson

from bastion.storage import rooms as rooms_store
from bastion.storage.database import Database
from bastion.streams.notifier import Notifier


@dataclass
class AccountDataChanges:
    global_: list[tuple[str, bytes]] = field(default_factory=list)
    room: list[tuple[str, str, bytes]] = field(default_factory=list)


class AccountDataService:
    def __init__(self, db: Database, notifier: Notifier, last_stream_id: int) -> None:
        self._db = db
        self._notifier = notifier
        self._last = last_stream_id
        self._lock = asyncio.Lock()
        # user -> newest account-data stream ID they have (unknown users: ask the DB)
        self._latest_for_user: dict[str, int] = {}
        self._ignored: dict[str, frozenset[str]] = {}

    async def put(self, user_id: str, room_id: str, data_type: str, content: dict[str, object]) -> None:
        encoded = orjson.dumps(content)
        async with self._lock:
            stream_id = self._last + 1
            await self._db.write(rooms_store.put_account_data, user_id, room_id, data_type, stream_id, encoded)
            self._last = stream_id
            self._latest_for_user[user_id] = stream_id
            if data_type == "m.ignored_user_list" and not room_id:
                self._ignored[user_id] = _parse_ignored(content)
            self._notifier.advance(replace(self._notifier.current, account_data=stream_id))
            self._notifier.notify_users([user_id])

    async def ignored_users(self, user_id: str) -> frozenset[str]:
        """Users in the user's ``m.ignored_user_list`` (cached; updated on write)."""
        cached = self._ignored.get(user_id)
        if cached is not None:
            return cached
        raw = await self.get(user_id, "", "m.ignored_user_list")
        ignored = _parse_ignored(orjson.loads(raw)) if raw is not None else frozenset()
        self._ignored[user_id] = ignored
        if len(self._ignored) > 100_000:
            self._ignored.pop(next(iter(self._ignored)))
        return ignored

    async def get(self, user_id: str, room_id: str, data_type: str) -> bytes | None:
        return await self._db.read(rooms_store.get_account_data, user_id, room_id, data_type)

    async def changes(self, user_id: str, after: int, upto: int) -> AccountDataChanges:
        out = AccountDataChanges()
        if after >= upto:
            return out
        latest = self._latest_for_user.get(user_id)
        if latest is not None and latest <= after:
            return out
        rows = await self._db.read(rooms_store.account_data_since, user_id, after, upto)
        for room_id, data_type, content in rows:
            if room_id:
                out.room.append((room_id, data_type, content))
            else:
                out.global_.append((data_type, content))
        # An upper bound on the user's newest stream ID, so later syncs can skip the query.
        bound = upto if rows else after
        self._latest_for_user[user_id] = max(self._latest_for_user.get(user_id, 0), bound)
        return out


def _parse_ignored(content: object) -> frozenset[str]:
    users = content.get("ignored_users") if isinstance(content, dict) else None
    return frozenset(u for u in users if isinstance(u, str)) if isinstance(users, dict) else frozenset()
