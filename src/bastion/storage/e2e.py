"""Storage for end-to-end encryption keys, to-device messages and key backups.

Everything here is public key material or ciphertext the clients produced: the
server never holds a private key or a plaintext of an encrypted message.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import orjson

from bastion.storage import invalidations
from bastion.storage.database import Txn
from bastion.storage.sealed import seal, unseal

# -- device keys -------------------------------------------------------------------------------


def get_device_keys(txn: Txn, user_id: str, device_id: str) -> dict[str, Any] | None:
    raw = txn.fetchval("SELECT keys FROM e2e_device_keys WHERE user_id = ? AND device_id = ?", (user_id, device_id))
    return orjson.loads(raw) if raw is not None else None


def set_device_keys(txn: Txn, user_id: str, device_id: str, keys: dict[str, Any]) -> None:
    txn.execute(
        "INSERT INTO e2e_device_keys (user_id, device_id, keys) VALUES (?, ?, ?) "
        "ON CONFLICT (user_id, device_id) DO UPDATE SET keys = excluded.keys",
        (user_id, device_id, orjson.dumps(keys)),
    )


def query_device_keys(txn: Txn, user_id: str, device_ids: Sequence[str] | None) -> dict[str, tuple[dict[str, Any], str | None]]:
    """device_id -> (keys, device display name) for devices that still exist."""
    from bastion.storage.accounts import device_display_names

    params: list[Any] = [user_id]
    clause = ""
    if device_ids:
        clause = f" AND k.device_id IN ({txn.in_list(device_ids)})"
        params += list(device_ids)
    rows = txn.fetchall(
        "SELECT k.device_id, k.keys FROM e2e_device_keys k JOIN devices d "
        "ON d.user_id = k.user_id AND d.device_id = k.device_id WHERE k.user_id = ?" + clause,
        params,
    )
    names = device_display_names(txn, user_id) if rows else {}
    return {r[0]: (orjson.loads(r[1]), names.get(r[0])) for r in rows}


def delete_device_e2e(txn: Txn, user_id: str, device_id: str) -> None:
    for table in ("e2e_device_keys", "e2e_one_time_keys", "e2e_fallback_keys", "to_device_inbox"):
        txn.execute(f"DELETE FROM {table} WHERE user_id = ? AND device_id = ?", (user_id, device_id))
    txn.execute("DELETE FROM e2e_signatures WHERE target_user = ? AND target_key = ?", (user_id, device_id))
    invalidations.record(txn, invalidations.KEYS, user_id, device_id)


# -- one-time and fallback keys --------------------------------------------------------------------


def existing_one_time_keys(txn: Txn, user_id: str, device_id: str, ids: Sequence[tuple[str, str]]) -> dict[tuple[str, str], bytes]:
    out: dict[tuple[str, str], bytes] = {}
    for algorithm, key_id in ids:
        raw = txn.fetchval(
            "SELECT key FROM e2e_one_time_keys WHERE user_id = ? AND device_id = ? AND algorithm = ? AND key_id = ?",
            (user_id, device_id, algorithm, key_id),
        )
        if raw is not None:
            out[(algorithm, key_id)] = bytes(raw)
    return out


def add_one_time_keys(txn: Txn, user_id: str, device_id: str, keys: Sequence[tuple[str, str, bytes]]) -> None:
    txn.executemany(
        "INSERT INTO e2e_one_time_keys (user_id, device_id, algorithm, key_id, key) VALUES (?, ?, ?, ?, ?) "
        "ON CONFLICT (user_id, device_id, algorithm, key_id) DO NOTHING",
        [(user_id, device_id, a, k, v) for a, k, v in keys],
    )
    if keys:
        invalidations.record(txn, invalidations.KEYS, user_id, device_id)


def one_time_key_counts(txn: Txn, user_id: str, device_id: str) -> dict[str, int]:
    rows = txn.fetchall(
        "SELECT algorithm, COUNT(*) FROM e2e_one_time_keys WHERE user_id = ? AND device_id = ? GROUP BY algorithm",
        (user_id, device_id),
    )
    return {r[0]: int(r[1]) for r in rows}


def claim_one_time_key(txn: Txn, user_id: str, device_id: str, algorithm: str) -> tuple[str, bytes] | None:
    """Take (and delete) one one-time key, else hand out the fallback key (marking it used)."""
    row = txn.fetchone(
        "SELECT key_id, key FROM e2e_one_time_keys WHERE user_id = ? AND device_id = ? AND algorithm = ? "
        "ORDER BY key_id LIMIT 1",
        (user_id, device_id, algorithm),
    )
    if row is not None:
        deleted = txn.execute(
            "DELETE FROM e2e_one_time_keys WHERE user_id = ? AND device_id = ? AND algorithm = ? AND key_id = ?",
            (user_id, device_id, algorithm, row[0]),
        )
        if deleted == 1:
            invalidations.record(txn, invalidations.KEYS, user_id, device_id)
            return f"{algorithm}:{row[0]}", bytes(row[1])
    fallback = txn.fetchone(
        "SELECT key_id, key FROM e2e_fallback_keys WHERE user_id = ? AND device_id = ? AND algorithm = ?",
        (user_id, device_id, algorithm),
    )
    if fallback is None:
        return None
    txn.execute(
        "UPDATE e2e_fallback_keys SET used = TRUE WHERE user_id = ? AND device_id = ? AND algorithm = ?",
        (user_id, device_id, algorithm),
    )
    invalidations.record(txn, invalidations.KEYS, user_id, device_id)
    return f"{algorithm}:{fallback[0]}", bytes(fallback[1])


def set_fallback_key(txn: Txn, user_id: str, device_id: str, algorithm: str, key_id: str, key: bytes) -> None:
    existing = txn.fetchone(
        "SELECT key_id, key FROM e2e_fallback_keys WHERE user_id = ? AND device_id = ? AND algorithm = ?",
        (user_id, device_id, algorithm),
    )
    if existing is not None and existing[0] == key_id and bytes(existing[1]) == key:
        return  # the same key again: keep its "used" flag
    txn.execute(
        "INSERT INTO e2e_fallback_keys (user_id, device_id, algorithm, key_id, key, used) VALUES (?, ?, ?, ?, ?, FALSE) "
        "ON CONFLICT (user_id, device_id, algorithm) DO UPDATE SET key_id = excluded.key_id, key = excluded.key, used = FALSE",
        (user_id, device_id, algorithm, key_id, key),
    )
    invalidations.record(txn, invalidations.KEYS, user_id, device_id)


def unused_fallback_algorithms(txn: Txn, user_id: str, device_id: str) -> list[str]:
    rows = txn.fetchall(
        "SELECT algorithm FROM e2e_fallback_keys WHERE user_id = ? AND device_id = ? AND used = FALSE ORDER BY algorithm",
        (user_id, device_id),
    )
    return [r[0] for r in rows]


# -- cross-signing --------------------------------------------------------------------------------------


def get_cross_signing_keys(txn: Txn, user_id: str) -> dict[str, dict[str, Any]]:
    rows = txn.fetchall("SELECT usage, key FROM e2e_cross_signing_keys WHERE user_id = ?", (user_id,))
    return {r[0]: orjson.loads(r[1]) for r in rows}


def is_cross_signing_key(txn: Txn, user_id: str, key_id: str) -> bool:
    """Whether ``key_id`` is the public key (the ID) of one of the user's cross-signing keys."""
    return txn.fetchone(
        "SELECT 1 FROM e2e_cross_signing_keys WHERE user_id = ? AND public_key = ?", (user_id, key_id)
    ) is not None


def set_cross_signing_key(txn: Txn, user_id: str, usage: str, public_key: str, key: dict[str, Any]) -> None:
    txn.execute(
        "INSERT INTO e2e_cross_signing_keys (user_id, usage, public_key, key) VALUES (?, ?, ?, ?) "
        "ON CONFLICT (user_id, usage) DO UPDATE SET public_key = excluded.public_key, key = excluded.key",
        (user_id, usage, public_key, orjson.dumps(key)),
    )


def add_signature(txn: Txn, target_user: str, target_key: str, signer_user: str, signer_key: str, signature: str) -> None:
    txn.execute(
        "INSERT INTO e2e_signatures (target_user, target_key, signer_user, signer_key, signature) VALUES (?, ?, ?, ?, ?) "
        "ON CONFLICT (target_user, target_key, signer_user, signer_key) DO UPDATE SET signature = excluded.signature",
        (target_user, target_key, signer_user, signer_key, signature),
    )


def signatures_for(txn: Txn, target_user: str) -> list[tuple[str, str, str, str]]:
    """(target_key, signer_user, signer_key, signature) for everything signed of ``target_user``."""
    rows = txn.fetchall(
        "SELECT target_key, signer_user, signer_key, signature FROM e2e_signatures WHERE target_user = ?", (target_user,)
    )
    return [(r[0], r[1], r[2], r[3]) for r in rows]


def delete_signatures_by_signer(txn: Txn, signer_user: str, signer_key: str) -> None:
    txn.execute("DELETE FROM e2e_signatures WHERE signer_user = ? AND signer_key = ?", (signer_user, signer_key))


# -- device-list stream ------------------------------------------------------------------------------------


def add_device_list_change(txn: Txn, stream_id: int, user_id: str) -> None:
    txn.execute("INSERT INTO device_list_changes (stream_id, user_id) VALUES (?, ?)", (stream_id, user_id))


def device_list_changes(txn: Txn, after: int, upto: int) -> list[str]:
    rows = txn.fetchall(
        "SELECT DISTINCT user_id FROM device_list_changes WHERE stream_id > ? AND stream_id <= ?", (after, upto)
    )
    return [r[0] for r in rows]


def max_device_list_stream(txn: Txn) -> int:
    return int(txn.fetchval("SELECT COALESCE(MAX(stream_id), 0) FROM device_list_changes"))


# -- to-device ------------------------------------------------------------------------------------------------


def to_device_txn_seen(txn: Txn, user_id: str, device_id: str, txn_id: str, now: int) -> bool:
    """Record the transaction; True if it was already recorded (a retry)."""
    inserted = txn.execute(
        "INSERT INTO to_device_txns (user_id, device_id, txn_id, created_ts) VALUES (?, ?, ?, ?) "
        "ON CONFLICT (user_id, device_id, txn_id) DO NOTHING",
        (user_id, device_id, txn_id, now),
    )
    return inserted != 1


def _to_device_binding(user_id: str, device_id: str, stream_id: int) -> str:
    return f"to_device|{user_id}|{device_id}|{stream_id}"


def add_to_device(txn: Txn, rows: Sequence[tuple[int, str, str, bytes]]) -> None:
    sealed = [(s, u, d, seal(txn, "user", u, _to_device_binding(u, d, s), m)) for s, u, d, m in rows]
    txn.executemany("INSERT INTO to_device_inbox (stream_id, user_id, device_id, message) VALUES (?, ?, ?, ?)", sealed)


def to_device_for(txn: Txn, user_id: str, device_id: str, upto: int, limit: int) -> list[tuple[int, bytes]]:
    rows = txn.fetchall(
        "SELECT stream_id, message FROM to_device_inbox WHERE user_id = ? AND device_id = ? AND stream_id <= ? "
        "ORDER BY stream_id LIMIT ?",
        (user_id, device_id, upto, limit),
    )
    return [(int(r[0]), unseal(txn, _to_device_binding(user_id, device_id, int(r[0])), r[1])) for r in rows]


def delete_to_device_upto(txn: Txn, user_id: str, device_id: str, upto: int) -> None:
    txn.execute(
        "DELETE FROM to_device_inbox WHERE user_id = ? AND device_id = ? AND stream_id <= ?", (user_id, device_id, upto)
    )


def max_to_device_for(txn: Txn, user_id: str, device_id: str) -> int:
    return int(txn.fetchval(
        "SELECT COALESCE(MAX(stream_id), 0) FROM to_device_inbox WHERE user_id = ? AND device_id = ?", (user_id, device_id)
    ))


def max_to_device_stream(txn: Txn) -> int:
    return int(txn.fetchval("SELECT COALESCE(MAX(stream_id), 0) FROM to_device_inbox"))


def device_ids_for(txn: Txn, user_id: str) -> list[str]:
    return [r[0] for r in txn.fetchall("SELECT device_id FROM devices WHERE user_id = ?", (user_id,))]


# -- key backup ----------------------------------------------------------------------------------------------


def current_backup(txn: Txn, user_id: str) -> tuple[int, str, bytes, int] | None:
    row = txn.fetchone(
        "SELECT version, algorithm, auth_data, etag FROM e2e_backup_versions WHERE user_id = ? AND deleted = FALSE "
        "ORDER BY version DESC LIMIT 1",
        (user_id,),
    )
    return (int(row[0]), row[1], bytes(row[2]), int(row[3])) if row is not None else None


def get_backup(txn: Txn, user_id: str, version: int) -> tuple[int, str, bytes, int] | None:
    row = txn.fetchone(
        "SELECT version, algorithm, auth_data, etag FROM e2e_backup_versions WHERE user_id = ? AND version = ? AND deleted = FALSE",
        (user_id, version),
    )
    return (int(row[0]), row[1], bytes(row[2]), int(row[3])) if row is not None else None


def create_backup(txn: Txn, user_id: str, algorithm: str, auth_data: bytes) -> int:
    version = int(txn.fetchval("SELECT COALESCE(MAX(version), 0) + 1 FROM e2e_backup_versions WHERE user_id = ?", (user_id,)))
    txn.execute(
        "INSERT INTO e2e_backup_versions (user_id, version, algorithm, auth_data, etag, deleted) VALUES (?, ?, ?, ?, 0, FALSE)",
        (user_id, version, algorithm, auth_data),
    )
    return version


def update_backup(txn: Txn, user_id: str, version: int, auth_data: bytes) -> None:
    txn.execute(
        "UPDATE e2e_backup_versions SET auth_data = ? WHERE user_id = ? AND version = ?", (auth_data, user_id, version)
    )


def delete_backup(txn: Txn, user_id: str, version: int) -> bool:
    txn.execute("DELETE FROM e2e_backup_keys WHERE user_id = ? AND version = ?", (user_id, version))
    return txn.execute(
        "UPDATE e2e_backup_versions SET deleted = TRUE WHERE user_id = ? AND version = ? AND deleted = FALSE",
        (user_id, version),
    ) == 1


def bump_backup_etag(txn: Txn, user_id: str, version: int) -> None:
    txn.execute("UPDATE e2e_backup_versions SET etag = etag + 1 WHERE user_id = ? AND version = ?", (user_id, version))


def count_backup_keys(txn: Txn, user_id: str, version: int) -> int:
    return int(txn.fetchval("SELECT COUNT(*) FROM e2e_backup_keys WHERE user_id = ? AND version = ?", (user_id, version)))


def get_backup_key(txn: Txn, user_id: str, version: int, room_id: str, session_id: str) -> tuple[int, int, bool, bytes] | None:
    row = txn.fetchone(
        "SELECT first_message_index, forwarded_count, is_verified, session_data FROM e2e_backup_keys "
        "WHERE user_id = ? AND version = ? AND room_id = ? AND session_id = ?",
        (user_id, version, room_id, session_id),
    )
    return (int(row[0]), int(row[1]), bool(row[2]), bytes(row[3])) if row is not None else None


def put_backup_key(txn: Txn, user_id: str, version: int, room_id: str, session_id: str, data: tuple[int, int, bool, bytes]) -> None:
    txn.execute(
        "INSERT INTO e2e_backup_keys (user_id, version, room_id, session_id, first_message_index, forwarded_count, "
        "is_verified, session_data) VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (user_id, version, room_id, session_id) "
        "DO UPDATE SET first_message_index = excluded.first_message_index, forwarded_count = excluded.forwarded_count, "
        "is_verified = excluded.is_verified, session_data = excluded.session_data",
        (user_id, version, room_id, session_id, *data),
    )


def list_backup_keys(txn: Txn, user_id: str, version: int, room_id: str | None, session_id: str | None) -> list[tuple[str, str, int, int, bool, bytes]]:
    clauses = ["user_id = ?", "version = ?"]
    params: list[Any] = [user_id, version]
    if room_id is not None:
        clauses.append("room_id = ?")
        params.append(room_id)
    if session_id is not None:
        clauses.append("session_id = ?")
        params.append(session_id)
    rows = txn.fetchall(
        "SELECT room_id, session_id, first_message_index, forwarded_count, is_verified, session_data FROM e2e_backup_keys "
        f"WHERE {' AND '.join(clauses)} ORDER BY room_id, session_id",
        params,
    )
    return [(r[0], r[1], int(r[2]), int(r[3]), bool(r[4]), bytes(r[5])) for r in rows]


def delete_backup_keys(txn: Txn, user_id: str, version: int, room_id: str | None, session_id: str | None) -> int:
    clauses = ["user_id = ?", "version = ?"]
    params: list[Any] = [user_id, version]
    if room_id is not None:
        clauses.append("room_id = ?")
        params.append(room_id)
    if session_id is not None:
        clauses.append("session_id = ?")
        params.append(session_id)
    return txn.execute(f"DELETE FROM e2e_backup_keys WHERE {' AND '.join(clauses)}", params)
