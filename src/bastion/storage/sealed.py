"""Encrypting and decrypting sensitive fields inside storage functions.

Every sensitive value is sealed with the data key of its *scope* — the room it
belongs to, or the user — and bound to its place (table, row, field) so a ciphertext
moved elsewhere does not decrypt. With encryption at rest switched off the values
pass through unchanged; values written before it was switched on are read as they
are and re-encrypted by ``bastion keys rotate``.
"""

from __future__ import annotations

from typing import Any

from bastion.security.crypto import TEXT_PREFIX, IntegrityError, is_encrypted
from bastion.storage.database import Txn


def seal(txn: Txn, scope: str, scope_id: str, binding: str, data: bytes) -> bytes:
    crypto = txn.crypto
    if crypto is None or not crypto.enabled:
        return data
    return crypto.encrypt(txn, scope, scope_id, binding.encode(), data)


def unseal(txn: Txn, binding: str, blob: Any) -> bytes:
    data = bytes(blob)
    if not is_encrypted(data):
        return data
    if txn.crypto is None:
        raise IntegrityError("encrypted data found but encryption at rest is not configured")
    return txn.crypto.decrypt(txn, binding.encode(), data)


def seal_text(txn: Txn, scope: str, scope_id: str, binding: str, value: str | None) -> str | None:
    crypto = txn.crypto
    if value is None or crypto is None or not crypto.enabled:
        return value
    return crypto.encrypt_text(txn, scope, scope_id, binding.encode(), value)


def unseal_text(txn: Txn, binding: str, value: str | None) -> str | None:
    if value is None or not value.startswith(TEXT_PREFIX):
        return value
    if txn.crypto is None:
        raise IntegrityError("encrypted data found but encryption at rest is not configured")
    return txn.crypto.decrypt_text(txn, binding.encode(), value)
