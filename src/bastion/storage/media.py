"""Media metadata: who uploaded what, its type, size and state."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from bastion.storage.database import Txn

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


def _row(r: tuple[Any, ...]) -> MediaRow:
    return MediaRow(r[0], r[1], r[2], r[3], r[4], r[5], r[6], r[7], r[8], bool(r[9]))


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
    txn.execute(
        "INSERT INTO media (media_id, user_id, content_type, upload_name, size, sha256, created_ts, uploaded_ts) "
        "VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (media_id) DO UPDATE SET content_type = excluded.content_type, "
        "upload_name = excluded.upload_name, size = excluded.size, sha256 = excluded.sha256, "
        "uploaded_ts = excluded.uploaded_ts, expires_ts = NULL",
        (media_id, user_id, content_type, upload_name, size, sha256, now, now),
    )


def get(txn: Txn, media_id: str) -> MediaRow | None:
    row = txn.fetchone(f"SELECT {_COLUMNS} FROM media WHERE media_id = ?", (media_id,))
    return _row(row) if row is not None else None


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
