"""Devices: list, inspect, rename, delete (deletion behind user-interactive auth).

Deleting a device deletes its access tokens in the same transaction and drops them
from the token cache, so the device is logged out at once.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from bastion.errors import BadJson, NotFound
from bastion.services.auth import AuthService, UiaService
from bastion.services.requester import Requester
from bastion.storage import accounts as accounts_store
from bastion.storage.accounts import DeviceRow
from bastion.storage.database import Database, Txn

MAX_DISPLAY_NAME = 256


class DeviceService:
    def __init__(self, db: Database, auth: AuthService, uia: UiaService) -> None:
        self._db = db
        self._auth = auth
        self._uia = uia

    def _to_dict(self, row: DeviceRow) -> dict[str, Any]:
        ts, ip = row.last_seen_ts, row.last_seen_ip
        fresh = self._auth.last_seen(row.user_id, row.device_id)
        if fresh is not None:
            ts, ip = fresh
        out: dict[str, Any] = {"device_id": row.device_id}
        if row.display_name is not None:
            out["display_name"] = row.display_name
        if ts is not None:
            out["last_seen_ts"] = ts
        if ip is not None:
            out["last_seen_ip"] = ip
        return out

    async def all(self, requester: Requester) -> list[dict[str, Any]]:
        rows = await self._db.read(accounts_store.list_devices, requester.user_id)
        return [self._to_dict(r) for r in rows]

    async def get(self, requester: Requester, device_id: str) -> dict[str, Any]:
        row = await self._db.read(accounts_store.get_device, requester.user_id, device_id)
        if row is None:
            raise NotFound("Device not found")
        return self._to_dict(row)

    async def update(self, requester: Requester, device_id: str, body: dict[str, Any]) -> None:
        name = body.get("display_name")
        if name is not None and (not isinstance(name, str) or len(name) > MAX_DISPLAY_NAME or "\x00" in name):
            raise BadJson("'display_name' must be a string of at most 256 characters")

        def txn_fn(txn: Txn) -> bool:
            if accounts_store.get_device(txn, requester.user_id, device_id) is None:
                return False
            accounts_store.set_device_display_name(txn, requester.user_id, device_id, name)
            return True

        if not await self._db.write(txn_fn):
            raise NotFound("Device not found")

    async def delete(self, requester: Requester, device_ids: Sequence[str], body: dict[str, Any], fingerprint: str) -> None:
        await self._uia.authenticate(body, flows=[["m.login.password"]], fingerprint=fingerprint, user_id=requester.user_id)

        def txn_fn(txn: Txn) -> list[bytes]:
            revoked: list[bytes] = []
            for device_id in device_ids:
                revoked += accounts_store.delete_device(txn, requester.user_id, device_id)
            return revoked

        self._auth.forget_tokens(await self._db.write(txn_fn))
        await self._auth.devices_removed(requester.user_id, list(device_ids))
