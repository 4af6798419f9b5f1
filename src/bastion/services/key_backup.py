"""Server-side key backup (``/room_keys``): opaque, client-encrypted Megolm sessions.

Versions are numbered per user; the newest undeleted one is "current". Uploads to a
version other than the current one get ``403 M_WRONG_ROOM_KEYS_VERSION``. A stored
session is replaced only by a better one (spec order: verified over unverified, then
the lower first message index, then the lower forward count), and every change moves
the version's ``etag``.
"""

from __future__ import annotations

from typing import Any

import orjson

from bastion.core.canonical_json import check_event_values
from bastion.core.ids import parse_digits
from bastion.errors import BadJson, InvalidParam, MatrixError, NotFound
from bastion.services.requester import Requester
from bastion.storage import e2e as e2e_store
from bastion.storage.database import Database, Txn

ALGORITHMS = ("m.megolm_backup.v1.curve25519-aes-sha2",)
MAX_SESSIONS_PER_UPLOAD = 10_000


class WrongVersion(MatrixError):
    status = 403
    errcode = "M_WRONG_ROOM_KEYS_VERSION"


def _parse_version(value: Any) -> int:
    number = parse_digits(value) if isinstance(value, str) else None
    if number is None:
        raise NotFound("Unknown backup version")
    return number


def _session(data: Any) -> tuple[int, int, bool, bytes]:
    if not isinstance(data, dict):
        raise BadJson("key backup data must be an object")
    first, forwarded, verified, session = (
        data.get("first_message_index"), data.get("forwarded_count"), data.get("is_verified"), data.get("session_data"),
    )
    if type(first) is not int or type(forwarded) is not int or first < 0 or forwarded < 0:
        raise BadJson("'first_message_index' and 'forwarded_count' must be non-negative integers")
    if not isinstance(verified, bool):
        raise BadJson("'is_verified' must be a boolean")
    if not isinstance(session, dict):
        raise BadJson("'session_data' must be an object")
    check_event_values(session, "session_data")
    return first, forwarded, verified, orjson.dumps(session)


def _better(new: tuple[int, int, bool, bytes], old: tuple[int, int, bool, bytes] | None) -> bool:
    if old is None:
        return True
    if new[2] != old[2]:
        return new[2]
    if new[0] != old[0]:
        return new[0] < old[0]
    return new[1] < old[1]


def _as_json(first: int, forwarded: int, verified: bool, session: bytes) -> dict[str, Any]:
    return {
        "first_message_index": first,
        "forwarded_count": forwarded,
        "is_verified": verified,
        "session_data": orjson.Fragment(session),
    }


class KeyBackupService:
    def __init__(self, db: Database) -> None:
        self._db = db

    @staticmethod
    def _check_info(body: dict[str, Any]) -> tuple[str, bytes]:
        algorithm = body.get("algorithm")
        if algorithm not in ALGORITHMS:
            raise BadJson(f"'algorithm' must be one of {', '.join(ALGORITHMS)}")
        auth_data = body.get("auth_data")
        if not isinstance(auth_data, dict):
            raise BadJson("'auth_data' must be an object")
        check_event_values(auth_data, "auth_data")
        return algorithm, orjson.dumps(auth_data)

    async def create(self, requester: Requester, body: dict[str, Any]) -> str:
        algorithm, auth_data = self._check_info(body)
        version = await self._db.write(e2e_store.create_backup, requester.user_id, algorithm, auth_data)
        return str(version)

    async def info(self, requester: Requester, version: str | None) -> dict[str, Any]:
        user = requester.user_id

        def load(txn: Txn) -> tuple[Any, int]:
            row = e2e_store.current_backup(txn, user) if version is None else e2e_store.get_backup(txn, user, _parse_version(version))
            count = e2e_store.count_backup_keys(txn, user, row[0]) if row is not None else 0
            return row, count

        row, count = await self._db.read(load)
        if row is None:
            raise NotFound("No current backup version" if version is None else "Unknown backup version")
        return {
            "algorithm": row[1],
            "auth_data": orjson.Fragment(row[2]),
            "count": count,
            "etag": str(row[3]),
            "version": str(row[0]),
        }

    async def update(self, requester: Requester, version: str, body: dict[str, Any]) -> None:
        number = _parse_version(version)
        algorithm, auth_data = self._check_info(body)
        if "version" in body and body["version"] != version:
            raise InvalidParam("The version in the body does not match the path")
        user = requester.user_id

        def txn_fn(txn: Txn) -> None:
            row = e2e_store.get_backup(txn, user, number)
            if row is None:
                raise NotFound("Unknown backup version")
            if row[1] != algorithm:
                raise InvalidParam("The algorithm of a backup version cannot change")
            e2e_store.update_backup(txn, user, number, auth_data)

        await self._db.write(txn_fn)

    async def delete(self, requester: Requester, version: str) -> None:
        if not await self._db.write(e2e_store.delete_backup, requester.user_id, _parse_version(version)):
            raise NotFound("Unknown backup version")

    # -- keys ----------------------------------------------------------------------------------------

    async def put_keys(self, requester: Requester, version: Any, rooms: dict[str, Any]) -> dict[str, Any]:
        number = _parse_version(version) if version is not None else None
        if number is None:
            raise MatrixError("The 'version' query parameter is required", errcode="M_MISSING_PARAM", status=400)
        sessions: list[tuple[str, str, tuple[int, int, bool, bytes]]] = []
        for room_id, room_data in rooms.items():
            if not isinstance(room_data, dict) or not isinstance(room_data.get("sessions"), dict):
                raise BadJson("each room needs a 'sessions' object")
            for session_id, data in room_data["sessions"].items():
                if "\x00" in room_id or "\x00" in session_id or len(session_id) > 255 or len(room_id) > 255:
                    raise BadJson("invalid room or session ID")
                sessions.append((room_id, session_id, _session(data)))
        if len(sessions) > MAX_SESSIONS_PER_UPLOAD:
            raise InvalidParam("Too many sessions in one upload")
        user = requester.user_id

        def txn_fn(txn: Txn) -> tuple[str, int]:
            current = e2e_store.current_backup(txn, user)
            if current is None:
                raise NotFound("Unknown backup version")
            if current[0] != number:
                raise WrongVersion("Wrong backup version", current_version=str(current[0]))
            changed = False
            for room_id, session_id, data in sessions:
                if _better(data, e2e_store.get_backup_key(txn, user, number, room_id, session_id)):
                    e2e_store.put_backup_key(txn, user, number, room_id, session_id, data)
                    changed = True
            if changed:
                e2e_store.bump_backup_etag(txn, user, number)
            row = e2e_store.get_backup(txn, user, number)
            assert row is not None
            return str(row[3]), e2e_store.count_backup_keys(txn, user, number)

        etag, count = await self._db.write(txn_fn)
        return {"etag": etag, "count": count}

    async def get_keys(self, requester: Requester, version: Any, room_id: str | None, session_id: str | None) -> dict[str, Any]:
        if version is None:
            raise MatrixError("The 'version' query parameter is required", errcode="M_MISSING_PARAM", status=400)
        number = _parse_version(version)
        user = requester.user_id

        def load(txn: Txn) -> Any:
            if e2e_store.get_backup(txn, user, number) is None:
                raise NotFound("Unknown backup version")
            return e2e_store.list_backup_keys(txn, user, number, room_id, session_id)

        rows = await self._db.read(load)
        if session_id is not None:
            if not rows:
                raise NotFound("No key for that session")
            _, _, first, forwarded, verified, data = rows[0]
            return _as_json(first, forwarded, verified, data)
        rooms: dict[str, Any] = {}
        for r_id, s_id, first, forwarded, verified, data in rows:
            rooms.setdefault(r_id, {"sessions": {}})["sessions"][s_id] = _as_json(first, forwarded, verified, data)
        if room_id is not None:
            return rooms.get(room_id, {"sessions": {}})
        return {"rooms": rooms}

    async def delete_keys(self, requester: Requester, version: Any, room_id: str | None, session_id: str | None) -> dict[str, Any]:
        if version is None:
            raise MatrixError("The 'version' query parameter is required", errcode="M_MISSING_PARAM", status=400)
        number = _parse_version(version)
        user = requester.user_id

        def txn_fn(txn: Txn) -> tuple[str, int]:
            if e2e_store.get_backup(txn, user, number) is None:
                raise NotFound("Unknown backup version")
            if e2e_store.delete_backup_keys(txn, user, number, room_id, session_id):
                e2e_store.bump_backup_etag(txn, user, number)
            row = e2e_store.get_backup(txn, user, number)
            assert row is not None
            return str(row[3]), e2e_store.count_backup_keys(txn, user, number)

        etag, count = await self._db.write(txn_fn)
        return {"etag": etag, "count": count}
