"""Media metadata: who uploaded what, its type, size and state.

With encryption at rest, ``upload_name`` is sealed under the uploader's user DEK
(binding ``media|<media id>|upload_name``), and the ``sha256`` column holds
``hmac-sha256:<DEK id>:<hex>`` — an HMAC of the plaintext keyed from that DEK, which
also records that the file was written encrypted — instead of a bare SHA-256, which
would let anyone with the database confirm a guess of a file's contents. Rows
written before encryption was enabled keep a plain hex SHA-256 and plaintext files.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from bastion.security.crypto import AesGcm, IntegrityError, Sm4Gcm
from bastion.storage.database import Txn
from bastion.storage.keys import SealedColumn, register_column
from bastion.storage.sealed import seal_text, unseal_text

MAC_PREFIX = "hmac-sha256:"

_COLUMNS = "media_id, user_id, content_type, upload_name, size, sha256, created_ts, uploaded_ts, expires_ts, quarantined"


@dataclass(frozen=True, slots=True)
class MediaRow:
    media_id: str
    user_id: str
    content_type: str | None
    upload_name: str | None
    size: int | None
    sha256: str | None
    created_ts: int
    uploaded_ts: int | None
    expires_ts: int | None
    quarantined: bool

    @property
    def uploaded(self) -> bool:
        return self.uploaded_ts is not None

    @property
    def encrypted(self) -> bool:
        """The file (and so every thumbnail of it) was written encrypted: a plaintext one is tampering."""
        return self.sha256 is not None and self.sha256.startswith(MAC_PREFIX)


def upload_name_binding(media_id: str) -> str:
    return f"media|{media_id}|upload_name"


register_column(
    SealedColumn("media", ("media_id",), "upload_name", "user", "user_id", True, lambda k: upload_name_binding(k[0]))
)


def _row(txn: Txn, r: tuple[Any, ...]) -> MediaRow:
    name = unseal_text(txn, upload_name_binding(r[0]), r[3])
    return MediaRow(r[0], r[1], r[2], name, r[4], r[5], r[6], r[7], r[8], bool(r[9]))


# -- data keys for the files (used outside the transaction, by the streamed format) ---------------


def user_data_key(txn: Txn, user_id: str, always: bool = False) -> tuple[int, AesGcm | Sm4Gcm] | None:
    """The uploader's active DEK (created if missing), or None with encryption at rest off.

    ``always``: whenever a keyring exists, even one not encrypting new data (for files
    derived from an encrypted one, which must never be stored in plaintext).
    """
    crypto = txn.crypto
    if crypto is None or not (crypto.enabled or always):
        return None
    dek_id, aead = crypto.data_key(txn, "user", user_id)
    return int(dek_id), aead


def key_by_id(txn: Txn, dek_id: int) -> AesGcm | Sm4Gcm:
    if txn.crypto is None:
        raise IntegrityError("encrypted media found but encryption at rest is not configured")
    aead: AesGcm | Sm4Gcm = txn.crypto.key_by_id(txn, dek_id)
    return aead


def create_pending(txn: Txn, media_id: str, user_id: str, now: int, expires: int) -> None:
    txn.execute(
        "INSERT INTO media (media_id, user_id, created_ts, expires_ts) VALUES (?, ?, ?, ?)",
        (media_id, user_id, now, expires),
    )


def count_pending(txn: Txn, user_id: str, now: int) -> int:
    return int(txn.fetchval(
        "SELECT COUNT(*) FROM media WHERE user_id = ? AND uploaded_ts IS NULL AND expires_ts > ?", (user_id, now)
    ))


def store_upload(
    txn: Txn, media_id: str, user_id: str, content_type: str, upload_name: str | None, size: int, sha256: str, now: int
) -> None:
    """``sha256``: the plaintext's hex SHA-256, or ``hmac-sha256:...`` for an encrypted file."""
    sealed_name = seal_text(txn, "user", user_id, upload_name_binding(media_id), upload_name)
    txn.execute(
        "INSERT INTO media (media_id, user_id, content_type, upload_name, size, sha256, created_ts, uploaded_ts) "
        "VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (media_id) DO UPDATE SET content_type = excluded.content_type, "
        "upload_name = excluded.upload_name, size = excluded.size, sha256 = excluded.sha256, "
        "uploaded_ts = excluded.uploaded_ts, expires_ts = NULL",
        (media_id, user_id, content_type, sealed_name, size, sha256, now, now),
    )


def uploaded_ids_after(txn: Txn, after: str | None, user_id: str | None, limit: int) -> list[str]:
    """Up to ``limit`` uploaded media IDs after ``after``, in ID order; one user's if ``user_id``."""
    sql = "SELECT media_id FROM media WHERE uploaded_ts IS NOT NULL AND media_id > ?"
    params: list[Any] = [after or ""]
    if user_id is not None:
        sql += " AND user_id = ?"
        params.append(user_id)
    return [r[0] for r in txn.fetchall(sql + " ORDER BY media_id LIMIT ?", (*params, limit))]


def count_uploaded(txn: Txn, user_id: str | None) -> int:
    """Uploaded media (one user's if ``user_id``)."""
    if user_id is None:
        return int(txn.fetchval("SELECT COUNT(*) FROM media WHERE uploaded_ts IS NOT NULL"))
    return int(txn.fetchval("SELECT COUNT(*) FROM media WHERE uploaded_ts IS NOT NULL AND user_id = ?", (user_id,)))


def owner_and_digest(txn: Txn, media_id: str) -> tuple[str, str | None] | None:
    """(uploader, ``sha256`` column) of a media row, without unsealing anything."""
    row = txn.fetchone("SELECT user_id, sha256 FROM media WHERE media_id = ?", (media_id,))
    return (row[0], row[1]) if row is not None else None


def replace_digest(txn: Txn, media_id: str, old: str, new: str) -> bool:
    """Compare-and-set of the ``sha256`` column (a re-encrypted file's new MAC)."""
    return txn.execute("UPDATE media SET sha256 = ? WHERE media_id = ? AND sha256 = ?", (new, media_id, old)) == 1


def digest_dek_id(digest: str | None) -> int | None:
    """The DEK id an ``hmac-sha256:<DEK id>:<hex>`` value names; None for a plain SHA-256 or none."""
    if digest is None or not digest.startswith(MAC_PREFIX):
        return None
    try:
        return int(digest[len(MAC_PREFIX):].split(":", 1)[0])
    except ValueError:
        return None  # not a value Bastion wrote


def digests(txn: Txn) -> list[str | None]:
    """Every uploaded file's ``sha256`` column (for ``bastion keys status``)."""
    return [r[0] for r in txn.fetchall("SELECT sha256 FROM media WHERE uploaded_ts IS NOT NULL")]


def get(txn: Txn, media_id: str) -> MediaRow | None:
    row = txn.fetchone(f"SELECT {_COLUMNS} FROM media WHERE media_id = ?", (media_id,))
    return _row(txn, row) if row is not None else None


def user_usage(txn: Txn, user_id: str) -> int:
    return int(txn.fetchval("SELECT COALESCE(SUM(size), 0) FROM media WHERE user_id = ?", (user_id,)))


def set_quarantined(txn: Txn, media_id: str, value: bool) -> bool:
    return txn.execute("UPDATE media SET quarantined = ? WHERE media_id = ?", (value, media_id)) == 1


def quarantine_user(txn: Txn, user_id: str) -> int:
    return txn.execute("UPDATE media SET quarantined = TRUE WHERE user_id = ? AND quarantined = FALSE", (user_id,))


def ids_for_user(txn: Txn, user_id: str) -> list[str]:
    return [r[0] for r in txn.fetchall("SELECT media_id FROM media WHERE user_id = ?", (user_id,))]


def ids_before(txn: Txn, before_ts: int, size_gt: int) -> list[str]:
    return [
        r[0]
        for r in txn.fetchall(
            "SELECT media_id FROM media WHERE created_ts < ? AND COALESCE(size, 0) > ?", (before_ts, size_gt)
        )
    ]


def delete(txn: Txn, media_id: str) -> None:
    txn.execute("DELETE FROM media_thumbnails WHERE media_id = ?", (media_id,))
    txn.execute("DELETE FROM media WHERE media_id = ?", (media_id,))


def thumbnails(txn: Txn, media_id: str) -> list[tuple[int, int, str, str, int]]:
    rows = txn.fetchall(
        "SELECT width, height, method, content_type, size FROM media_thumbnails WHERE media_id = ?", (media_id,)
    )
    return [(int(r[0]), int(r[1]), r[2], r[3], int(r[4])) for r in rows]


def add_thumbnail(txn: Txn, media_id: str, width: int, height: int, method: str, content_type: str, size: int) -> None:
    txn.execute(
        "INSERT INTO media_thumbnails (media_id, width, height, method, content_type, size) VALUES (?, ?, ?, ?, ?, ?) "
        "ON CONFLICT (media_id, width, height, method) DO NOTHING",
        (media_id, width, height, method, content_type, size),
    )
