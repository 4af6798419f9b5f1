"""The media repository: uploads, authenticated downloads, thumbnails, limits.

Safety rules, in the order a request meets them:

* media IDs are ``[A-Za-z0-9_-]`` only (no path traversal), server names must be ours;
* uploads stream to storage — never held whole in memory — and stop at
  ``media.max_upload_bytes`` (413 ``M_TOO_LARGE``); per-user quota and upload rate
  give 403 ``M_FORBIDDEN`` and 429 ``M_LIMIT_EXCEEDED``;
* the content type is taken from the bytes when they say what they are; a file that
  claims to be an image/audio/video type but is not is stored as
  ``application/octet-stream``, and HTML/SVG/XML are recognised as such;
* downloads carry ``Content-Disposition: attachment`` unless the type is on the
  spec's safe inline list, plus ``Content-Security-Policy: sandbox ...``,
  ``X-Content-Type-Options: nosniff`` and ``Cross-Origin-Resource-Policy``;
* images are decoded by Pillow only below ``media.max_image_pixels`` (decompression
  bombs are refused with 413 before any pixel is decoded), on a bounded thread pool.

Encryption at rest: with a keyring, originals and thumbnails are stored in the
streamed chunked AEAD format of :mod:`bastion.security.stream` under the *uploader's*
user DEK, bound to their names (``media|<id>`` and ``media|<id>|thumb|<w>x<h>|<method>``),
so erasing the user (destroying their keys) shreds their media too. Files written
before encryption was enabled are served as they are. A file that fails
authentication is never served: before the response starts that is a 500
``M_UNKNOWN``; part-way through a large download the transfer is aborted (the client
sees a connection closed short of ``Content-Length``, never a complete-looking file).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import io
import logging
import re
import secrets
import time
from collections.abc import AsyncGenerator, AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

from bastion.clock import now_ms
from bastion.cluster.ratelimit import RateLimiter
from bastion.errors import Forbidden, LimitExceeded, MatrixError, NotFound, TooLarge
from bastion.security import stream as media_crypto
from bastion.security.crypto import AesGcm, IntegrityError, Sm4Gcm
from bastion.services.media_store import LocalMediaStore, MediaStore
from bastion.services.requester import Requester
from bastion.storage import media as media_store
from bastion.storage.database import Database
from bastion.storage.media import MAC_PREFIX, MediaRow

log = logging.getLogger(__name__)

MEDIA_ID_RE = re.compile(r"^[A-Za-z0-9_-]{1,255}$")
SNIFF_BYTES = 8192
PENDING_LIFETIME_MS = 24 * 3600 * 1000
MAX_PENDING_PER_USER = 50
THUMBNAIL_SIZES = ((32, 32, "crop"), (96, 96, "crop"), (320, 240, "scale"), (640, 480, "scale"), (800, 600, "scale"))
THUMBNAILABLE = {"image/jpeg", "image/png", "image/gif", "image/webp"}
INLINE_SAFE = frozenset(
    {
        "text/css", "text/plain", "text/csv", "application/json", "application/ld+json",
        "image/jpeg", "image/gif", "image/png", "image/apng", "image/webp", "image/avif",
        "video/mp4", "video/webm", "video/ogg", "video/quicktime",
        "audio/mp4", "audio/webm", "audio/aac", "audio/mpeg", "audio/ogg", "audio/wave", "audio/wav",
        "audio/x-wav", "audio/x-pn-wav", "audio/flac", "audio/x-flac",
    }
)
CSP = b"sandbox; default-src 'none'; script-src 'none'; plugin-types application/pdf; style-src 'unsafe-inline'; media-src 'self'; object-src 'self';"


class CannotOverwrite(MatrixError):
    status = 409
    errcode = "M_CANNOT_OVERWRITE_MEDIA"


class NotYetUploaded(MatrixError):
    status = 504
    errcode = "M_NOT_YET_UPLOADED"


class MediaUnreadable(MatrixError):
    """The stored file failed authentication (tampered, truncated, moved, or its key destroyed).

    500, not 502: the file is this server's own storage, not an upstream's answer.
    """

    status = 500
    errcode = "M_UNKNOWN"

    def __init__(self) -> None:
        super().__init__("The stored media failed its integrity check and cannot be served")


def _original(media_id: str) -> tuple[str, bytes]:
    """(store key, encryption binding) of an original."""
    return media_id, f"media|{media_id}".encode()


def _thumbnail(media_id: str, width: int, height: int, method: str) -> tuple[str, bytes]:
    """(store key, encryption binding) of a thumbnail."""
    return f"{media_id}/thumb-{width}x{height}-{method}", f"media|{media_id}|thumb|{width}x{height}|{method}".encode()


async def _one(data: bytes) -> AsyncIterator[bytes]:
    yield data


def sniff_content_type(head: bytes, declared: str | None) -> str:
    """The content type to store, judged from the first bytes and the declared type."""
    import filetype

    declared = (declared or "").split(";")[0].strip().lower() or None
    kind = filetype.guess(head) if head else None
    if kind is not None:
        return str(kind.mime)
    text = head.lstrip(b"\xef\xbb\xbf \t\r\n").lower()
    if b"<svg" in text[:2048]:
        return "image/svg+xml"
    if text.startswith((b"<!doctype html", b"<html", b"<head", b"<body", b"<script")) or b"<script" in text:
        return "text/html"
    if text.startswith(b"<?xml"):
        return "application/xml"
    if declared is None:
        return "application/octet-stream"
    if declared.split("/")[0] in ("image", "video", "audio") or declared in ("application/pdf", "application/zip"):
        # It claims a type whose magic bytes we would have recognised: it is not that.
        return "application/octet-stream"
    if declared in ("text/html", "application/xhtml+xml", "image/svg+xml", "text/xml", "application/xml", "text/javascript"):
        return declared
    return declared if re.match(r"^[a-z0-9.+-]+/[a-z0-9.+-]+$", declared) else "application/octet-stream"


def content_disposition(content_type: str, name: str | None) -> bytes:
    kind = "inline" if content_type in INLINE_SAFE else "attachment"
    if not name:
        return kind.encode()
    return f"{kind}; filename*=utf-8''{quote(name, safe='')}".encode()


@dataclass
class MediaConfig:
    max_upload_bytes: int
    user_quota_bytes: int
    uploads_per_minute: int
    max_image_pixels: int
    legacy_unauthenticated: bool


class MediaService:
    def __init__(self, db: Database, store: LocalMediaStore, server_name: str, config: MediaConfig) -> None:
        self._db = db
        self.store = store
        self.server_name = server_name
        self.config = config
        self.limiter = RateLimiter()
        self._pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="thumbnail")
        self._waiters: dict[str, asyncio.Event] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        # Thumbnails being made now, so a client's request and the background pass
        # that follows an upload share one piece of work instead of doing it twice.
        self._making: dict[tuple[str, int, int, str], asyncio.Future[tuple[int, int, str, str, int] | None]] = {}

    def close(self) -> None:
        self._pool.shutdown(wait=False)
        for task in self._tasks:
            task.cancel()

    # -- helpers ------------------------------------------------------------------------------

    def check_id(self, server_name: str, media_id: str) -> None:
        if not MEDIA_ID_RE.match(media_id):
            raise NotFound("Media not found")
        if server_name != self.server_name:
            raise NotFound("This server does not federate; only its own media can be fetched")

    async def _rate(self, user_id: str) -> None:
        """Every upload attempt counts (refused ones too), across all workers."""
        retry = await self.limiter.attempt(f"media:{user_id}", self.config.uploads_per_minute)
        if retry is not None:
            raise LimitExceeded("Too many uploads; try again later", retry_after_ms=retry)

    async def _check_quota(self, user_id: str, extra: int) -> None:
        used = await self._db.read(media_store.user_usage, user_id)
        if used + extra > self.config.user_quota_bytes:
            raise Forbidden("Your media storage quota is used up")

    def config_response(self) -> dict[str, Any]:
        return {"m.upload.size": self.config.max_upload_bytes}

    # -- uploading -------------------------------------------------------------------------------

    async def upload(
        self,
        requester: Requester,
        chunks: AsyncIterator[bytes],
        declared_type: str | None,
        filename: str | None,
        declared_length: int | None,
        media_id: str | None = None,
    ) -> str:
        user = requester.user_id
        if filename is not None and (len(filename) > 255 or "\x00" in filename or "/" in filename):
            raise MatrixError("Invalid filename", errcode="M_INVALID_PARAM", status=400)
        await self._rate(user)
        await self._check_quota(user, declared_length or 0)
        media_id = media_id or secrets.token_urlsafe(18)
        sniffed: dict[str, str] = {}

        async def sniffing() -> AsyncIterator[bytes]:
            head = b""
            async for chunk in chunks:
                if "type" not in sniffed:
                    head += chunk
                    if len(head) < SNIFF_BYTES:
                        continue
                    sniffed["type"] = sniff_content_type(head, declared_type)
                    yield head
                    continue
                yield chunk
            if "type" not in sniffed:
                sniffed["type"] = sniff_content_type(head, declared_type)
                if head:
                    yield head

        dek = await self._data_key(user)
        if dek is None:
            size, digest = await self.store.write(media_id, sniffing())
        else:
            # Size and digest are of the plaintext; the digest is an HMAC keyed from the DEK.
            dek_id, aead = dek
            mac = media_crypto.content_mac(aead)
            counted = 0

            def tap(part: memoryview) -> None:
                nonlocal counted
                mac.update(part)
                counted += len(part)

            key, binding = _original(media_id)
            await self.store.write(key, media_crypto.encrypt_stream(sniffing(), aead, dek_id, binding, tap=tap), digest=False)
            size, digest = counted, f"{MAC_PREFIX}{dek_id}:{mac.hexdigest()}"
        content_type = sniffed.get("type", "application/octet-stream")
        try:
            await self._check_quota(user, size)
            await self._db.write(media_store.store_upload, media_id, user, content_type, filename, size, digest, now_ms())
        except BaseException:
            await self.store.delete_prefix(media_id)
            raise
        waiter = self._waiters.pop(media_id, None)
        if waiter is not None:
            waiter.set()
        if content_type in THUMBNAILABLE:
            task = asyncio.create_task(self._pregenerate(media_id, user, dek is not None, content_type))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        return f"mxc://{self.server_name}/{media_id}"

    async def create(self, requester: Requester) -> dict[str, Any]:
        """POST /_matrix/media/v1/create: reserve an MXC URI for a later upload."""
        now = now_ms()
        if await self._db.read(media_store.count_pending, requester.user_id, now) >= MAX_PENDING_PER_USER:
            raise LimitExceeded("Too many pending uploads")
        media_id = secrets.token_urlsafe(18)
        expires = now + PENDING_LIFETIME_MS
        await self._db.write(media_store.create_pending, media_id, requester.user_id, now, expires)
        return {"content_uri": f"mxc://{self.server_name}/{media_id}", "unused_expires_at": expires}

    async def upload_to(
        self, requester: Requester, server_name: str, media_id: str, chunks: AsyncIterator[bytes],
        declared_type: str | None, filename: str | None, declared_length: int | None,
    ) -> None:
        self.check_id(server_name, media_id)
        row = await self._db.read(media_store.get, media_id)
        if row is None or (row.expires_ts is not None and row.expires_ts < now_ms() and not row.uploaded):
            raise NotFound("Unknown or expired media ID")
        if row.user_id != requester.user_id:
            raise Forbidden("This media ID was created by someone else")
        if row.uploaded:
            raise CannotOverwrite("This media has already been uploaded")
        await self.upload(requester, chunks, declared_type, filename, declared_length, media_id=media_id)

    # -- downloading ------------------------------------------------------------------------------

    async def _row(self, server_name: str, media_id: str, timeout_ms: int | None = None) -> MediaRow:
        self.check_id(server_name, media_id)
        row = await self._db.read(media_store.get, media_id)
        if row is not None and not row.uploaded and not row.quarantined:
            wait = min(max(timeout_ms if timeout_ms is not None else 20_000, 0), 120_000) / 1000
            event = self._waiters.setdefault(media_id, asyncio.Event())
            deadline = time.monotonic() + wait
            while True:
                # Woken by an upload on this worker, or noticed by polling (an upload on another).
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(event.wait(), max(0.0, min(0.5, deadline - time.monotonic())))
                row = await self._db.read(media_store.get, media_id)
                if row is None or row.uploaded or row.quarantined:
                    break
                if time.monotonic() >= deadline:
                    raise NotYetUploaded("The media has not been uploaded yet")
        if row is None or row.quarantined or not row.uploaded:
            raise NotFound("Media not found")
        return row

    async def download(self, server_name: str, media_id: str, filename: str | None, timeout_ms: int | None) -> tuple[AsyncIterator[bytes], list[tuple[bytes, bytes]], int]:
        row = await self._row(server_name, media_id, timeout_ms)
        content_type = row.content_type or "application/octet-stream"
        headers = [
            (b"content-type", content_type.encode()),
            (b"content-disposition", content_disposition(content_type, filename or row.upload_name)),
            (b"content-security-policy", CSP),
            (b"cross-origin-resource-policy", b"cross-origin"),
            (b"cache-control", b"private, max-age=86400"),
        ]
        key, binding = _original(media_id)
        return await self._open(key, binding, row.encrypted), headers, row.size or 0

    # -- encryption at rest ---------------------------------------------------------------------

    async def _data_key(self, user_id: str, always: bool = False) -> tuple[int, AesGcm | Sm4Gcm] | None:
        crypto = self._db.crypto
        if crypto is None or not (crypto.enabled or always):
            return None
        return await self._db.write(media_store.user_data_key, user_id, always)

    async def _key_by_id(self, dek_id: int) -> AesGcm | Sm4Gcm:
        return await self._db.read(media_store.key_by_id, dek_id)

    def _plaintext(self, key: str, binding: bytes, encrypted: bool) -> AsyncGenerator[bytes, None]:
        return media_crypto.open_stream(self.store.read(key), binding, self._key_by_id, required=encrypted)

    async def _open(self, key: str, binding: bytes, encrypted: bool) -> AsyncIterator[bytes]:
        """The stored file's plaintext, its first batch already authenticated.

        A file that fails authentication before anything was sent is a clean 500; one
        that fails later (after the first 256 KiB) aborts the transfer.
        """
        plain = self._plaintext(key, binding, encrypted)
        try:
            first = await anext(plain, None)
        except IntegrityError as exc:
            await plain.aclose()
            log.error("media file %s failed its integrity check and was not served: %s", key, exc)
            raise MediaUnreadable() from None
        except BaseException:
            await plain.aclose()
            raise

        async def rest() -> AsyncIterator[bytes]:
            try:
                if first is not None:
                    yield first
                async for piece in plain:
                    yield piece
            except IntegrityError as exc:
                log.error("media file %s failed its integrity check part-way through; aborting the transfer: %s", key, exc)
                raise
            finally:
                await plain.aclose()

        return rest()

    # -- thumbnails --------------------------------------------------------------------------------

    async def thumbnail(
        self, server_name: str, media_id: str, width: int, height: int, method: str, animated: bool, timeout_ms: int | None,
    ) -> tuple[AsyncIterator[bytes], list[tuple[bytes, bytes]], int]:
        row = await self._row(server_name, media_id, timeout_ms)
        content_type = row.content_type or "application/octet-stream"
        if content_type not in THUMBNAILABLE:
            raise MatrixError("This media cannot be thumbnailed", errcode="M_UNKNOWN", status=400)
        if animated and content_type in ("image/gif", "image/webp"):
            return await self.download(server_name, media_id, None, timeout_ms)
        existing = await self._db.read(media_store.thumbnails, media_id)
        fits = sorted(
            (t for t in existing if t[2] == method and t[0] >= width and t[1] >= height),
            key=lambda t: (t[0] * t[1], t[0]),
        )
        if fits:
            w, h, m, thumb_type, size = fits[0]
        else:
            made = await self._generate(media_id, row.user_id, row.encrypted, content_type, width, height, method)
            if made is None:
                return await self.download(server_name, media_id, None, timeout_ms)  # smaller than asked: original
            w, h, m, thumb_type, size = made
        headers = [
            (b"content-type", thumb_type.encode()),
            (b"content-disposition", b"inline"),
            (b"content-security-policy", CSP),
            (b"cross-origin-resource-policy", b"cross-origin"),
            (b"cache-control", b"private, max-age=86400"),
        ]
        key, binding = _thumbnail(media_id, w, h, m)
        return await self._open(key, binding, row.encrypted), headers, size

    async def _pregenerate(self, media_id: str, user_id: str, encrypted: bool, content_type: str) -> None:
        for width, height, method in THUMBNAIL_SIZES:
            try:
                existing = await self._db.read(media_store.thumbnails, media_id)
                if any(t[0] == width and t[1] == height and t[2] == method for t in existing):
                    continue  # a client asked for this size first
                await self._generate(media_id, user_id, encrypted, content_type, width, height, method)
            except MatrixError as exc:
                log.info("no thumbnail for %s: %s", media_id, exc.message)
                return
            except Exception:
                log.exception("thumbnailing %s failed", media_id)
                return

    async def _generate(
        self, media_id: str, user_id: str, encrypted: bool, content_type: str, width: int, height: int, method: str
    ) -> tuple[int, int, str, str, int] | None:
        """Make (and store) one thumbnail; concurrent calls for the same one share the work."""
        making = (media_id, width, height, method)
        pending = self._making.get(making)
        if pending is not None:
            return await asyncio.shield(pending)
        fut: asyncio.Future[tuple[int, int, str, str, int] | None] = asyncio.get_running_loop().create_future()
        self._making[making] = fut
        try:
            result = await self._generate_now(media_id, user_id, encrypted, content_type, width, height, method)
        except asyncio.CancelledError:
            fut.cancel()
            raise
        except BaseException as exc:
            fut.set_exception(exc)
            fut.exception()  # retrieved: only the callers that share it re-raise
            raise
        else:
            fut.set_result(result)
            return result
        finally:
            del self._making[making]

    async def _generate_now(
        self, media_id: str, user_id: str, encrypted: bool, content_type: str, width: int, height: int, method: str
    ) -> tuple[int, int, str, str, int] | None:
        key, binding = _original(media_id)
        try:
            data = await media_crypto.read_all(self._plaintext(key, binding, encrypted), self.config.max_upload_bytes)
        except IntegrityError as exc:
            log.error("media file %s failed its integrity check; no thumbnail made: %s", key, exc)
            raise MediaUnreadable() from None
        loop = asyncio.get_running_loop()
        result = await loop.run_in_executor(
            self._pool, _make_thumbnail, data, width, height, method, self.config.max_image_pixels
        )
        if result is None:
            return None
        thumb, thumb_type = result
        key, binding = _thumbnail(media_id, width, height, method)
        # A thumbnail of an encrypted original is always encrypted (under the uploader's key).
        dek = await self._data_key(user_id, always=encrypted)
        if dek is None:
            await self.store.write_bytes(key, thumb)
        else:
            await self.store.write(key, media_crypto.encrypt_stream(_one(thumb), dek[1], dek[0], binding), digest=False)
        await self._db.write(media_store.add_thumbnail, media_id, width, height, method, thumb_type, len(thumb))
        return width, height, method, thumb_type, len(thumb)

    # -- administration -----------------------------------------------------------------------------

    async def quarantine(self, server_name: str, media_id: str, value: bool = True) -> None:
        self.check_id(server_name, media_id)
        if not await self._db.write(media_store.set_quarantined, media_id, value):
            raise NotFound("Media not found")

    async def quarantine_user(self, user_id: str) -> int:
        return await self._db.write(media_store.quarantine_user, user_id)

    async def delete(self, media_ids: list[str]) -> int:
        for media_id in media_ids:
            await self.store.delete_prefix(media_id)
            await self._db.write(media_store.delete, media_id)
            # Once more: a key rotation (another process) may have rewritten a file between
            # the two steps; it checks for the row after each write, so between them this
            # leaves nothing behind.
            await self.store.delete_prefix(media_id)
        return len(media_ids)

    async def delete_user_media(self, user_id: str) -> int:
        return await self.delete(await self._db.read(media_store.ids_for_user, user_id))

    async def delete_before(self, before_ts: int, size_gt: int = 0) -> int:
        return await self.delete(await self._db.read(media_store.ids_before, before_ts, size_gt))


# -- key rotation -----------------------------------------------------------------------------------


@dataclass
class Rekeyed:
    """What :func:`reencrypt_upload` did to one upload's files."""

    files: int = 0  # rewritten under the active key
    unreadable: list[str] = field(default_factory=list)  # store keys left as they are: failed authentication, or missing


async def _file_dek_id(store: MediaStore, key: str) -> int | None:
    """The DEK id in a stored file's header; None for a file without one (plaintext)."""
    chunks = store.read(key)
    head = b""
    try:
        async for piece in chunks:
            head += piece
            if len(head) >= media_crypto.HEADER_SIZE:
                break
    finally:
        await chunks.aclose()  # type: ignore[attr-defined]
    if not media_crypto.is_encrypted(head):
        return None
    return media_crypto.parse_header(head)[1]


async def reencrypt_upload(db: Database, store: MediaStore, media_id: str) -> Rekeyed:
    """Bring one upload's files under its uploader's *active* data key (``bastion keys rotate``).

    Every file (the original and each thumbnail) whose header names another key — or
    that has no header, written before encryption at rest was enabled — is decrypted
    and encrypted again, streamed, and replaced atomically (a download already reading
    the old file finishes from it; one that read the row before the change still opens
    the new file, whose header names its key). Order: the original first — a plaintext
    one checked against its stored SHA-256, and if that fails nothing of the upload is
    touched — then the thumbnails, and last the original's HMAC in the ``sha256``
    column, recomputed under the new key and set by compare-and-set (once the row says
    "encrypted", a plaintext thumbnail would be refused as tampering). A file that
    fails authentication is logged and left as it is (the rest of the rotation goes
    on). If the upload was deleted meanwhile, whatever this wrote is deleted too.
    """
    done = Rekeyed()
    found = await db.read(media_store.owner_and_digest, media_id)
    if found is None:
        return done  # deleted
    user_id, digest = found
    if digest is None:
        return done  # a pending upload: no file yet
    dek = await db.write(media_store.user_data_key, user_id)
    if dek is None:
        return done  # encryption at rest off: nothing to encrypt under
    dek_id, aead = dek
    sealed = digest.startswith(MAC_PREFIX)

    async def key_for(wanted: int) -> AesGcm | Sm4Gcm:
        return await db.read(media_store.key_by_id, wanted)

    async def rewrite(key: str, binding: bytes, *, mac: hmac.HMAC | None = None, expect_sha256: str | None = None) -> bool:
        try:
            if mac is None and await _file_dek_id(store, key) == dek_id:
                return False  # a thumbnail already under the active key

            async def plaintext() -> AsyncIterator[bytes]:
                plain_hash = hashlib.sha256() if expect_sha256 is not None else None
                async with contextlib.aclosing(
                    media_crypto.open_stream(store.read(key), binding, key_for, required=sealed)
                ) as plain:
                    async for piece in plain:
                        if plain_hash is not None:
                            plain_hash.update(piece)
                        yield piece
                # Checked before the last chunk is sealed: a mismatch stores nothing.
                if plain_hash is not None and plain_hash.hexdigest() != expect_sha256:
                    raise IntegrityError("the file does not match its stored SHA-256")

            sealing = media_crypto.encrypt_stream(plaintext(), aead, dek_id, binding, tap=mac.update if mac else None)
            await store.write(key, sealing, digest=False)
        except (IntegrityError, FileNotFoundError) as exc:
            if isinstance(exc, FileNotFoundError) and await db.read(media_store.owner_and_digest, media_id) is None:
                return False  # deleted while this ran: nothing to report
            log.error("media file %s was not re-encrypted: %s", key, exc)
            done.unreadable.append(key)
            return False
        done.files += 1
        return True

    mac = None
    if media_store.digest_dek_id(digest) != dek_id:
        mac = media_crypto.content_mac(aead)
        if not await rewrite(*_original(media_id), mac=mac, expect_sha256=None if sealed else digest):
            return done
    for width, height, method, _type, _size in await db.read(media_store.thumbnails, media_id):
        await rewrite(*_thumbnail(media_id, width, height, method))
    if mac is not None and not await db.write(
        media_store.replace_digest, media_id, digest, f"{MAC_PREFIX}{dek_id}:{mac.hexdigest()}"
    ):
        log.info("media %s changed while its files were re-encrypted; its digest was left as it is", media_id)
    if done.files and await db.read(media_store.owner_and_digest, media_id) is None:
        try:
            await store.delete_prefix(media_id)  # deleted while this ran: leave no file behind
        except OSError as exc:
            log.error("media %s was deleted during its re-encryption; removing its files failed: %s", media_id, exc)
    return done


def _make_thumbnail(data: bytes, width: int, height: int, method: str, max_pixels: int) -> tuple[bytes, str] | None:
    """Runs on a worker thread. None if the image is already no larger than asked."""
    from PIL import Image, ImageOps

    try:
        image: Image.Image = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError:
        raise TooLarge("The image is too large to thumbnail") from None
    except Exception as exc:
        raise MatrixError(f"Cannot read the image: {exc.__class__.__name__}", errcode="M_UNKNOWN", status=400) from None
    if image.width * image.height > max_pixels or image.width <= 0 or image.height <= 0:
        raise TooLarge("The image is too large to thumbnail")
    if image.width <= width and image.height <= height:
        return None  # never upscale: the original is the answer
    try:
        image.draft("RGB", (width * 2, height * 2))  # JPEG: decode at reduced size
        image = ImageOps.exif_transpose(image)
        if method == "crop":
            scale = max(width / image.width, height / image.height)
            if scale >= 1:
                target = (min(width, image.width), min(height, image.height))
                image = ImageOps.fit(image, target, method=Image.Resampling.LANCZOS)
            else:
                image = ImageOps.fit(image, (width, height), method=Image.Resampling.LANCZOS)
        else:
            image.thumbnail((width, height), Image.Resampling.LANCZOS)
        out = io.BytesIO()
        if image.mode in ("RGBA", "LA", "P"):
            image.save(out, format="PNG", optimize=True)
            return out.getvalue(), "image/png"
        image.convert("RGB").save(out, format="JPEG", quality=80)
        return out.getvalue(), "image/jpeg"
    except MatrixError:
        raise
    except Exception as exc:
        raise MatrixError(f"Cannot thumbnail the image: {exc.__class__.__name__}", errcode="M_UNKNOWN", status=400) from None
