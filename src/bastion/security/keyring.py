"""Data-encryption keys (DEKs): one per room and one per user, versioned, wrapped by the KEK.

The keyring is used from storage functions, which run synchronously inside a
database transaction on a worker thread; it is therefore synchronous and
thread-safe. A DEK created inside a transaction is cached only once that
transaction commits, so a rolled-back transaction can never leave data encrypted
under a key that does not exist.

States: ``active`` (the newest version; new data is encrypted with it), ``retired``
(older versions, still used to read until re-encryption has moved everything to the
active one), ``destroyed`` (the wrapped key is deleted: crypto-shredded).
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import threading
import time
from collections.abc import Iterable
from typing import Any

from bastion.security.crypto import (
    SUITES,
    AesGcm,
    IntegrityError,
    KeySet,
    Sm4Gcm,
    is_encrypted,
    make_aead,
    open_blob,
    parse_header,
    seal,
    text_seal,
    text_unseal,
)
from bastion.storage.database import Txn

AeadT = AesGcm | Sm4Gcm
KEK_CHECK_INFO = b"bastion-kek-check/1"
# A data key's row as _unwrap takes it; callers add the WHERE clause.
_SELECT_KEY_ROWS = "SELECT id, scope, scope_id, version, suite, wrapped, kek_id FROM encryption_keys "


def _binding(scope: str, scope_id: str, version: int, suite: str) -> bytes:
    return f"{scope}|{scope_id}|{version}|{suite}".encode()


class Keyring:
    def __init__(self, keys: KeySet, suite: str, enabled: bool = True, provider: Any = None) -> None:
        if suite not in SUITES:
            raise ValueError(f"unknown cipher suite {suite!r}")
        self.keys = keys
        self.provider = provider
        self.suite = suite
        self.enabled = enabled
        self._lock = threading.Lock()
        self._by_id: dict[int, AeadT] = {}
        self._active: dict[tuple[str, str], tuple[int, AeadT]] = {}
        self._search: dict[str, bytes] = {}

    # -- key management ---------------------------------------------------------------------------

    def reload(self, keys: KeySet) -> None:
        with self._lock:
            self.keys = keys

    def forget_active(self) -> None:
        """New DEK versions exist (rotation by another process): look them up again."""
        with self._lock:
            self._active.clear()

    def forget_scope(self, scope: str, scope_id: str) -> None:
        with self._lock:
            self._active.pop((scope, scope_id), None)
            if scope == "room":
                self._search.pop(scope_id, None)

    def forget_keys(self, dek_ids: list[int]) -> None:
        """Destroyed DEKs: drop them from memory too."""
        with self._lock:
            for dek_id in dek_ids:
                self._by_id.pop(dek_id, None)
            for scope_key, (dek_id, _aead) in list(self._active.items()):
                if dek_id in dek_ids:
                    del self._active[scope_key]
                    if scope_key[0] == "room-search":
                        self._search.pop(scope_key[1], None)

    def forget_destroyed(self) -> None:
        """Keys were destroyed by another process: drop every cached key (they reload on use)."""
        with self._lock:
            self._by_id.clear()
            self._active.clear()
            self._search.clear()

    def _kek_for(self, kek_id: str) -> Any:
        kek = self.keys.by_id(kek_id)
        if kek is None and self.provider is not None:
            # Re-wrapped by ``bastion keys rotate-kek`` in another process: load the new key set.
            self.reload(self.provider.load())
            kek = self.keys.by_id(kek_id)
        return kek

    def _unwrap_key(self, row: tuple[Any, ...]) -> bytes:
        dek_id, scope, scope_id, version, suite, wrapped, kek_id = row
        if wrapped is None:
            raise IntegrityError(f"data key {dek_id} was destroyed")
        kek = self._kek_for(kek_id)
        if kek is None:
            raise IntegrityError(f"data key {dek_id} is wrapped by a key-encryption key that is not configured ({kek_id})")
        return kek.unwrap(bytes(wrapped), _binding(scope, scope_id, version, suite))

    def _unwrap(self, row: tuple[Any, ...]) -> AeadT:
        return SUITES[row[4]](self._unwrap_key(row))

    def rewrap(self, row: tuple[Any, ...]) -> bytes:
        """The DEK of ``row`` wrapped by the primary KEK."""
        _dek_id, scope, scope_id, version, suite, _wrapped, _kek_id = row
        return self.keys.primary.wrap(self._unwrap_key(row), _binding(scope, scope_id, version, suite))

    def _aead_by_id(self, txn: Txn, dek_id: int) -> AeadT:
        aead = self._by_id.get(dek_id)
        if aead is not None:
            return aead
        pending = txn.scratch.get("deks", {}).get(dek_id)
        if pending is not None:
            return pending
        row = txn.fetchone(
            _SELECT_KEY_ROWS + "WHERE id = ? AND state <> 'destroyed'",
            (dek_id,),
        )
        if row is None:
            raise IntegrityError(f"data key {dek_id} does not exist (destroyed or never committed)")
        aead = self._unwrap(row)
        with self._lock:
            self._by_id[dek_id] = aead
        return aead

    def preload(self, txn: Txn, blobs: Iterable[Any]) -> None:
        """Unwrap the data keys of ``blobs`` not in memory yet, all with one query.

        Reading many rows of many scopes at once (the rooms of a cold initial sync) would
        otherwise look up each room's key on its first row: a database round trip per
        room. Keys that are missing or destroyed are left for :meth:`decrypt` to report."""
        known = self._by_id
        pending = txn.scratch.get("deks", {})
        wanted: set[int] = set()
        for blob in blobs:
            try:
                dek_id = self.dek_id_of(blob) if blob is not None else None
            except IntegrityError:
                continue  # not a valid ciphertext: reported when its row is decrypted
            if dek_id is not None and dek_id not in known and dek_id not in pending:
                wanted.add(dek_id)
        if not wanted:
            return
        where, params = txn.any_of("id", sorted(wanted))
        rows = txn.fetchall(
            _SELECT_KEY_ROWS + f"WHERE {where} AND state <> 'destroyed'",
            params,
        )
        unwrapped = {}
        for row in rows:
            try:
                unwrapped[row[0]] = self._unwrap(row)
            except IntegrityError:
                continue  # reported for the rows it seals, when they are decrypted
        with self._lock:
            self._by_id.update(unwrapped)

    def _active_key(self, txn: Txn, scope: str, scope_id: str) -> tuple[int, AeadT]:
        cached = self._active.get((scope, scope_id))
        if cached is not None:
            return cached
        pending = txn.scratch.setdefault("active", {}).get((scope, scope_id))
        if pending is not None:
            return pending
        row = txn.fetchone(
            _SELECT_KEY_ROWS + "WHERE scope = ? AND scope_id = ? AND state = 'active' ORDER BY version DESC LIMIT 1",
            (scope, scope_id),
        )
        if row is not None:
            aead = self._unwrap(row)
            with self._lock:
                self._by_id[row[0]] = aead
                self._active[(scope, scope_id)] = (row[0], aead)
            return row[0], aead
        # None yet (or all destroyed: a shredded scope that gets new data starts afresh).
        latest = txn.fetchval("SELECT MAX(version) FROM encryption_keys WHERE scope = ? AND scope_id = ?", (scope, scope_id))
        return self.create_version(txn, scope, scope_id, int(latest or 0) + 1)

    def create_version(self, txn: Txn, scope: str, scope_id: str, version: int) -> tuple[int, AeadT]:
        """Create (in ``txn``) a DEK version for a scope; cached once ``txn`` commits."""
        suite_cls = SUITES[self.suite]
        key = secrets.token_bytes(suite_cls.key_size)
        if self.provider is not None and self.provider.changed():
            # A KEK rotation may be under way: wrap new keys with the newest primary.
            self.reload(self.provider.load())
        kek = self.keys.primary
        wrapped = kek.wrap(key, _binding(scope, scope_id, version, self.suite))
        row = txn.fetchone(
            "INSERT INTO encryption_keys (scope, scope_id, version, suite, wrapped, kek_id, created_ts, state) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, 'active') ON CONFLICT (scope, scope_id, version) DO NOTHING RETURNING id",
            (scope, scope_id, version, self.suite, wrapped, kek.key_id, int(time.time() * 1000)),
        )
        if row is None:  # created concurrently by another transaction: use theirs
            existing = txn.fetchone(
                _SELECT_KEY_ROWS + "WHERE scope = ? AND scope_id = ? AND version = ?",
                (scope, scope_id, version),
            )
            assert existing is not None
            aead = self._unwrap(existing)
            return existing[0], aead
        dek_id = int(row[0])
        if version > 1:
            txn.execute(
                "UPDATE encryption_keys SET state = 'retired' WHERE scope = ? AND scope_id = ? AND version < ? AND state = 'active'",
                (scope, scope_id, version),
            )
        aead = suite_cls(key)
        txn.scratch.setdefault("deks", {})[dek_id] = aead
        txn.scratch.setdefault("active", {})[(scope, scope_id)] = (dek_id, aead)

        def publish() -> None:
            with self._lock:
                self._by_id[dek_id] = aead
                self._active[(scope, scope_id)] = (dek_id, aead)

        txn.after_commit.append(publish)
        return dek_id, aead

    # -- raw data keys (for streamed formats such as media files) -----------------------------------

    def data_key(self, txn: Txn, scope: str, scope_id: str) -> tuple[int, AeadT]:
        """The active DEK of a scope (created if missing): (DEK id, cipher with ``.key``)."""
        return self._active_key(txn, scope, scope_id)

    def key_by_id(self, txn: Txn, dek_id: int) -> AeadT:
        """A DEK by id, for reading; IntegrityError if it was destroyed."""
        return self._aead_by_id(txn, dek_id)

    # -- fields ---------------------------------------------------------------------------------------

    def encrypt(self, txn: Txn, scope: str, scope_id: str, binding: bytes, plaintext: bytes) -> bytes:
        if not self.enabled:
            return plaintext
        dek_id, aead = self._active_key(txn, scope, scope_id)
        return seal(aead, dek_id, binding, plaintext)

    def decrypt(self, txn: Txn, binding: bytes, blob: bytes) -> bytes:
        """Plaintext of ``blob``; rows written before encryption was enabled pass through."""
        if not is_encrypted(blob):
            return blob
        suite_id, dek_id, nonce, ciphertext = parse_header(blob)
        aead = self._aead_by_id(txn, dek_id)
        if aead.suite_id != suite_id:
            raise IntegrityError("cipher suite mismatch")
        return open_blob(aead, dek_id, binding, nonce, ciphertext)

    def dek_id_of(self, blob: bytes) -> int | None:
        return parse_header(blob)[1] if is_encrypted(blob) else None

    def encrypt_text(self, txn: Txn, scope: str, scope_id: str, binding: bytes, value: str | None) -> str | None:
        if value is None or not self.enabled:
            return value
        return text_seal(self.encrypt(txn, scope, scope_id, binding, value.encode()))

    def decrypt_text(self, txn: Txn, binding: bytes, value: str | None) -> str | None:
        if value is None:
            return None
        blob = text_unseal(value)
        if blob is None:
            return value
        return self.decrypt(txn, binding, blob).decode()

    # -- search ------------------------------------------------------------------------------------------

    def search_key(self, txn: Txn, room_id: str, create: bool = True) -> bytes | None:
        """The room's blind-index key: stable across DEK rotation, destroyed with the room's keys.

        With ``create=False`` (read-only transactions) a room without one gives None.
        """
        cached = self._search.get(room_id)
        if cached is not None:
            return cached
        if not create:
            row = txn.fetchone(
                "SELECT 1 FROM encryption_keys WHERE scope = 'room-search' AND scope_id = ? AND state <> 'destroyed'",
                (room_id,),
            )
            if row is None:
                return None
        dek_id, aead = self._active_key(txn, "room-search", room_id)
        key = hmac.new(aead.key, b"bastion-search/1|" + room_id.encode(), hashlib.sha256).digest()
        if dek_id in self._by_id:
            with self._lock:
                self._search[room_id] = key
        return key

    # -- start-up check -------------------------------------------------------------------------------------

    def kek_check_value(self) -> str:
        return hmac.new(self.keys.primary.key, KEK_CHECK_INFO, hashlib.sha256).hexdigest()

    def matches_check(self, value: str) -> bool:
        return any(
            hmac.compare_digest(hmac.new(k.key, KEK_CHECK_INFO, hashlib.sha256).hexdigest(), value)
            for k in (self.keys.primary, *self.keys.others)
        )


__all__ = ["IntegrityError", "Keyring", "make_aead"]
