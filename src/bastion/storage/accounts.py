"""Accounts: users, profiles, devices, access tokens, UIA sessions, registration tokens.

Transaction functions: each takes a :class:`~bastion.storage.database.Txn` first and
runs inside the caller's transaction.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import orjson

from bastion.storage import invalidations
from bastion.storage.database import Txn
from bastion.storage.sealed import seal, seal_text, unseal, unseal_text


@dataclass(frozen=True, slots=True)
class UserRow:
    user_id: str
    password_hash: str | None
    is_admin: bool
    is_deactivated: bool
    created_ts: int


@dataclass(frozen=True, slots=True)
class TokenOwner:
    user_id: str
    device_id: str
    is_admin: bool
    is_deactivated: bool


@dataclass(frozen=True, slots=True)
class DeviceRow:
    user_id: str
    device_id: str
    display_name: str | None
    last_seen_ts: int | None
    last_seen_ip: str | None


# -- users ---------------------------------------------------------------------------


def get_user(txn: Txn, user_id: str) -> UserRow | None:
    row = txn.fetchone(
        "SELECT user_id, password_hash, is_admin, is_deactivated, created_ts FROM users WHERE user_id = ?",
        (user_id,),
    )
    if row is None:
        return None
    return UserRow(row[0], row[1], bool(row[2]), bool(row[3]), row[4])


def user_exists(txn: Txn, user_id: str) -> bool:
    return txn.fetchone("SELECT 1 FROM users WHERE user_id = ?", (user_id,)) is not None


def insert_user(txn: Txn, user_id: str, password_hash: str | None, is_admin: bool, now_ms: int, displayname: str | None) -> bool:
    """Create a user; False if the ID is taken (nothing written)."""
    inserted = txn.execute(
        "INSERT INTO users (user_id, password_hash, is_admin, is_deactivated, created_ts) "
        "VALUES (?, ?, ?, FALSE, ?) ON CONFLICT (user_id) DO NOTHING",
        (user_id, password_hash, is_admin, now_ms),
    )
    if inserted != 1:
        return False
    txn.execute(
        "INSERT INTO profiles (user_id, displayname, avatar_url) VALUES (?, ?, NULL)",
        (user_id, seal_text(txn, "user", user_id, f"profile|{user_id}|displayname", displayname)),
    )
    return True


def set_password_hash(txn: Txn, user_id: str, password_hash: str) -> bool:
    return txn.execute("UPDATE users SET password_hash = ? WHERE user_id = ?", (password_hash, user_id)) == 1


def replace_password_hash(txn: Txn, user_id: str, old_hash: str, new_hash: str) -> bool:
    """Swap in a re-made hash of the same password, unless the password changed since."""
    return txn.execute(
        "UPDATE users SET password_hash = ? WHERE user_id = ? AND password_hash = ?", (new_hash, user_id, old_hash)
    ) == 1


def set_admin(txn: Txn, user_id: str, is_admin: bool) -> None:
    txn.execute("UPDATE users SET is_admin = ? WHERE user_id = ?", (is_admin, user_id))
    invalidations.record(txn, invalidations.TOKENS, user_id)


def mark_deactivated(txn: Txn, user_id: str) -> None:
    txn.execute("UPDATE users SET is_deactivated = TRUE, password_hash = NULL WHERE user_id = ?", (user_id,))
    invalidations.record(txn, invalidations.TOKENS, user_id)


def count_users(txn: Txn) -> int:
    return int(txn.fetchval("SELECT COUNT(*) FROM users"))


# -- profiles ------------------------------------------------------------------------


def get_profile(txn: Txn, user_id: str) -> tuple[str | None, str | None] | None:
    row = txn.fetchone("SELECT displayname, avatar_url FROM profiles WHERE user_id = ?", (user_id,))
    if row is None:
        return None
    return (
        unseal_text(txn, f"profile|{user_id}|displayname", row[0]),
        unseal_text(txn, f"profile|{user_id}|avatar_url", row[1]),
    )


def set_profile_field(txn: Txn, user_id: str, field: str, value: str | None) -> None:
    assert field in ("displayname", "avatar_url")
    sealed = seal_text(txn, "user", user_id, f"profile|{user_id}|{field}", value)
    txn.execute(
        f"INSERT INTO profiles (user_id, {field}) VALUES (?, ?) "
        f"ON CONFLICT (user_id) DO UPDATE SET {field} = excluded.{field}",
        (user_id, sealed),
    )


def get_profile_fields(txn: Txn, user_id: str) -> dict[str, bytes]:
    rows = txn.fetchall("SELECT field, value FROM profile_fields WHERE user_id = ?", (user_id,))
    return {r[0]: unseal(txn, f"profile|{user_id}|{r[0]}", r[1]) for r in rows}


def set_profile_custom_field(txn: Txn, user_id: str, field: str, value: bytes) -> None:
    sealed = seal(txn, "user", user_id, f"profile|{user_id}|{field}", value)
    txn.execute(
        "INSERT INTO profile_fields (user_id, field, value) VALUES (?, ?, ?) "
        "ON CONFLICT (user_id, field) DO UPDATE SET value = excluded.value",
        (user_id, field, sealed),
    )


def delete_profile_custom_field(txn: Txn, user_id: str, field: str) -> None:
    txn.execute("DELETE FROM profile_fields WHERE user_id = ? AND field = ?", (user_id, field))


# -- devices and tokens --------------------------------------------------------------


def _device_binding(user_id: str, device_id: str, field: str) -> str:
    return f"device|{user_id}|{device_id}|{field}"


def upsert_device(txn: Txn, user_id: str, device_id: str, display_name: str | None, now_ms: int) -> None:
    """Create the device unless it exists. ``display_name`` is only for a new device
    (spec: ``initial_device_display_name`` is ignored for a known device)."""
    sealed = seal_text(txn, "user", user_id, _device_binding(user_id, device_id, "name"), display_name)
    txn.execute(
        "INSERT INTO devices (user_id, device_id, display_name, created_ts) VALUES (?, ?, ?, ?) "
        "ON CONFLICT (user_id, device_id) DO NOTHING",
        (user_id, device_id, sealed, now_ms),
    )


def _device_row(txn: Txn, row: tuple[Any, ...]) -> DeviceRow:
    user_id, device_id = row[0], row[1]
    return DeviceRow(
        user_id,
        device_id,
        unseal_text(txn, _device_binding(user_id, device_id, "name"), row[2]),
        row[3],
        unseal_text(txn, _device_binding(user_id, device_id, "ip"), row[4]),
    )


def get_device(txn: Txn, user_id: str, device_id: str) -> DeviceRow | None:
    row = txn.fetchone(
        "SELECT user_id, device_id, display_name, last_seen_ts, last_seen_ip FROM devices "
        "WHERE user_id = ? AND device_id = ?",
        (user_id, device_id),
    )
    return _device_row(txn, row) if row is not None else None


def list_devices(txn: Txn, user_id: str) -> list[DeviceRow]:
    rows = txn.fetchall(
        "SELECT user_id, device_id, display_name, last_seen_ts, last_seen_ip FROM devices "
        "WHERE user_id = ? ORDER BY device_id",
        (user_id,),
    )
    return [_device_row(txn, r) for r in rows]


def device_display_names(txn: Txn, user_id: str) -> dict[str, str | None]:
    rows = txn.fetchall("SELECT device_id, display_name FROM devices WHERE user_id = ?", (user_id,))
    return {r[0]: unseal_text(txn, _device_binding(user_id, r[0], "name"), r[1]) for r in rows}


def set_device_display_name(txn: Txn, user_id: str, device_id: str, name: str | None) -> None:
    sealed = seal_text(txn, "user", user_id, _device_binding(user_id, device_id, "name"), name)
    txn.execute(
        "UPDATE devices SET display_name = ? WHERE user_id = ? AND device_id = ?", (sealed, user_id, device_id)
    )


def insert_access_token(txn: Txn, token_hash: bytes, user_id: str, device_id: str, now_ms: int) -> None:
    txn.execute(
        "INSERT INTO access_tokens (token_hash, user_id, device_id, created_ts) VALUES (?, ?, ?, ?)",
        (token_hash, user_id, device_id, now_ms),
    )


def get_token_owner(txn: Txn, token_hash: bytes) -> TokenOwner | None:
    row = txn.fetchone(
        "SELECT t.user_id, t.device_id, u.is_admin, u.is_deactivated FROM access_tokens t "
        "JOIN users u ON u.user_id = t.user_id WHERE t.token_hash = ?",
        (token_hash,),
    )
    if row is None:
        return None
    return TokenOwner(row[0], row[1], bool(row[2]), bool(row[3]))


def delete_device_tokens(txn: Txn, user_id: str, device_id: str) -> list[bytes]:
    rows = txn.fetchall(
        "SELECT token_hash FROM access_tokens WHERE user_id = ? AND device_id = ?", (user_id, device_id)
    )
    txn.execute("DELETE FROM access_tokens WHERE user_id = ? AND device_id = ?", (user_id, device_id))
    invalidations.record(txn, invalidations.TOKENS, user_id, device_id)
    return [bytes(r[0]) for r in rows]


def delete_device(txn: Txn, user_id: str, device_id: str) -> list[bytes]:
    """Delete a device, its tokens and its encryption keys; returns the token hashes removed."""
    from bastion.storage.e2e import delete_device_e2e

    hashes = delete_device_tokens(txn, user_id, device_id)
    txn.execute("DELETE FROM devices WHERE user_id = ? AND device_id = ?", (user_id, device_id))
    delete_device_e2e(txn, user_id, device_id)
    return hashes


def delete_all_devices(txn: Txn, user_id: str, except_device: str | None = None) -> list[bytes]:
    """Delete every device (but ``except_device``), with tokens and encryption keys."""
    from bastion.storage.e2e import delete_device_e2e

    for (device_id,) in txn.fetchall("SELECT device_id FROM devices WHERE user_id = ?", (user_id,)):
        if device_id != except_device:
            delete_device_e2e(txn, user_id, device_id)
    if except_device is None:
        rows = txn.fetchall("SELECT token_hash FROM access_tokens WHERE user_id = ?", (user_id,))
        txn.execute("DELETE FROM access_tokens WHERE user_id = ?", (user_id,))
        txn.execute("DELETE FROM devices WHERE user_id = ?", (user_id,))
    else:
        rows = txn.fetchall(
            "SELECT token_hash FROM access_tokens WHERE user_id = ? AND device_id <> ?", (user_id, except_device)
        )
        txn.execute("DELETE FROM access_tokens WHERE user_id = ? AND device_id <> ?", (user_id, except_device))
        txn.execute("DELETE FROM devices WHERE user_id = ? AND device_id <> ?", (user_id, except_device))
    invalidations.record(txn, invalidations.TOKENS, user_id)
    return [bytes(r[0]) for r in rows]


def touch_devices(txn: Txn, rows: list[tuple[int, str | None, str | None, str, str]]) -> None:
    """Batch update of last-seen data: (ts, ip, user_agent, user_id, device_id). IPs are personal data: sealed.

    Only for devices that still exist, of users not deactivated: the data is gathered in
    memory for a while, and an account erased meanwhile must not get a new data key and
    its devices' addresses written back after the erasure."""
    if not rows:
        return
    where, params = txn.any_of("d.user_id", sorted({row[3] for row in rows}))
    live = set(txn.fetchall(
        f"SELECT d.user_id, d.device_id FROM devices d JOIN users u ON u.user_id = d.user_id "
        f"WHERE {where} AND NOT u.is_deactivated",
        params,
    ))
    sealed = [
        (
            ts,
            seal_text(txn, "user", user, _device_binding(user, device, "ip"), ip),
            seal_text(txn, "user", user, _device_binding(user, device, "ua"), ua),
            user,
            device,
        )
        for ts, ip, ua, user, device in rows
        if (user, device) in live
    ]
    txn.executemany(
        "UPDATE devices SET last_seen_ts = ?, last_seen_ip = ?, last_seen_user_agent = ? "
        "WHERE user_id = ? AND device_id = ?",
        sealed,
    )


# -- user-interactive auth sessions ------------------------------------------------------


def create_uia_session(txn: Txn, session_id: str, user_id: str | None, fingerprint: str, now_ms: int) -> None:
    txn.execute(
        "INSERT INTO uia_sessions (session_id, user_id, fingerprint, completed, created_ts) VALUES (?, ?, ?, '[]', ?)",
        (session_id, user_id, fingerprint, now_ms),
    )


def get_uia_session(txn: Txn, session_id: str) -> tuple[str | None, str, list[str], int] | None:
    row = txn.fetchone(
        "SELECT user_id, fingerprint, completed, created_ts FROM uia_sessions WHERE session_id = ?",
        (session_id,),
    )
    if row is None:
        return None
    return row[0], row[1], orjson.loads(row[2]), row[3]


def set_uia_completed(txn: Txn, session_id: str, completed: list[str]) -> None:
    txn.execute(
        "UPDATE uia_sessions SET completed = ? WHERE session_id = ?",
        (orjson.dumps(completed).decode(), session_id),
    )


def delete_uia_session(txn: Txn, session_id: str) -> None:
    txn.execute("DELETE FROM uia_sessions WHERE session_id = ?", (session_id,))


def expire_uia_sessions(txn: Txn, older_than_ms: int) -> None:
    txn.execute("DELETE FROM uia_sessions WHERE created_ts < ?", (older_than_ms,))


# -- registration tokens ----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RegistrationToken:
    token: str
    uses_allowed: int | None
    pending: int
    completed: int
    expiry_ts: int | None

    def usable(self, now_ms: int) -> bool:
        if self.expiry_ts is not None and self.expiry_ts <= now_ms:
            return False
        return self.uses_allowed is None or self.pending + self.completed < self.uses_allowed


def get_registration_token(txn: Txn, token: str) -> RegistrationToken | None:
    row = txn.fetchone(
        "SELECT token, uses_allowed, pending, completed, expiry_ts FROM registration_tokens WHERE token = ?",
        (token,),
    )
    return RegistrationToken(*row) if row is not None else None


def list_registration_tokens(txn: Txn) -> list[RegistrationToken]:
    rows = txn.fetchall(
        "SELECT token, uses_allowed, pending, completed, expiry_ts FROM registration_tokens ORDER BY token"
    )
    return [RegistrationToken(*r) for r in rows]


def insert_registration_token(txn: Txn, token: str, uses_allowed: int | None, expiry_ts: int | None) -> bool:
    return (
        txn.execute(
            "INSERT INTO registration_tokens (token, uses_allowed, pending, completed, expiry_ts) "
            "VALUES (?, ?, 0, 0, ?) ON CONFLICT (token) DO NOTHING",
            (token, uses_allowed, expiry_ts),
        )
        == 1
    )


def delete_registration_token(txn: Txn, token: str) -> bool:
    return txn.execute("DELETE FROM registration_tokens WHERE token = ?", (token,)) == 1


def consume_registration_token(txn: Txn, token: str, now_ms: int) -> bool:
    """Count one completed use if the token is still usable (atomic check-and-increment)."""
    return (
        txn.execute(
            "UPDATE registration_tokens SET completed = completed + 1 WHERE token = ? "
            "AND (expiry_ts IS NULL OR expiry_ts > ?) "
            "AND (uses_allowed IS NULL OR pending + completed < uses_allowed)",
            (token, now_ms),
        )
        == 1
    )


# -- server signals (cross-process cache invalidation and jobs) --------------------------------


def add_signal(txn: Txn, kind: str, key: str, now_ms: int) -> None:
    txn.execute("INSERT INTO server_signals (kind, key, created_ts) VALUES (?, ?, ?)", (kind, key, now_ms))


def signals_after(txn: Txn, after_id: int, limit: int = 1000) -> list[tuple[int, str, str]]:
    return [
        (r[0], r[1], r[2])
        for r in txn.fetchall(
            "SELECT id, kind, key FROM server_signals WHERE id > ? ORDER BY id LIMIT ?", (after_id, limit)
        )
    ]


def max_signal_id(txn: Txn) -> int:
    return int(txn.fetchval("SELECT COALESCE(MAX(id), 0) FROM server_signals"))


def prune_signals(txn: Txn, older_than_ms: int) -> None:
    txn.execute("DELETE FROM server_signals WHERE created_ts < ?", (older_than_ms,))


def add_pending_deactivation(txn: Txn, user_id: str, now_ms: int) -> None:
    txn.execute(
        "INSERT INTO pending_deactivations (user_id, requested_ts) VALUES (?, ?) ON CONFLICT (user_id) DO NOTHING",
        (user_id, now_ms),
    )


def list_pending_deactivations(txn: Txn) -> list[str]:
    return [r[0] for r in txn.fetchall("SELECT user_id FROM pending_deactivations ORDER BY requested_ts")]


def is_pending_deactivation(txn: Txn, user_id: str) -> bool:
    return txn.fetchone("SELECT 1 FROM pending_deactivations WHERE user_id = ?", (user_id,)) is not None


def remove_pending_deactivation(txn: Txn, user_id: str) -> None:
    txn.execute("DELETE FROM pending_deactivations WHERE user_id = ?", (user_id,))


# -- shared-secret registration nonces --------------------------------------------------------


def add_registration_nonce(txn: Txn, nonce: str, now_ms: int, lifetime_ms: int) -> bool:
    """Record a nonce; False if too many are outstanding."""
    txn.execute("DELETE FROM registration_nonces WHERE created_ts < ?", (now_ms - lifetime_ms,))
    if int(txn.fetchval("SELECT COUNT(*) FROM registration_nonces")) >= 10_000:
        return False
    txn.execute("INSERT INTO registration_nonces (nonce, created_ts) VALUES (?, ?)", (nonce, now_ms))
    return True


def use_registration_nonce(txn: Txn, nonce: str, issued_after_ms: int) -> bool:
    """Consume a nonce (each works once); False if unknown or expired."""
    return txn.execute(
        "DELETE FROM registration_nonces WHERE nonce = ? AND created_ts >= ?", (nonce, issued_after_ms)
    ) == 1
