"""Purging rooms and erasing users, with crypto-shredding.

Deleting rows does not remove data from backups, free database pages, or WAL
archives. Destroying the *keys* does, for every copy at once: a room's content is
encrypted under the room's data keys (and its search index keyed by the room's
search key), so once those keys are gone nothing that copied the ciphertext can read
it — provided the copy did not also keep the data keys wrapped under a KEK that
still exists. Database backups do keep the wrapped data keys, which is why a purge
is completed against old backups by rotating the KEK and destroying the old one
(docs/security/encryption-at-rest.md, "Crypto-shredding and backups").

On SQLite, the key rows are overwritten in place (``secure_delete``) and the WAL is
checkpointed and truncated; on PostgreSQL the key table is vacuumed so no dead
tuple keeps the wrapped keys.
"""

from __future__ import annotations

import logging
from typing import Any

from bastion.clock import now_ms
from bastion.errors import MatrixError, NotFound
from bastion.services.caches import EventCache, MembershipIndex, RoomCache
from bastion.services.requester import system_requester
from bastion.services.rooms import RoomService
from bastion.storage import accounts as accounts_store
from bastion.storage import keys as keys_store
from bastion.storage.database import SECURE_DELETE_DEFAULT, Database, Txn

log = logging.getLogger(__name__)

# Tables keyed by user whose rows hold that user's sealed data and go with an erasure.
USER_TABLES = (
    "profile_fields", "account_data", "filters", "to_device_inbox", "push_rules", "push_rules_enabled", "pushers",
    "e2e_backup_keys", "e2e_backup_versions",
)


def tables_with_column(txn: Txn, column: str) -> list[str]:
    if txn.dialect == "sqlite":
        tables = [r[0] for r in txn.fetchall("SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%'")]
        return [t for t in tables if any(r[1] == column for r in txn.fetchall(f'PRAGMA table_info("{t}")'))]
    return [
        r[0]
        for r in txn.fetchall(
            "SELECT table_name FROM information_schema.columns WHERE table_schema = current_schema() AND column_name = ?",
            (column,),
        )
    ]


def _secure(txn: Txn, on: bool = True) -> None:
    """SQLite: overwrite everything deleted with zeros, free pages included (on), or go
    back to the connection's default (zeroing where it costs no extra I/O)."""
    if txn.dialect == "sqlite":
        txn.execute(f"PRAGMA secure_delete = {'ON' if on else SECURE_DELETE_DEFAULT}")


def purge_room_rows(txn: Txn, room_id: str) -> tuple[list[int], list[str]]:
    """Delete every row of the room and destroy its keys. Returns (destroyed DEK ids, members)."""
    _secure(txn)
    members = [r[0] for r in txn.fetchall("SELECT user_id FROM memberships WHERE room_id = ?", (room_id,))]
    # Idempotent-send records name the room's events, types and clients' transaction IDs
    # but have no room_id column: they go by the events they recorded.
    txn.execute("DELETE FROM event_txns WHERE event_id IN (SELECT event_id FROM events WHERE room_id = ?)", (room_id,))
    for table in tables_with_column(txn, "room_id"):
        txn.execute(f'DELETE FROM "{table}" WHERE room_id = ?', (room_id,))
    destroyed = keys_store.destroy_scope_keys(txn, "room", room_id)
    destroyed += keys_store.destroy_scope_keys(txn, "room-search", room_id)
    _secure(txn, False)
    accounts_store.add_signal(txn, "room_purged", room_id, now_ms())
    return destroyed, members


def erase_user_rows(txn: Txn, user_id: str) -> list[int]:
    """Delete the user's sealed personal data and destroy the user's keys."""
    _secure(txn)
    for table in USER_TABLES:
        txn.execute(f"DELETE FROM {table} WHERE user_id = ?", (user_id,))
    txn.execute("UPDATE profiles SET displayname = NULL, avatar_url = NULL WHERE user_id = ?", (user_id,))
    txn.execute("UPDATE devices SET display_name = NULL, last_seen_ip = NULL, last_seen_user_agent = NULL WHERE user_id = ?", (user_id,))
    destroyed = keys_store.destroy_scope_keys(txn, "user", user_id)
    _secure(txn, False)
    accounts_store.add_signal(txn, "user_erased", user_id, now_ms())
    return destroyed


def compact_after_shredding(db: Database) -> None:
    """Leave no copy of destroyed wrapped keys in free pages, the WAL or dead tuples."""

    try:
        db.maintenance("VACUUM encryption_keys" if db.dialect == "postgres" else "PRAGMA wal_checkpoint(TRUNCATE)")
    except Exception as exc:  # the keys are destroyed either way; this only tidies copies
        log.warning("compacting after key destruction failed: %s", exc)


class PurgeService:
    def __init__(
        self, db: Database, rooms: RoomService, room_cache: RoomCache, events: EventCache, memberships: MembershipIndex,
        server_name: str,
    ) -> None:
        self._db = db
        self._rooms = rooms
        self._room_cache = room_cache
        self._events = events
        self._memberships = memberships
        self._server_name = server_name

    async def purge_room(self, room_id: str) -> dict[str, Any]:
        """Make local members leave, delete the room everywhere, destroy its keys."""
        exists = await self._db.read(lambda txn: txn.fetchval("SELECT 1 FROM rooms WHERE room_id = ?", (room_id,)))
        if exists is None:
            raise NotFound("Unknown room")
        kicked: list[str] = []
        failed: list[str] = []
        room = await self._room_cache.get(room_id)
        if room is not None:
            for user_id, membership in list(_memberships(room).items()):
                if membership not in ("join", "invite", "knock") or not user_id.endswith(":" + self._server_name):
                    continue
                try:
                    await self._rooms.leave(system_requester(user_id), room_id, "This room has been removed")
                    kicked.append(user_id)
                except MatrixError as exc:
                    log.warning("purge: could not remove %s from %s: %s", user_id, room_id, exc.message)
                    failed.append(user_id)
        destroyed, members = await self._db.write(purge_room_rows, room_id)
        self.forget_room(room_id, members, destroyed)
        await _to_thread(compact_after_shredding, self._db)
        return {"kicked_users": kicked, "failed_to_kick_users": failed, "local_aliases": [], "new_room_id": None}

    def forget_room(self, room_id: str, members: list[str], destroyed: list[int]) -> None:
        self._room_cache.discard(room_id)
        self._events.drop_room(room_id)
        for user_id in members:
            self._memberships.drop(user_id)
        if self._db.crypto is not None:
            self._db.crypto.forget_keys(destroyed)
            self._db.crypto.forget_scope("room", room_id)
            self._db.crypto.forget_scope("room-search", room_id)

    async def room_purged_elsewhere(self, room_id: str) -> None:
        """Another process purged a room: drop what this one remembers of it."""
        self._room_cache.discard(room_id)
        self._events.drop_room(room_id)
        self._memberships.drop_all()
        if self._db.crypto is not None:
            self._db.crypto.forget_scope("room", room_id)
            self._db.crypto.forget_scope("room-search", room_id)
            self._db.crypto.forget_destroyed()

    async def erase_user(self, user_id: str) -> None:
        destroyed = await self._db.write(erase_user_rows, user_id)
        if self._db.crypto is not None:
            self._db.crypto.forget_keys(destroyed)
            self._db.crypto.forget_scope("user", user_id)
        await _to_thread(compact_after_shredding, self._db)


def _memberships(room: Any) -> dict[str, str]:
    return {key[1]: room.membership_of(key[1]) for key in room.state if key[0] == "m.room.member"}


async def _to_thread(fn: Any, *args: Any) -> Any:
    import asyncio

    return await asyncio.to_thread(fn, *args)
