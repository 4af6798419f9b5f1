"""Account deactivation: the account stops working at once; its room memberships end.

Deactivation is recorded first (tokens deleted, password removed, a pending job
row written) in one transaction, then the user leaves every room. If the server
stops half-way, or the CLI deactivated the user while the server was running or
stopped, the pending job finishes the work on the next run: no deactivated user
stays a room member.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

from bastion.clock import now_ms
from bastion.errors import MatrixError
from bastion.services.auth import AuthService
from bastion.services.caches import MembershipIndex
from bastion.services.requester import system_requester
from bastion.services.rooms import RoomService
from bastion.storage import accounts as accounts_store
from bastion.storage.database import Database, Txn

log = logging.getLogger(__name__)


def record_deactivation(txn: Txn, user_id: str, now: int) -> list[bytes]:
    """The synchronous part, shared with the CLI: returns the revoked token hashes."""
    accounts_store.mark_deactivated(txn, user_id)
    revoked = accounts_store.delete_all_devices(txn, user_id)
    accounts_store.add_pending_deactivation(txn, user_id, now)
    accounts_store.add_signal(txn, "deactivated", user_id, now)
    return revoked


class DeactivationService:
    def __init__(self, db: Database, auth: AuthService, rooms: RoomService, memberships: MembershipIndex) -> None:
        self._db = db
        self._auth = auth
        self._rooms = rooms
        self._memberships = memberships
        # Run after an erasing deactivation: crypto-shred the user's data, delete their media.
        self.erase_hooks: list[Callable[[str], Awaitable[Any]]] = []

    async def deactivate(self, user_id: str, erase: bool = False) -> None:
        revoked = await self._db.write(record_deactivation, user_id, now_ms())
        if erase:
            await self._db.write(accounts_store.set_profile_field, user_id, "displayname", None)
            await self._db.write(accounts_store.set_profile_field, user_id, "avatar_url", None)
        self._auth.forget_tokens(revoked)
        self._auth.forget_user(user_id)
        await self._auth.devices_removed(user_id, [])
        await self.finish(user_id)
        if erase:
            for hook in self.erase_hooks:
                await hook(user_id)

    async def finish(self, user_id: str) -> None:
        """Leave every room (idempotent), then clear the pending job."""
        self._auth.forget_user(user_id)
        rooms = await self._memberships.rooms_for(user_id)
        requester = system_requester(user_id)
        for room_id, membership in list(rooms.items()):
            if membership.membership in ("join", "invite", "knock"):
                try:
                    await self._rooms.leave(requester, room_id, "Account deactivated")
                except MatrixError as exc:
                    log.warning("could not remove %s from %s: %s", user_id, room_id, exc.message)
        await self._db.write(accounts_store.remove_pending_deactivation, user_id)

    async def finish_pending(self) -> None:
        for user_id in await self._db.read(accounts_store.list_pending_deactivations):
            await self.finish(user_id)
