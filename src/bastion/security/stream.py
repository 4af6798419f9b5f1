"""Streamed, chunked AEAD for files at rest (media originals and thumbnails).

A field-sized blob (:mod:`bastion.security.crypto`) is sealed in one piece; a media
file can be gigabytes, so it is sealed in fixed-size chunks that can be written and
read as a stream in constant memory, each authenticated before any of its bytes are
used.

File format (version 1)::

    header (28 bytes)
        magic       2   b"\\xbaM"
        format      1   1
        suite       1   AEAD suite id of the DEK: 1 = AES-256-GCM, 2 = SM4-GCM
        DEK id      8   big-endian id of the data key (``encryption_keys.id``)
        salt       16   random, fresh for every file
    chunk 0, chunk 1, ..., chunk n-1 (n >= 1)
        ciphertext of 64 KiB of plaintext, plus the 16-byte tag; the last chunk holds
        the remaining 0..64 KiB (an empty file is a single, empty, final chunk)

* **File key** = HKDF-SHA256(IKM = the DEK, salt = the header's salt,
  info = ``b"bastion-media/1|" + binding``), as long as the suite's key. The binding
  names what the file is (``media|<media id>`` for an original,
  ``media|<media id>|thumb|<w>x<h>|<method>`` for a thumbnail), so a file moved or
  copied to another name does not decrypt; the salt makes every file's key unique,
  so nonces never repeat under one key even though they are counters.
* **Chunk i** is sealed with nonce = ``4 zero bytes || i`` (8 bytes, big-endian) and
  associated data = ``header || i (8 bytes, big-endian) || final`` where ``final`` is
  one byte, 1 on the last chunk and 0 on every other.

What this catches: a flipped bit anywhere (tag failure; the header is in every
chunk's associated data, its salt feeds the key and its DEK id selects it), chunks reordered
(the index is in the nonce and the associated data), a chunk taken from another file
(another key), a file cut at a chunk boundary (the new last chunk was sealed with
``final = 0``), bytes appended after the final chunk (the final chunk is then read as
non-final). A chunk boundary is implicit: every chunk but the last is exactly
64 KiB + 16 bytes, so a reader knows a chunk is the last one when the file ends.

Decryption yields a chunk's plaintext only after its tag has been verified, and
raises :class:`~bastion.security.crypto.IntegrityError` on the first failure.

CPU work is done in batches: 1 MiB (16 chunks) when sealing, 256 KiB (4 chunks) when
opening, which is also the size of the pieces a download sends. A batch goes to a worker
thread only when its estimated CPU time is well above the cost of the hop (about
75 us per ``asyncio.to_thread`` here): AES-GCM with AES-NI seals 1 MiB in about
150 us and — the ``cryptography`` 50.0 measured here holds the GIL during AEAD calls
(releasing it came later, in pyca/cryptography#15359) — would block the event loop
just as long from a thread, so it runs inline; SM4-GCM
(~10 ms per MiB in software) and the plaintext HMAC of uploads (SHA-256, ~0.9 ms per
MiB, which does release the GIL) go to a thread. A hop per 64 KiB chunk would cost
more than the cipher itself.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import os
from collections.abc import AsyncGenerator, AsyncIterable, AsyncIterator, Awaitable, Callable
from contextlib import aclosing
from typing import cast

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from bastion.security.crypto import AesGcm, IntegrityError, Sm4Gcm, make_aead

AeadT = AesGcm | Sm4Gcm

MAGIC = b"\xbaM"
FORMAT = 1
SALT = 16
HEADER_SIZE = len(MAGIC) + 1 + 1 + 8 + SALT  # 28
CHUNK = 64 * 1024
TAG = 16
SEALED_CHUNK = CHUNK + TAG
SEAL_BATCH = 16  # chunks sealed per batch: 1 MiB (a batch is one worker-thread call at most)
OPEN_BATCH = 4  # chunks opened per batch: 256 KiB, the size of the store's reads and of the pieces sent
KEY_INFO = b"bastion-media/1|"
DIGEST_INFO = b"bastion-media-digest/1"
# Estimated CPU time of a batch (x86-64, AES-NI, SHA-NI): a batch costing more than
# the budget runs on a worker thread, a cheaper one inline (see the module docstring).
_COST_US_PER_MIB = {AesGcm.suite_id: 150, Sm4Gcm.suite_id: 10_000}
_TAP_COST_US_PER_MIB = 900  # HMAC-SHA256 of the plaintext
_INLINE_BUDGET_US = 500

Tap = Callable[[memoryview], None]
KeyLookup = Callable[[int], Awaitable[AeadT]]


# -- header and keys ------------------------------------------------------------------------------


def make_header(suite_id: int, dek_id: int, salt: bytes) -> bytes:
    if len(salt) != SALT:
        raise ValueError("the salt is 16 bytes")
    return MAGIC + bytes((FORMAT, suite_id)) + dek_id.to_bytes(8, "big") + salt


def parse_header(header: bytes) -> tuple[int, int, bytes]:
    """(suite id, DEK id, salt) of a file header; IntegrityError if it is not one."""
    if len(header) < HEADER_SIZE or header[:2] != MAGIC:
        raise IntegrityError("not a Bastion encrypted file (bad or truncated header)")
    if header[2] != FORMAT:
        raise IntegrityError(f"unknown encrypted file format {header[2]}")
    return header[3], int.from_bytes(header[4:12], "big"), bytes(header[12:HEADER_SIZE])


def is_encrypted(head: bytes) -> bool:
    """Whether a file starting with ``head`` (at least 2 bytes of it) is in this format."""
    return head[:2] == MAGIC


def file_key(dek: AeadT, salt: bytes, binding: bytes) -> AeadT:
    """The key of one file: HKDF-SHA256 of the DEK, the file's salt and its binding."""
    hkdf = HKDF(algorithm=hashes.SHA256(), length=dek.key_size, salt=salt, info=KEY_INFO + binding)
    return make_aead(dek.suite_id, hkdf.derive(dek.key))


def content_mac(dek: AeadT) -> hmac.HMAC:
    """An HMAC-SHA256 keyed from ``dek`` (domain-separated) for a file's plaintext digest.

    Unlike a bare SHA-256, it does not let someone holding the database confirm a guess
    of a file's contents; files with the same contents under the same DEK version do
    get the same value.
    """
    key = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=DIGEST_INFO).derive(dek.key)
    return hmac.new(key, digestmod=hashlib.sha256)


def _nonce(index: int) -> bytes:
    return b"\x00\x00\x00\x00" + index.to_bytes(8, "big")


def _ad(header: bytes, index: int, final: bool) -> bytes:
    return header + index.to_bytes(8, "big") + (b"\x01" if final else b"\x00")


# -- batches (run on a worker thread, or inline when small) ------------------------------------------


def _seal_batch(key: AeadT, header: bytes, data: memoryview, first: int, last_is_final: bool, tap: Tap | None) -> bytes:
    """Seal ``data`` as consecutive chunks from index ``first``; the last may be final."""
    count = max(1, -(-len(data) // CHUNK))
    out = []
    for n in range(count):
        part = data[n * CHUNK:(n + 1) * CHUNK]
        if tap is not None:
            tap(part)
        final = last_is_final and n == count - 1
        # Both suites take any bytes-like object: a view saves copying each chunk.
        out.append(key.encrypt(_nonce(first + n), cast(bytes, part), _ad(header, first + n, final)))
    return b"".join(out)


def _open_batch(key: AeadT, header: bytes, data: memoryview, first: int, last_is_final: bool) -> bytes:
    count = max(1, -(-len(data) // SEALED_CHUNK))
    out = []
    for n in range(count):
        part = data[n * SEALED_CHUNK:(n + 1) * SEALED_CHUNK]
        sealed = cast(bytes, part) if isinstance(key, AesGcm) else bytes(part)  # SM4's tag must be bytes
        final = last_is_final and n == count - 1
        out.append(key.decrypt(_nonce(first + n), sealed, _ad(header, first + n, final)))
    return b"".join(out)


class _Units:
    """Collects pieces of a stream and hands them out as runs of whole fixed-size units.

    Until the stream ends a unit is handed out only once more data follows it (so it
    is not the last); each byte is copied at most once on the way (joining pieces).
    """

    def __init__(self, unit: int) -> None:
        self.unit = unit
        self.pending: list[bytes] = []
        self.size = 0

    def add(self, piece: bytes) -> None:
        if piece:
            self.pending.append(piece)
            self.size += len(piece)

    def _joined(self) -> bytes:
        joined = self.pending[0] if len(self.pending) == 1 else b"".join(self.pending)
        self.pending = []
        return joined

    def take(self, n: int) -> bytes:
        """The next ``n`` bytes (the caller checked there are that many)."""
        joined = self._joined()
        if len(joined) > n:
            self.pending = [joined[n:]]
        self.size -= n
        return joined[:n]

    def ready(self, batch_bytes: int) -> memoryview | None:
        """Whole units that are not the last, once more than ``batch_bytes`` are waiting."""
        if self.size <= batch_bytes:
            return None
        n = (self.size - 1) // self.unit * self.unit
        joined = self._joined()
        self.pending = [joined[n:]]
        self.size -= n
        return memoryview(joined)[:n]

    def rest(self) -> memoryview:
        data = memoryview(self._joined() if self.pending else b"")
        self.size = 0
        return data


def _inline_limit(suite_id: int, tap: bool) -> int:
    """The largest batch (bytes) cheaper to process on the event loop than on a thread."""
    per_mib = _COST_US_PER_MIB.get(suite_id, 10_000) + (_TAP_COST_US_PER_MIB if tap else 0)
    return _INLINE_BUDGET_US * 2**20 // per_mib


async def _run(inline_limit: int, size: int, fn: Callable[..., bytes], *args: object) -> bytes:
    if size <= inline_limit:
        return fn(*args)
    return await asyncio.to_thread(fn, *args)


# -- streams ---------------------------------------------------------------------------------------------


async def encrypt_stream(
    chunks: AsyncIterable[bytes], dek: AeadT, dek_id: int, binding: bytes, *, tap: Tap | None = None
) -> AsyncGenerator[bytes, None]:
    """The encrypted file (header first) for a plaintext stream of pieces of any size.

    ``tap``, if given, sees every plaintext byte once, in order (on a worker thread for
    large batches): the caller's way to count and digest the plaintext without another
    pass.
    """
    salt = os.urandom(SALT)
    header = make_header(dek.suite_id, dek_id, salt)
    key = file_key(dek, salt, binding)
    inline = _inline_limit(dek.suite_id, tap is not None)
    batch = SEAL_BATCH * CHUNK
    yield header
    units = _Units(CHUNK)
    index = 0
    async for piece in chunks:
        units.add(piece)
        ready = units.ready(batch)
        if ready is None:
            continue
        for at in range(0, len(ready), batch):  # more than a batch when a piece was huge
            data = ready[at:at + batch]
            yield await _run(inline, len(data), _seal_batch, key, header, data, index, False, tap)
            index += len(data) // CHUNK
    # The rest (at most about a batch): whole chunks, then the final one (possibly empty).
    rest = units.rest()
    for at in range(0, max(len(rest) - 1, 0) // batch * batch, batch):
        yield await _run(inline, batch, _seal_batch, key, header, rest[at:at + batch], index, False, tap)
        index += SEAL_BATCH
    last = rest[max(len(rest) - 1, 0) // batch * batch:]
    yield await _run(inline, len(last), _seal_batch, key, header, last, index, True, tap)


async def decrypt_stream(chunks: AsyncIterable[bytes], binding: bytes, key_for: KeyLookup) -> AsyncGenerator[bytes, None]:
    """The plaintext of an encrypted file read as pieces of any size.

    ``key_for(dek_id)`` returns the DEK named by the header. Every chunk is
    authenticated before its plaintext is yielded; any failure (tampering, truncation,
    reordering, the wrong binding, a destroyed key) raises IntegrityError.
    """
    units = _Units(SEALED_CHUNK)
    header: bytes | None = None
    key: AeadT | None = None
    inline = 0
    index = 0
    batch = OPEN_BATCH * SEALED_CHUNK
    async for piece in chunks:
        units.add(piece)
        if key is None:
            if units.size < HEADER_SIZE:
                continue
            header = units.take(HEADER_SIZE)
            suite_id, dek_id, salt = parse_header(header)
            dek = await key_for(dek_id)
            if dek.suite_id != suite_id:
                raise IntegrityError("the file's cipher suite is not its data key's")
            key = file_key(dek, salt, binding)
            inline = _inline_limit(dek.suite_id, False)
        ready = units.ready(batch)
        if ready is None:
            continue
        for at in range(0, len(ready), batch):
            data = ready[at:at + batch]
            yield await _run(inline, len(data), _open_batch, key, header, data, index, False)
            index += len(data) // SEALED_CHUNK
    if header is None or key is None:
        raise IntegrityError("encrypted file truncated inside its header")
    rest = units.rest()
    if len(rest) < TAG or (len(rest) - 1) % SEALED_CHUNK < TAG - 1:
        # Nothing after the last whole chunk, or a last chunk shorter than a tag: cut short.
        raise IntegrityError("encrypted file truncated")
    whole = (len(rest) - 1) // batch * batch
    for at in range(0, whole, batch):
        yield await _run(inline, batch, _open_batch, key, header, rest[at:at + batch], index, False)
        index += OPEN_BATCH
    yield await _run(inline, len(rest) - whole, _open_batch, key, header, rest[whole:], index, True)


async def open_stream(
    chunks: AsyncIterator[bytes], binding: bytes, key_for: KeyLookup, *, required: bool
) -> AsyncGenerator[bytes, None]:
    """A stored file's plaintext: decrypted if it is in this format, else as it is.

    Files written before encryption at rest was enabled have no header and pass
    through unchanged — unless ``required`` (the caller knows the file was written
    encrypted), when a missing header is tampering and raises IntegrityError.
    """
    head = b""
    try:
        while len(head) < len(MAGIC):
            piece = await anext(chunks, None)
            if piece is None:
                break
            head += piece
        if is_encrypted(head):

            async def rest() -> AsyncGenerator[bytes, None]:
                yield head
                async for piece in chunks:
                    yield piece

            async with aclosing(rest()) as sealed, aclosing(decrypt_stream(sealed, binding, key_for)) as plain:
                async for data in plain:
                    yield data
            return
        if required:
            raise IntegrityError("the file should be encrypted but has no encryption header")
        if head:
            yield head
        async for piece in chunks:
            yield piece
    finally:
        close = getattr(chunks, "aclose", None)
        if close is not None:
            await close()


async def read_all(chunks: AsyncIterator[bytes], limit: int) -> bytes:
    """Up to ``limit + 1`` bytes of a stream (so a caller can tell it was too long)."""
    out = bytearray()
    try:
        async for piece in chunks:
            out += piece
            if len(out) > limit:
                break
    finally:
        close = getattr(chunks, "aclose", None)
        if close is not None:
            await close()
    return bytes(out[:limit + 1])
