"""The streamed media file format (bastion.security.stream): round trips and tampering."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator

import pytest

from bastion.security import stream
from bastion.security.crypto import AesGcm, IntegrityError, Sm4Gcm, suite_available

KiB = 1024
DEK_ID = 42
BINDING = b"media|abcdef"
SUITES = [AesGcm]
if suite_available("sm4-gcm"):
    SUITES.append(Sm4Gcm)


def _dek(cls: type[AesGcm] | type[Sm4Gcm] = AesGcm) -> AesGcm | Sm4Gcm:
    return cls(os.urandom(cls.key_size))


async def _pieces(data: bytes, size: int) -> AsyncIterator[bytes]:
    for i in range(0, len(data), size):
        yield data[i:i + size]


async def _collect(chunks: AsyncIterator[bytes]) -> bytes:
    out = bytearray()
    async for piece in chunks:
        out += piece
    return bytes(out)


def encrypt(dek: AesGcm | Sm4Gcm, data: bytes, piece: int = 7000, binding: bytes = BINDING) -> bytes:
    return asyncio.run(_collect(stream.encrypt_stream(_pieces(data, piece), dek, DEK_ID, binding)))


def decrypt(dek: AesGcm | Sm4Gcm, blob: bytes, piece: int = 9999, binding: bytes = BINDING) -> bytes:
    async def key_for(_dek_id: int) -> AesGcm | Sm4Gcm:
        return dek  # even for a tampered DEK id: the header is authenticated anyway

    return asyncio.run(_collect(stream.decrypt_stream(_pieces(blob, piece), binding, key_for)))


def chunks_of(blob: bytes) -> tuple[bytes, list[bytes]]:
    body = blob[stream.HEADER_SIZE:]
    return blob[:stream.HEADER_SIZE], [body[i:i + stream.SEALED_CHUNK] for i in range(0, len(body), stream.SEALED_CHUNK)]


@pytest.mark.parametrize("suite", SUITES, ids=lambda c: c.name)
@pytest.mark.parametrize("size", [0, 1, 64 * KiB - 1, 64 * KiB, 64 * KiB + 1, 3 * 1024 * KiB])
def test_round_trip(suite: type[AesGcm] | type[Sm4Gcm], size: int) -> None:
    if suite is Sm4Gcm and size > 64 * KiB + 1:
        size = 1024 * KiB + 5  # SM4 in software is slow; still more than one batch
    dek = _dek(suite)
    data = os.urandom(size)
    blob = encrypt(dek, data)
    header, chunks = chunks_of(blob)
    assert stream.parse_header(header) == (suite.suite_id, DEK_ID, header[12:])
    assert len(chunks) == max(1, -(-size // stream.CHUNK))
    assert len(blob) == stream.HEADER_SIZE + size + len(chunks) * stream.TAG
    for piece in (1, 4096, 64 * KiB + 16, 10 * 1024 * KiB):  # read in pieces of any size
        assert decrypt(dek, blob, piece) == data
    if size >= 16:  # (a byte or two of plaintext can turn up in random ciphertext by chance)
        assert data[:64] not in blob


def test_input_piece_sizes_do_not_change_the_chunking() -> None:
    dek = _dek()
    data = os.urandom(200 * KiB + 3)
    blobs = [encrypt(dek, data, piece) for piece in (1000, 64 * KiB, 64 * KiB + 1, len(data))]
    assert {len(b) for b in blobs} == {stream.HEADER_SIZE + len(data) + 4 * stream.TAG}
    assert all(decrypt(dek, b) == data for b in blobs)
    assert len({b[:stream.HEADER_SIZE] for b in blobs}) == 4  # a fresh salt for every file


def test_empty_file_is_one_final_empty_chunk() -> None:
    dek = _dek()
    blob = encrypt(dek, b"")
    assert len(blob) == stream.HEADER_SIZE + stream.TAG
    assert decrypt(dek, blob) == b""
    with pytest.raises(IntegrityError):
        decrypt(dek, blob[:stream.HEADER_SIZE])  # the final chunk removed
    with pytest.raises(IntegrityError):
        decrypt(dek, blob[:10])  # inside the header


@pytest.mark.parametrize("size", [128 * KiB, 128 * KiB + 5, 3 * 1024 * KiB])
def test_truncation_at_a_chunk_boundary_is_detected(size: int) -> None:
    dek = _dek()
    blob = encrypt(dek, os.urandom(size))
    header, chunks = chunks_of(blob)
    for keep in range(1, len(chunks)):
        with pytest.raises(IntegrityError):
            decrypt(dek, header + b"".join(chunks[:keep]))
    with pytest.raises(IntegrityError):
        decrypt(dek, blob[:-1])  # inside the last chunk
    with pytest.raises(IntegrityError):
        decrypt(dek, blob + chunks[-1])  # a chunk appended after the final one
    with pytest.raises(IntegrityError):
        decrypt(dek, blob + b"\x00" * 16)


def test_chunk_reorder_and_swap_between_files_are_detected() -> None:
    dek = _dek()
    data = os.urandom(3 * 64 * KiB + 100)
    header, chunks = chunks_of(encrypt(dek, data))
    swapped = [chunks[1], chunks[0], *chunks[2:]]
    with pytest.raises(IntegrityError):
        decrypt(dek, header + b"".join(swapped))
    dropped = [chunks[0], *chunks[2:]]
    with pytest.raises(IntegrityError):
        decrypt(dek, header + b"".join(dropped))
    # the same plaintext under the same DEK and binding, but another file: another salt
    other_header, other_chunks = chunks_of(encrypt(dek, data))
    with pytest.raises(IntegrityError):
        decrypt(dek, header + b"".join([other_chunks[0], *chunks[1:]]))
    with pytest.raises(IntegrityError):
        decrypt(dek, other_header + b"".join(chunks))


def test_any_bit_flip_in_the_header_is_detected() -> None:
    dek = _dek()
    blob = encrypt(dek, os.urandom(70 * KiB))
    for byte in range(stream.HEADER_SIZE):
        for bit in (0, 7):
            tampered = bytearray(blob)
            tampered[byte] ^= 1 << bit
            with pytest.raises(IntegrityError):
                decrypt(dek, bytes(tampered))


def test_bit_flips_in_chunks_are_detected_before_their_plaintext_is_yielded() -> None:
    dek = _dek()
    data = os.urandom(5 * 1024 * KiB)
    blob = encrypt(dek, data)
    for offset in (stream.HEADER_SIZE, stream.HEADER_SIZE + 70_000, len(blob) // 2, len(blob) - 1):
        tampered = bytearray(blob)
        tampered[offset] ^= 0x01

        async def run(tampered: bytes = bytes(tampered)) -> bytes:
            async def key_for(_dek_id: int) -> AesGcm | Sm4Gcm:
                return dek

            got = bytearray()
            with pytest.raises(IntegrityError):
                async for piece in stream.decrypt_stream(_pieces(tampered, 256 * KiB), BINDING, key_for):
                    got += piece
            return bytes(got)

        got = asyncio.run(run())
        bad_chunk = (offset - stream.HEADER_SIZE) // stream.SEALED_CHUNK
        assert len(got) <= bad_chunk * stream.CHUNK  # nothing from the bad chunk or after it
        assert got == data[:len(got)]


def test_wrong_binding_and_wrong_key_are_detected() -> None:
    dek = _dek()
    blob = encrypt(dek, b"hello media", binding=b"media|one")
    assert decrypt(dek, blob, binding=b"media|one") == b"hello media"
    with pytest.raises(IntegrityError):
        decrypt(dek, blob, binding=b"media|two")
    with pytest.raises(IntegrityError):
        decrypt(dek, blob, binding=b"media|one|thumb|32x32|crop")
    with pytest.raises(IntegrityError):
        decrypt(_dek(), blob, binding=b"media|one")


@pytest.mark.skipif(len(SUITES) < 2, reason="SM4-GCM is not available in this OpenSSL")
def test_suite_mismatch_is_detected() -> None:
    aes, sm4 = _dek(AesGcm), _dek(Sm4Gcm)
    blob = encrypt(sm4, b"x" * 1000)
    assert blob[3] == Sm4Gcm.suite_id
    with pytest.raises(IntegrityError):
        decrypt(aes, blob)


def test_open_stream_passes_legacy_plaintext_through_unless_encryption_is_required() -> None:
    dek = _dek()

    async def key_for(_dek_id: int) -> AesGcm | Sm4Gcm:
        return dek

    def read(blob: bytes, required: bool, piece: int = 1) -> bytes:
        return asyncio.run(_collect(stream.open_stream(_pieces(blob, piece), BINDING, key_for, required=required)))

    assert read(b"plain old file", required=False) == b"plain old file"
    assert read(b"", required=False) == b""
    assert read(encrypt(dek, b"sealed"), required=False) == b"sealed"
    assert read(encrypt(dek, b"sealed"), required=True, piece=3) == b"sealed"
    with pytest.raises(IntegrityError):
        read(b"plain old file", required=True)
    tampered = bytearray(encrypt(dek, b"sealed"))
    tampered[0] ^= 0x40  # the magic no longer says "encrypted": a downgrade, caught when required
    with pytest.raises(IntegrityError):
        read(bytes(tampered), required=True)


def test_content_mac_is_keyed() -> None:
    dek = _dek()
    one, two = stream.content_mac(dek), stream.content_mac(dek)
    one.update(b"abc")
    two.update(b"abc")
    other = stream.content_mac(_dek())
    other.update(b"abc")
    assert one.hexdigest() == two.hexdigest() != other.hexdigest()


def test_tap_sees_every_plaintext_byte_in_order() -> None:
    """The upload path counts and digests the plaintext through the tap (batches then go to a thread)."""
    import hashlib

    dek = _dek()
    data = os.urandom(3 * 1024 * KiB + 77)
    seen = hashlib.sha256()
    count = 0

    def tap(part: memoryview) -> None:
        nonlocal count
        seen.update(part)
        count += len(part)

    blob = asyncio.run(_collect(stream.encrypt_stream(_pieces(data, 100_000), dek, DEK_ID, BINDING, tap=tap)))
    assert count == len(data) and seen.digest() == hashlib.sha256(data).digest()
    assert decrypt(dek, blob) == data
