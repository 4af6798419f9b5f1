"""The work behind ``bastion keys``: status, DEK rotation with re-encryption, KEK rotation.

These run in the CLI process against the same database as the running server(s),
which keep serving throughout:

* **DEK rotation** makes a new active data key for each chosen scope and tells running
  servers (a ``keys_rotated`` server signal, applied within about a second) to encrypt
  new data with it. It then re-encrypts old rows batch by batch, recording a cursor
  per column, and repeats passes until one finds nothing left under an old key and
  the servers have had time to switch. Old key versions remain readable throughout.
  For user scopes it also re-encrypts their uploaded files and thumbnails
  (:func:`bastion.services.media.reencrypt_upload`), with its own cursor.
  Interrupting it is safe; ``bastion keys rotate`` with no arguments resumes.
* **KEK rotation** (file key provider) writes a new key file whose primary is a new
  KEK and which still holds the old one, re-wraps every DEK under the new KEK, waits
  for running servers to stop wrapping with the old one (they re-read the key file
  before wrapping a new DEK), and finally drops the old KEK from the file. With the
  environment or command providers the operator supplies the new key as primary and
  the old one as previous; ``rotate-kek`` then re-wraps under the primary.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from bastion.clock import now_ms
from bastion.errors import ConfigError
from bastion.security.crypto import KeySet, new_kek
from bastion.services.media import Rekeyed, reencrypt_upload
from bastion.services.media_store import MediaStore
from bastion.storage import accounts as accounts_store
from bastion.storage import keys as keys_store
from bastion.storage import media as media_store
from bastion.storage.database import Database

SETTLE_SECONDS = 3.0  # > the servers' signal poll interval (1 s), with margin
JOB = "job"
MEDIA_FILES = "media files"
MEDIA_UNREADABLE = "media files unreadable"

Progress = Callable[[int], None]


def _no_progress(_n: int) -> None:
    return None


@dataclass
class RotationJob:
    scope: str  # "all", "room" or "user"
    scope_id: str | None
    started_ms: int
    passes: int = 0
    cursors: dict[str, Any] = field(default_factory=dict)

    def columns(self) -> list[keys_store.SealedColumn]:
        if self.scope == "all":
            return list(keys_store.SEALED_COLUMNS)
        return [c for c in keys_store.SEALED_COLUMNS if c.scope == self.scope]

    def to_json(self) -> dict[str, Any]:
        return {"scope": self.scope, "scope_id": self.scope_id, "started_ms": self.started_ms,
                "passes": self.passes, "cursors": self.cursors}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> RotationJob:
        return cls(data["scope"], data.get("scope_id"), int(data["started_ms"]), int(data.get("passes", 0)),
                   dict(data.get("cursors", {})))


def _require_crypto(db: Database) -> Any:
    if db.crypto is None:
        raise ConfigError("encryption at rest is disabled (encryption.enabled: false); there are no keys to manage")
    return db.crypto


def pending_job(db: Database) -> RotationJob | None:
    data = db.run_sync(keys_store.get_progress, JOB)
    return RotationJob.from_json(data) if data else None


def start_rotation(db: Database, scope: str, scope_id: str | None) -> RotationJob:
    """New DEK versions for the scope(s); returns the job that re-encrypts old data."""
    _require_crypto(db)
    if pending_job(db) is not None:
        raise ConfigError("a key rotation is already in progress; run 'bastion keys rotate' without arguments to resume it")
    job = RotationJob(scope, scope_id, now_ms())

    def txn_fn(txn: Any) -> int:
        count = 0
        if scope in ("all", "room"):
            rooms = keys_store.scope_ids(txn, "room", scope_id if scope == "room" else None)
            if scope == "room" and txn.fetchval("SELECT 1 FROM rooms WHERE room_id = ?", (scope_id,)) is None:
                raise ConfigError(f"no room {scope_id}")
            count += keys_store.start_new_versions(txn, "room", rooms)
        if scope in ("all", "user"):
            users = keys_store.scope_ids(txn, "user", scope_id if scope == "user" else None)
            if scope == "user" and txn.fetchval("SELECT 1 FROM users WHERE user_id = ?", (scope_id,)) is None:
                raise ConfigError(f"no user {scope_id}")
            count += keys_store.start_new_versions(txn, "user", users)
        keys_store.set_progress(txn, JOB, job.to_json(), now_ms())
        accounts_store.add_signal(txn, "keys_rotated", scope_id or "*", now_ms())
        return count

    db.run_sync(txn_fn)
    return job


def rows_to_scan(db: Database, job: RotationJob, media: bool = False) -> int:
    """Rows (and with ``media``, uploads) a first pass reads: the progress bar's length."""

    def txn_fn(txn: Any) -> int:
        total = 0
        if media and job.scope in ("all", "user"):
            total += media_store.count_uploaded(txn, job.scope_id)
        for column in job.columns():
            where = f"WHERE {column.column} IS NOT NULL" + (f" AND {column.scope_column} = ?" if job.scope_id else "")
            total += int(txn.fetchval(f"SELECT COUNT(*) FROM {column.table} {where}", (job.scope_id,) if job.scope_id else ()))
        return total

    return db.run_sync(txn_fn)


def run_rotation(
    db: Database,
    job: RotationJob,
    batch: int = 500,
    progress: Progress = _no_progress,
    settle_seconds: float = SETTLE_SECONDS,
    stop_after_batches: int | None = None,
    media: MediaStore | None = None,
) -> dict[str, int]:
    """Re-encrypt everything the job covers; resumable. Returns rows rewritten per column,
    and with ``media`` (the server's media store) the files rewritten (``MEDIA_FILES``)
    and any left unreadable (``MEDIA_UNREADABLE``).

    ``stop_after_batches`` interrupts the run (as a crash would) — for tests.
    """
    _require_crypto(db)
    rewritten: dict[str, int] = {}
    unreadable: set[str] = set()
    batches = 0
    only = job.scope_id
    while True:
        pass_rewritten = 0
        for column in job.columns():
            cursor = job.cursors.get(column.name)
            if cursor == "done":
                continue
            while True:
                if stop_after_batches is not None and batches >= stop_after_batches:
                    raise InterruptedError("rotation interrupted")

                def txn_fn(
                    txn: Any, cursor: Any = cursor, column: keys_store.SealedColumn = column
                ) -> tuple[Any, int, int]:
                    next_cursor, scanned, changed = keys_store.reencrypt_batch(txn, column, cursor, only, batch)
                    job.cursors[column.name] = next_cursor if next_cursor is not None else "done"
                    keys_store.set_progress(txn, JOB, job.to_json(), now_ms())
                    return next_cursor, scanned, changed

                cursor, scanned, changed = db.run_sync(txn_fn)
                batches += 1
                rewritten[column.name] = rewritten.get(column.name, 0) + changed
                pass_rewritten += changed
                if job.passes == 0:
                    progress(scanned)
                if cursor is None:
                    break
        if media is not None and job.scope in ("all", "user"):
            pass_rewritten += _reencrypt_media(db, media, job, batch, progress, rewritten, unreadable)
        settled = (now_ms() - job.started_ms) / 1000 >= settle_seconds
        if pass_rewritten == 0 and settled:
            break
        if not settled:
            time.sleep(max(0.0, settle_seconds - (now_ms() - job.started_ms) / 1000))
        # Another pass catches rows a server wrote under an old key before it switched.
        job.passes += 1
        job.cursors = {}
        db.run_sync(lambda txn: keys_store.set_progress(txn, JOB, job.to_json(), now_ms()))
    db.run_sync(keys_store.clear_progress)
    if unreadable:
        rewritten[MEDIA_UNREADABLE] = len(unreadable)
    return rewritten


def _reencrypt_media(
    db: Database, media: MediaStore, job: RotationJob, batch: int, progress: Progress, rewritten: dict[str, int],
    unreadable: set[str],
) -> int:
    """One pass over the uploads the job covers (every user's, or one user's): their files
    under the uploader's active key. Resumable like the columns: the cursor is the last
    media ID done. Returns how many files this pass rewrote; adds the files it could not
    read to ``unreadable``."""
    cursor = job.cursors.get(MEDIA_FILES)
    changed = 0
    while cursor != "done":
        ids = db.run_sync(media_store.uploaded_ids_after, cursor, job.scope_id, batch)

        async def one_batch(ids: list[str] = ids) -> list[Rekeyed]:
            return [await reencrypt_upload(db, media, media_id) for media_id in ids]

        results = asyncio.run(one_batch())
        files = sum(r.files for r in results)
        changed += files
        rewritten[MEDIA_FILES] = rewritten.get(MEDIA_FILES, 0) + files
        for r in results:
            unreadable.update(r.unreadable)
        cursor = ids[-1] if len(ids) == batch else "done"
        job.cursors[MEDIA_FILES] = cursor
        db.run_sync(lambda txn: keys_store.set_progress(txn, JOB, job.to_json(), now_ms()))
        if job.passes == 0:
            progress(len(ids))
    return changed


# -- KEK ---------------------------------------------------------------------------------------------------


def rotate_kek(db: Database, provider: Any, settle_seconds: float = SETTLE_SECONDS, progress: Progress = _no_progress) -> str:
    """Re-wrap every DEK under a new KEK (or the provider's primary). Returns the new KEK id."""
    keyring = _require_crypto(db)
    current = provider.load()
    if provider.can_store() and not current.others:
        # A fresh rotation: the new KEK becomes primary; the old stays until every DEK moved.
        # (With older keys already in the file, an interrupted rotation is finished instead.)
        current = KeySet(new_kek(), (current.primary, *current.others))
        provider.store(current)
    keyring.reload(current)
    primary = current.primary
    db.run_sync(lambda txn: keys_store.set_meta(txn, "kek_check", keyring.kek_check_value()))
    started = time.monotonic()
    while True:
        cursor = 0
        moved = 0
        while True:
            next_cursor, done = db.run_sync(keys_store.rewrap_batch, cursor, 200)
            moved += done
            progress(done)
            if next_cursor is None:
                break
            cursor = next_cursor
        if moved == 0 and time.monotonic() - started >= settle_seconds:
            break
        time.sleep(0.5)
    if db.run_sync(keys_store.keys_wrapped_by_others, primary.key_id):
        raise ConfigError("some data keys are still wrapped by an old key-encryption key; run rotate-kek again")
    if provider.can_store():
        provider.store(KeySet(primary))
    db.run_sync(lambda txn: accounts_store.add_signal(txn, "kek_rotated", primary.key_id, now_ms()))
    return primary.key_id


# -- status --------------------------------------------------------------------------------------------------


def status(db: Database, provider: Any) -> dict[str, Any]:
    keyring = _require_crypto(db)

    def txn_fn(txn: Any) -> dict[str, Any]:
        inventory = keys_store.key_inventory(txn)
        by_id = {row[0]: row for row in inventory}
        columns = []

        def row(name: str, total: int, by_dek: dict[int | None, int]) -> None:
            active = retired = plaintext = unknown = 0
            for dek, n in by_dek.items():
                if dek is None:
                    plaintext += n
                elif dek not in by_id or by_id[dek][7] == "destroyed":
                    unknown += n
                elif by_id[dek][7] == "active":
                    active += n
                else:
                    retired += n
            columns.append({"column": name, "rows": total, "active_key": active, "old_key": retired,
                            "plaintext": plaintext, "unreadable": unknown})

        for column in keys_store.SEALED_COLUMNS:
            cov = keys_store.coverage(txn, column)
            row(column.name, cov.total, cov.by_dek)
        # Uploads, by the key their original's HMAC names (a rotation rewrites the
        # thumbnails before the original, so they follow it).
        digests = media_store.digests(txn)
        row(MEDIA_FILES, len(digests), Counter(media_store.digest_dek_id(d) for d in digests))
        scopes: dict[str, dict[str, int]] = {}
        oldest: dict[str, int] = {}
        for _id, scope, _sid, _version, _suite, _kek, created, state in inventory:
            scopes.setdefault(scope, {}).setdefault(state, 0)
            scopes[scope][state] += 1
            if state == "active":
                oldest[scope] = min(oldest.get(scope, created), created)
        keks = {row[5] for row in inventory if row[7] != "destroyed"}
        return {
            "cipher": keyring.suite,
            "kek": {"primary": keyring.keys.primary.key_id, "others": [k.key_id for k in keyring.keys.others],
                    "provider": type(provider).__name__, "wrapping_keks_in_use": sorted(keks)},
            "deks": scopes,
            "oldest_active_dek_age_days": {s: round((now_ms() - ts) / 86_400_000, 1) for s, ts in oldest.items()},
            "columns": columns,
            "rotation_in_progress": keys_store.get_progress(txn, JOB),
        }

    return db.run_sync(txn_fn)
