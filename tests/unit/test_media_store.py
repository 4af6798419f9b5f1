"""The local media store's deletion when something else touches the same files.

A key rotation (``bastion keys rotate``, another process) may rewrite or delete an
upload's files while the server deletes the upload; neither side may fail for it,
and no file may outlive the deletion.
"""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

from bastion.services import media_store
from bastion.services.media_store import LocalMediaStore


def _store_with_files(tmp_path: Path, media_id: str, thumbnails: int) -> LocalMediaStore:
    store = LocalMediaStore(tmp_path)

    async def fill() -> None:
        await store.write_bytes(media_id, b"original")
        for n in range(thumbnails):
            await store.write_bytes(f"{media_id}/thumb-{n}x{n}-crop", b"thumbnail")

    asyncio.run(fill())
    return store


def test_two_deletions_of_the_same_media_at_once_both_succeed(tmp_path: Path) -> None:
    for round_ in range(50):
        media_id = f"media{round_}"
        store = _store_with_files(tmp_path, media_id, thumbnails=20)

        async def both(store: LocalMediaStore = store, media_id: str = media_id) -> None:
            await asyncio.gather(store.delete_prefix(media_id), store.delete_prefix(media_id))

        asyncio.run(both())
        assert not (tmp_path / media_id[:2] / media_id[2:4] / media_id).exists()


def test_a_file_written_during_the_deletion_is_deleted_too(tmp_path: Path, monkeypatch) -> None:
    """A file that appears after the deletion listed the directory (a rotation's
    rewrite landing in between) makes the directory non-empty: the deletion goes
    round once more instead of failing."""
    store = _store_with_files(tmp_path, "mediaX", thumbnails=1)
    base = tmp_path / "me" / "di" / "mediaX"
    real_rmdir = media_store._rmdir
    landed = threading.Event()

    def rmdir_after_a_late_write(path: Path) -> bool:
        if path == base and not landed.is_set():
            landed.set()
            (base / "thumb-9x9-crop").write_bytes(b"written by a rotation meanwhile")
        return real_rmdir(path)

    monkeypatch.setattr(media_store, "_rmdir", rmdir_after_a_late_write)
    asyncio.run(store.delete_prefix("mediaX"))
    assert landed.is_set()
    assert not base.exists()
