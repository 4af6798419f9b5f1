"""Where media bytes live, behind a small interface.

:class:`MediaStore` is what the media service needs: write a stream under a key,
read it back as a stream, delete it. :class:`LocalMediaStore` keeps files under a
directory; an S3-compatible object store can implement the same four methods.

Keys are media IDs (``[A-Za-z0-9_-]``, checked by the caller *and* here) and
thumbnail names derived from them, so no key can name a path outside the store.
Writes go to a temporary file that is renamed into place only when complete:
a crash never leaves a half-written file under a real name. File I/O runs on a
thread so a slow disk never stalls the event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import hashlib
import os
import re
import secrets
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Protocol

CHUNK = 256 * 1024
_KEY_RE = re.compile(r"^[A-Za-z0-9_-]+(?:/[A-Za-z0-9_.-]+)?$")


class MediaStore(Protocol):
    async def write(self, key: str, chunks: AsyncIterator[bytes], *, digest: bool = True) -> tuple[int, str]:
        """Store the stream; returns (size, sha256 hex, or "" without ``digest``). Nothing is stored on error."""

    def read(self, key: str) -> AsyncIterator[bytes]:
        """The stored bytes, chunk by chunk."""

    async def exists(self, key: str) -> bool: ...

    async def delete_prefix(self, media_id: str) -> None:
        """Delete the media and everything derived from it (thumbnails)."""


class LocalMediaStore:
    def __init__(self, root: Path) -> None:
        self.root = root
        (root / "tmp").mkdir(parents=True, exist_ok=True)

    def _path(self, key: str) -> Path:
        if not _KEY_RE.match(key) or ".." in key:
            raise ValueError(f"invalid media key {key!r}")
        media_id, _, derived = key.partition("/")
        base = self.root / media_id[:2] / media_id[2:4] / media_id
        return base / derived if derived else base / "original"

    async def write(self, key: str, chunks: AsyncIterator[bytes], *, digest: bool = True) -> tuple[int, str]:
        target = self._path(key)
        tmp = self.root / "tmp" / f"{secrets.token_hex(8)}.part"
        hasher = hashlib.sha256() if digest else None
        size = 0
        handle = await asyncio.to_thread(open, tmp, "wb")

        def put(chunk: bytes) -> None:  # on the worker thread: hashing releases the GIL
            if hasher is not None:
                hasher.update(chunk)
            handle.write(chunk)

        try:
            async for chunk in chunks:
                size += len(chunk)
                await asyncio.to_thread(put, chunk)
            await asyncio.to_thread(_finish, handle, tmp, target)
        except BaseException:
            await asyncio.to_thread(_discard, handle, tmp)
            raise
        return size, hasher.hexdigest() if hasher is not None else ""

    async def write_bytes(self, key: str, data: bytes) -> None:
        async def one() -> AsyncIterator[bytes]:
            yield data

        await self.write(key, one())

    async def read(self, key: str) -> AsyncIterator[bytes]:
        path = self._path(key)
        handle = await asyncio.to_thread(open, path, "rb")
        try:
            while True:
                chunk = await asyncio.to_thread(handle.read, CHUNK)
                if not chunk:
                    return
                yield chunk
        finally:
            await asyncio.to_thread(handle.close)

    async def read_bytes(self, key: str, limit: int) -> bytes:
        path = self._path(key)

        def load() -> bytes:
            with open(path, "rb") as fh:
                return fh.read(limit + 1)

        return await asyncio.to_thread(load)

    async def exists(self, key: str) -> bool:
        return await asyncio.to_thread(self._path(key).exists)

    async def delete_prefix(self, media_id: str) -> None:
        base = self._path(media_id).parent

        def remove() -> None:
            # Tolerates a concurrent delete of the same media (files already gone) and a
            # file written meanwhile (a key rotation in another process): once more then.
            for _ in range(2):
                if not base.exists():
                    return
                for path in sorted(base.rglob("*"), reverse=True):
                    with contextlib.suppress(FileNotFoundError):
                        if path.is_dir():
                            _rmdir(path)
                        else:
                            path.unlink()
                if _rmdir(base):
                    return

        await asyncio.to_thread(remove)


def _rmdir(path: Path) -> bool:
    """Remove an empty directory; False if something is (again) in it."""
    try:
        path.rmdir()
    except FileNotFoundError:
        return True
    except OSError as exc:
        if exc.errno in (errno.ENOTEMPTY, errno.EEXIST):
            return False
        raise
    return True


def _finish(handle: object, tmp: Path, target: Path) -> None:
    handle.flush()  # type: ignore[attr-defined]
    os.fsync(handle.fileno())  # type: ignore[attr-defined]
    handle.close()  # type: ignore[attr-defined]
    target.parent.mkdir(parents=True, exist_ok=True)
    os.replace(tmp, target)
    # The rename itself is durable only once its directory is: without this, a power
    # cut after the database commit that follows could bring back the file it replaced.
    directory = os.open(target.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


def _discard(handle: object, tmp: Path) -> None:
    try:
        handle.close()  # type: ignore[attr-defined]
    finally:
        tmp.unlink(missing_ok=True)
