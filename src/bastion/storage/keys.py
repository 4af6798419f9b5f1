"""Key management in the database: DEK rotation, re-encryption, KEK re-wrapping, shredding.

Every encrypted column is listed in :data:`SEALED_COLUMNS` with the scope whose data
key encrypts it and the binding (table, row, field) its ciphertext is tied to. That
one inventory drives re-encryption (``bastion keys rotate``), coverage reporting
(``bastion keys status``) and is the list docs/security/encryption-at-rest.md
documents.

Re-encryption walks each column in primary-key order, a batch per transaction, and
records its cursor in ``reencryption_progress`` after every batch, so an interrupted
run resumes where it stopped. A row is rewritten only if it is still the value that
was read (compare-and-set), so a concurrent update by the server is never lost.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import orjson

from bastion.security.crypto import is_encrypted, parse_header, text_unseal
from bastion.storage.database import Txn


@dataclass(frozen=True)
class SealedColumn:
    table: str
    key: tuple[str, ...]
    column: str
    scope: str  # "room" or "user"
    scope_column: str
    text: bool
    binding: Callable[[tuple[Any, ...]], str]  # from the key values

    @property
    def name(self) -> str:
        return f"{self.table}.{self.column}"


SEALED_COLUMNS: tuple[SealedColumn, ...] = (
    SealedColumn("events", ("stream_ordering", "event_id"), "json", "room", "room_id", False,
                 lambda k: f"event|{k[1]}|json"),
    SealedColumn("events", ("stream_ordering", "event_id"), "unsigned_static", "room", "room_id", False,
                 lambda k: f"event|{k[1]}|unsigned"),
    SealedColumn("profiles", ("user_id",), "displayname", "user", "user_id", True,
                 lambda k: f"profile|{k[0]}|displayname"),
    SealedColumn("profiles", ("user_id",), "avatar_url", "user", "user_id", True,
                 lambda k: f"profile|{k[0]}|avatar_url"),
    SealedColumn("profile_fields", ("user_id", "field"), "value", "user", "user_id", False,
                 lambda k: f"profile|{k[0]}|{k[1]}"),
    SealedColumn("devices", ("user_id", "device_id"), "display_name", "user", "user_id", True,
                 lambda k: f"device|{k[0]}|{k[1]}|name"),
    SealedColumn("devices", ("user_id", "device_id"), "last_seen_ip", "user", "user_id", True,
                 lambda k: f"device|{k[0]}|{k[1]}|ip"),
    SealedColumn("devices", ("user_id", "device_id"), "last_seen_user_agent", "user", "user_id", True,
                 lambda k: f"device|{k[0]}|{k[1]}|ua"),
    SealedColumn("account_data", ("user_id", "room_id", "type"), "content", "user", "user_id", False,
                 lambda k: f"account_data|{k[0]}|{k[1]}|{k[2]}"),
    SealedColumn("filters", ("user_id", "filter_id"), "json", "user", "user_id", False,
                 lambda k: f"filter|{k[0]}|{k[1]}"),
    SealedColumn("to_device_inbox", ("stream_id", "user_id", "device_id"), "message", "user", "user_id", False,
                 lambda k: f"to_device|{k[1]}|{k[2]}|{k[0]}"),
    SealedColumn("push_rules", ("user_id", "kind", "rule_id"), "rule", "user", "user_id", False,
                 lambda k: f"push_rule|{k[0]}|{k[1]}|{k[2]}"),
    SealedColumn("pushers", ("user_id", "app_id", "pushkey"), "data", "user", "user_id", False,
                 lambda k: f"pusher|{k[0]}|{k[1]}|{k[2]}"),
    SealedColumn("push_rules_enabled", ("user_id", "rule_id"), "actions", "user", "user_id", False,
                 lambda k: f"push_rule_actions|{k[0]}|{k[1]}"),
)


def register_column(column: SealedColumn) -> None:
    """Add a column to the inventory (for modules that seal more fields)."""
    global SEALED_COLUMNS
    if column.name not in {c.name for c in SEALED_COLUMNS}:
        SEALED_COLUMNS = (*SEALED_COLUMNS, column)


def _blob(value: Any, text: bool) -> bytes | None:
    if value is None:
        return None
    if text:
        return text_unseal(value)
    data = bytes(value)
    return data if is_encrypted(data) else None


# -- DEK versions -------------------------------------------------------------------------------------


def active_versions(txn: Txn, scope: str) -> dict[str, tuple[int, int]]:
    """scope id -> (DEK id, version) of the active key."""
    rows = txn.fetchall(
        "SELECT scope_id, id, version FROM encryption_keys WHERE scope = ? AND state = 'active'", (scope,)
    )
    return {r[0]: (int(r[1]), int(r[2])) for r in rows}


def scope_ids(txn: Txn, scope: str, only: str | None) -> list[str]:
    if only is not None:
        return [only]
    if scope == "room":
        return [r[0] for r in txn.fetchall("SELECT room_id FROM rooms ORDER BY room_id")]
    return [r[0] for r in txn.fetchall("SELECT user_id FROM users ORDER BY user_id")]


def start_new_versions(txn: Txn, scope: str, ids: Iterable[str]) -> int:
    """Make a new active DEK version for every scope id; older versions become read-only."""
    keyring = txn.crypto
    count = 0
    for scope_id in ids:
        current = txn.fetchval(
            "SELECT MAX(version) FROM encryption_keys WHERE scope = ? AND scope_id = ?", (scope, scope_id)
        )
        keyring.create_version(txn, scope, scope_id, int(current or 0) + 1)
        count += 1
    return count


# -- re-encryption ---------------------------------------------------------------------------------------


def get_progress(txn: Txn, target: str) -> Any:
    value = txn.fetchval("SELECT cursor FROM reencryption_progress WHERE target = ?", (target,))
    return None if value is None else orjson.loads(value)


def set_progress(txn: Txn, target: str, cursor: Any, now_ms: int) -> None:
    txn.execute(
        "INSERT INTO reencryption_progress (target, cursor, updated_ts) VALUES (?, ?, ?) "
        "ON CONFLICT (target) DO UPDATE SET cursor = excluded.cursor, updated_ts = excluded.updated_ts",
        (target, orjson.dumps(cursor).decode(), now_ms),
    )


def clear_progress(txn: Txn) -> None:
    txn.execute("DELETE FROM reencryption_progress")


def reencrypt_batch(
    txn: Txn, column: SealedColumn, after: list[Any] | None, only: str | None, batch: int
) -> tuple[list[Any] | None, int, int]:
    """Re-encrypt one batch of ``column`` under each row's active DEK.

    Returns (cursor for the next batch or None at the end, rows scanned, rows rewritten).
    Plaintext rows (written while encryption was off) are encrypted too.
    """
    from bastion.storage.sealed import seal, seal_text, unseal, unseal_text

    keys = ", ".join(column.key)
    where = [f"{column.column} IS NOT NULL"]
    params: list[Any] = []
    if after is not None:
        where.append(f"({keys}) > ({', '.join('?' for _ in column.key)})")
        params.extend(after)
    if only is not None:
        where.append(f"{column.scope_column} = ?")
        params.append(only)
    rows = txn.fetchall(
        f"SELECT {keys}, {column.scope_column}, {column.column} FROM {column.table} "
        f"WHERE {' AND '.join(where)} ORDER BY {keys} LIMIT ?",
        (*params, batch),
    )
    n = len(column.key)
    active = txn.scratch.setdefault("active_ids", {})
    rewritten = 0
    for row in rows:
        key, scope_id, value = tuple(row[:n]), row[n], row[n + 1]
        blob = _blob(value, column.text)
        cache_key = (column.scope, scope_id)
        if cache_key not in active:
            found = txn.fetchval(
                "SELECT id FROM encryption_keys WHERE scope = ? AND scope_id = ? AND state = 'active'",
                (column.scope, scope_id),
            )
            active[cache_key] = int(found) if found is not None else None
        if blob is not None and parse_header(blob)[1] == active[cache_key]:
            continue
        binding = column.binding(key)
        if column.text:
            plain = unseal_text(txn, binding, value)
            new: Any = seal_text(txn, column.scope, scope_id, binding, plain)
        else:
            new = seal(txn, column.scope, scope_id, binding, unseal(txn, binding, value))
        match = " AND ".join(f"{k} = ?" for k in column.key)
        changed = txn.execute(
            f"UPDATE {column.table} SET {column.column} = ? WHERE {match} AND {column.column} = ?",
            (new, *key, value),
        )
        rewritten += changed
    next_cursor = list(rows[-1][:n]) if len(rows) == batch else None
    return next_cursor, len(rows), rewritten


@dataclass
class Coverage:
    column: str
    total: int
    by_dek: dict[int | None, int]


def coverage(txn: Txn, column: SealedColumn, only: str | None = None) -> Coverage:
    """How many values of a column each DEK encrypts (None: plaintext)."""
    where = f"WHERE {column.column} IS NOT NULL" + (f" AND {column.scope_column} = ?" if only else "")
    counts: dict[int | None, int] = {}
    total = 0
    for (value,) in txn.fetchall(f"SELECT {column.column} FROM {column.table} {where}", (only,) if only else ()):
        blob = _blob(value, column.text)
        dek = parse_header(blob)[1] if blob is not None else None
        counts[dek] = counts.get(dek, 0) + 1
        total += 1
    return Coverage(column.name, total, counts)


def key_inventory(txn: Txn) -> list[tuple[int, str, str, int, str, str, int, str]]:
    """(id, scope, scope id, version, suite, KEK id, created ms, state) of every DEK."""
    rows = txn.fetchall(
        "SELECT id, scope, scope_id, version, suite, kek_id, created_ts, state FROM encryption_keys ORDER BY id"
    )
    return [tuple(r) for r in rows]


# -- KEK re-wrapping ------------------------------------------------------------------------------------------


def rewrap_batch(txn: Txn, after_id: int, batch: int) -> tuple[int | None, int]:
    """Re-wrap DEKs not wrapped by the primary KEK. Returns (next cursor or None, rewrapped)."""
    keyring = txn.crypto
    primary = keyring.keys.primary
    rows = txn.fetchall(
        "SELECT id, scope, scope_id, version, suite, wrapped, kek_id FROM encryption_keys "
        "WHERE id > ? AND state <> 'destroyed' ORDER BY id LIMIT ?",
        (after_id, batch),
    )
    done = 0
    for row in rows:
        if row[6] == primary.key_id:
            continue
        wrapped = keyring.rewrap(row)
        done += txn.execute(
            "UPDATE encryption_keys SET wrapped = ?, kek_id = ? WHERE id = ? AND kek_id = ?",
            (wrapped, primary.key_id, row[0], row[6]),
        )
    return (int(rows[-1][0]) if len(rows) == batch else None), done


def keys_wrapped_by_others(txn: Txn, primary_id: str) -> int:
    return int(txn.fetchval(
        "SELECT COUNT(*) FROM encryption_keys WHERE state <> 'destroyed' AND kek_id <> ?", (primary_id,)
    ))


def set_meta(txn: Txn, key: str, value: str) -> None:
    txn.execute(
        "INSERT INTO server_meta (key, value) VALUES (?, ?) ON CONFLICT (key) DO UPDATE SET value = excluded.value",
        (key, value),
    )


# -- crypto-shredding ----------------------------------------------------------------------------------------------


def destroy_scope_keys(txn: Txn, scope: str, scope_id: str) -> list[int]:
    """Destroy every DEK of a scope: the wrapped keys are overwritten and deleted."""
    ids = [int(r[0]) for r in txn.fetchall(
        "SELECT id FROM encryption_keys WHERE scope = ? AND scope_id = ? AND state <> 'destroyed'", (scope, scope_id)
    )]
    txn.execute(
        "UPDATE encryption_keys SET wrapped = NULL, state = 'destroyed' WHERE scope = ? AND scope_id = ?",
        (scope, scope_id),
    )
    return ids
