"""Account data (global and per room), with its own position in the sync token.

Stream positions are allocated in the writing transaction (in order, across workers),
so a ``/sync`` that reads position *n* has every change up to *n*; changes other
workers make arrive through :mod:`bastion.cluster.replication`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace

import orjson

from bastion.cluster.replication import Replicator
from bastion.storage import rooms as rooms_store
from bastion.storage import streams as streams_store
from bastion.storage.database import Database, Txn
from bastion.streams.notifier import Notifier


@dataclass
class AccountDataChanges:
    global_: list[tuple[str, bytes]] = field(default_factory=list)
    room: list[tuple[str, str, bytes]] = field(default_factory=list)


class AccountDataService:
    def __init__(self, db: Database, notifier: Notifier, replicator: Replicator) -> None:
        self._db = db
        self._notifier = notifier
        self._replicator = replicator
        # Called with (user, room, type) when another worker changed account data.
        self.remote_change_hooks: list[Callable[[str, str, str], None]] = []
        # user -> newest account-data stream ID they have (unknown users: ask the DB)
        self._latest_for_user: dict[str, int] = {}
        self._ignored: dict[str, frozenset[str]] = {}
        self._ignored_changes = 0  # bumped on every change: a read that raced one is not cached

    async def put(self, user_id: str, room_id: str, data_type: str, content: dict[str, object]) -> None:
        encoded = orjson.dumps(content)

        def txn_fn(txn: Txn) -> int:
            stream_id = streams_store.allocate(txn, "account_data")
            rooms_store.put_account_data(txn, user_id, room_id, data_type, stream_id, encoded)
            return stream_id

        stream_id = await self._db.write(txn_fn)
        async with self._replicator.lock("account_data"):
            await self._replicator.before_local_apply("account_data", stream_id)
            if self._latest_for_user.get(user_id, 0) < stream_id:
                self._latest_for_user[user_id] = stream_id
            if data_type == "m.ignored_user_list" and not room_id:
                self._ignored_changes += 1
                self._ignored[user_id] = _parse_ignored(content)
            self._replicator.after_local_apply("account_data", stream_id)
            self._notifier.advance(replace(self._notifier.current, account_data=self._replicator.applied["account_data"]))
        self._notifier.notify_users([user_id])

    @staticmethod
    def load_changes(txn: Txn, after: int, upto: int) -> list[tuple[str, str, str, int]]:
        rows = txn.fetchall(
            "SELECT user_id, room_id, type, stream_id FROM account_data WHERE stream_id > ? AND stream_id <= ?",
            (after, upto),
        )
        return [(r[0], r[1], r[2], int(r[3])) for r in rows]

    async def apply_remote(self, rows: list[tuple[str, str, str, int]], upto: int) -> None:
        """Account data another worker wrote: refresh what is cached, wake the owners."""
        for user_id, room_id, data_type, stream_id in rows:
            # Recorded for users not cached yet too: a read of their changes may be in
            # flight, and the bound it stores when it returns must not hide this row.
            if self._latest_for_user.get(user_id, 0) < stream_id:
                self._latest_for_user[user_id] = stream_id
            if data_type == "m.ignored_user_list" and not room_id:
                self._ignored_changes += 1
                self._ignored.pop(user_id, None)
            for hook in self.remote_change_hooks:
                hook(user_id, room_id, data_type)
        self._notifier.advance(replace(self._notifier.current, account_data=upto))
        self._notifier.notify_users({r[0] for r in rows})

    async def ignored_users(self, user_id: str) -> frozenset[str]:
        """Users in the user's ``m.ignored_user_list`` (cached; updated on write)."""
        cached = self._ignored.get(user_id)
        if cached is not None:
            return cached
        return (await self.ignored_users_many([user_id]))[user_id]

    async def ignored_users_many(self, user_ids: Iterable[str]) -> dict[str, frozenset[str]]:
        """:meth:`ignored_users` for many users, reading the uncached ones in one transaction."""
        out: dict[str, frozenset[str]] = {}
        missing: list[str] = []
        for user_id in user_ids:
            cached = self._ignored.get(user_id)
            if cached is None:
                missing.append(user_id)
            else:
                out[user_id] = cached
        if missing:

            def load(txn: Txn) -> dict[str, bytes | None]:
                return {u: rooms_store.get_account_data(txn, u, "", "m.ignored_user_list") for u in missing}

            changes = self._ignored_changes
            for user_id, raw in (await self._db.read(load)).items():
                ignored = self._ignored.get(user_id)  # written here meanwhile: that is newer
                if ignored is None:
                    ignored = _parse_ignored(orjson.loads(raw)) if raw is not None else frozenset()
                    if changes == self._ignored_changes:  # else it may predate a change
                        self._ignored[user_id] = ignored
                out[user_id] = ignored
            while len(self._ignored) > 100_000:
                self._ignored.pop(next(iter(self._ignored)))
        return out

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
