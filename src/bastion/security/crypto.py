"""Envelope encryption: AEAD ciphers, the KEK providers, and the encrypted-blob format.

Key hierarchy::

    KEK (key-encryption key)  -- from a key provider; never stored in the database
     └── DEK (data-encryption key), one per room and one per user, versioned
          └── ciphertext of every sensitive field, bound to its row

A blob encrypted under a DEK is::

    b"\\xbaE" | format (1) | suite (1) | DEK id (8, big-endian) | nonce (12) | ciphertext+tag

and its AEAD associated data is ``b"bastion/1|" + DEK id + b"|" + row binding``, where
the row binding names the table, the row and the field (for example
``event|$id|json``): a ciphertext copied into another row or field fails to decrypt.

Ciphers come from ``cryptography`` (OpenSSL): AES-256-GCM by default; SM4-GCM (the
Chinese national standard, for deployments under MLPS 2.0) where OpenSSL offers it.
Nonces are 96 random bits; with one DEK per room/user and rotation, the number of
messages under one key stays far below the 2^32 bound random nonces allow.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import secrets
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from bastion.errors import ConfigError

MAGIC = b"\xbaE"
FORMAT = 1
NONCE = 12
TAG = 16
HEADER = len(MAGIC) + 2 + 8 + NONCE
TEXT_PREFIX = "enc:1:"


class IntegrityError(Exception):
    """Stored ciphertext failed authentication (tampered, moved, or the wrong key)."""


# -- AEAD suites --------------------------------------------------------------------------------


class Aead(Protocol):
    key_size: int
    suite_id: int

    def encrypt(self, nonce: bytes, data: bytes, ad: bytes) -> bytes: ...

    def decrypt(self, nonce: bytes, data: bytes, ad: bytes) -> bytes: ...


class AesGcm:
    key_size = 32
    suite_id = 1
    name = "aes-256-gcm"

    def __init__(self, key: bytes) -> None:
        self.key = key
        self._aead = AESGCM(key)

    def encrypt(self, nonce: bytes, data: bytes, ad: bytes) -> bytes:
        return self._aead.encrypt(nonce, data, ad)

    def decrypt(self, nonce: bytes, data: bytes, ad: bytes) -> bytes:
        try:
            return self._aead.decrypt(nonce, data, ad)
        except InvalidTag:
            raise IntegrityError("ciphertext failed authentication") from None


class Sm4Gcm:
    key_size = 16
    suite_id = 2
    name = "sm4-gcm"

    def __init__(self, key: bytes) -> None:
        self.key = key

    def encrypt(self, nonce: bytes, data: bytes, ad: bytes) -> bytes:
        enc = Cipher(algorithms.SM4(self.key), modes.GCM(nonce)).encryptor()
        enc.authenticate_additional_data(ad)
        return enc.update(data) + enc.finalize() + enc.tag

    def decrypt(self, nonce: bytes, data: bytes, ad: bytes) -> bytes:
        if len(data) < TAG:
            raise IntegrityError("ciphertext too short")
        dec = Cipher(algorithms.SM4(self.key), modes.GCM(nonce, data[-TAG:])).decryptor()
        dec.authenticate_additional_data(ad)
        try:
            return dec.update(data[:-TAG]) + dec.finalize()
        except InvalidTag:
            raise IntegrityError("ciphertext failed authentication") from None


SUITES: dict[str, type[AesGcm] | type[Sm4Gcm]] = {"aes-256-gcm": AesGcm, "sm4-gcm": Sm4Gcm}
SUITES_BY_ID = {cls.suite_id: cls for cls in SUITES.values()}


def suite_available(name: str) -> bool:
    try:
        cls = SUITES[name]
        cls(os.urandom(cls.key_size)).encrypt(os.urandom(NONCE), b"probe", b"")
        return True
    except Exception:
        return False


def make_aead(suite_id: int, key: bytes) -> AesGcm | Sm4Gcm:
    return SUITES_BY_ID[suite_id](key)


# -- blobs ------------------------------------------------------------------------------------------


def is_encrypted(blob: bytes) -> bool:
    return blob[:2] == MAGIC


def seal(aead: AesGcm | Sm4Gcm, dek_id: int, binding: bytes, plaintext: bytes) -> bytes:
    nonce = secrets.token_bytes(NONCE)
    id_bytes = dek_id.to_bytes(8, "big")
    header = MAGIC + bytes((FORMAT, aead.suite_id)) + id_bytes + nonce
    return header + aead.encrypt(nonce, plaintext, b"bastion/1|" + id_bytes + b"|" + binding)


def parse_header(blob: bytes) -> tuple[int, int, bytes, bytes]:
    """(suite id, DEK id, nonce, ciphertext) of a sealed blob."""
    if len(blob) < HEADER + TAG or blob[:2] != MAGIC or blob[2] != FORMAT:
        raise IntegrityError("not a Bastion ciphertext")
    return blob[3], int.from_bytes(blob[4:12], "big"), blob[12:24], blob[24:]


def open_blob(aead: AesGcm | Sm4Gcm, dek_id: int, binding: bytes, nonce: bytes, ciphertext: bytes) -> bytes:
    return aead.decrypt(nonce, ciphertext, b"bastion/1|" + dek_id.to_bytes(8, "big") + b"|" + binding)


# -- KEKs and providers -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Kek:
    key_id: str
    key: bytes

    def wrap(self, dek: bytes, binding: bytes) -> bytes:
        nonce = secrets.token_bytes(NONCE)
        return nonce + AESGCM(self.key).encrypt(nonce, dek, b"bastion-dek/1|" + binding)

    def unwrap(self, wrapped: bytes, binding: bytes) -> bytes:
        try:
            return AESGCM(self.key).decrypt(wrapped[:NONCE], wrapped[NONCE:], b"bastion-dek/1|" + binding)
        except InvalidTag:
            raise IntegrityError("a data key could not be unwrapped with the key-encryption key") from None


def kek_id(key: bytes) -> str:
    return hashlib.sha256(b"bastion-kek-id|" + key).hexdigest()[:16]


def new_kek() -> Kek:
    key = secrets.token_bytes(32)
    return Kek(kek_id(key), key)


@dataclass(frozen=True)
class KeySet:
    """All KEKs a provider offers: the primary wraps new DEKs; the others only unwrap."""

    primary: Kek
    others: tuple[Kek, ...] = ()

    def by_id(self, key_id: str) -> Kek | None:
        for kek in (self.primary, *self.others):
            if kek.key_id == key_id:
                return kek
        return None


def _parse_keyset(text: str, where: str) -> KeySet:
    try:
        data = json.loads(text)
        keys = data["keys"]
        primary_id = data["primary"]
        keks = {}
        for entry in keys:
            raw = base64.b64decode(entry["key"], validate=True)
            if len(raw) != 32:
                raise ValueError("keys are 32 bytes")
            keks[kek_id(raw)] = Kek(kek_id(raw), raw)
        primary = keks.pop(primary_id)
    except (ValueError, KeyError, TypeError) as exc:
        raise ConfigError(f"{where}: not a valid Bastion key set ({exc.__class__.__name__}: {exc})") from None
    return KeySet(primary, tuple(keks.values()))


def serialise_keyset(keys: KeySet) -> str:
    return json.dumps(
        {
            "format": "bastion-kek/1",
            "primary": keys.primary.key_id,
            "keys": [{"id": k.key_id, "key": base64.b64encode(k.key).decode()} for k in (keys.primary, *keys.others)],
        },
        indent=2,
    ) + "\n"


class KeyProvider(Protocol):
    def load(self) -> KeySet: ...

    def changed(self) -> bool:
        """Whether the key set may differ from the last ``load`` (cheap to ask)."""

    def can_store(self) -> bool: ...

    def store(self, keys: KeySet) -> None: ...


class FileKeyProvider:
    """A JSON key set in a file readable only by Bastion's user (mode 0600)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._stamp: tuple[int, int, int] | None = None

    def _current_stamp(self) -> tuple[int, int, int] | None:
        try:
            st = self.path.stat()
        except OSError:
            return None
        return (st.st_mtime_ns, st.st_size, st.st_ino)

    def changed(self) -> bool:
        return self._current_stamp() != self._stamp

    def load(self) -> KeySet:
        try:
            self._stamp = self._current_stamp()
            mode = self.path.stat().st_mode & 0o777
            text = self.path.read_text()
        except FileNotFoundError:
            raise ConfigError(f"config key 'encryption.key_file': {self.path} does not exist") from None
        except OSError as exc:
            raise ConfigError(f"config key 'encryption.key_file': cannot read {self.path}: {exc.strerror}") from None
        if mode & 0o077:
            raise ConfigError(
                f"config key 'encryption.key_file': {self.path} is readable by other users (mode {oct(mode)}); chmod 600 it"
            )
        return _parse_keyset(text, str(self.path))

    def can_store(self) -> bool:
        return True

    def store(self, keys: KeySet) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(self.path.suffix + ".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(serialise_keyset(keys))
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, self.path)


class EnvKeyProvider:
    """KEKs from environment variables: ``NAME`` (primary) and ``NAME_PREVIOUS`` (comma-separated)."""

    def __init__(self, name: str) -> None:
        self.name = name

    def _decode(self, value: str, var: str) -> Kek:
        try:
            raw = base64.b64decode(value.strip(), validate=True)
        except ValueError:
            raise ConfigError(f"environment variable {var} is not Base64") from None
        if len(raw) != 32:
            raise ConfigError(f"environment variable {var} must hold 32 bytes (Base64)")
        return Kek(kek_id(raw), raw)

    def load(self) -> KeySet:
        value = os.environ.get(self.name)
        if not value:
            raise ConfigError(f"config key 'encryption.key_env': environment variable {self.name} is not set")
        previous = [
            self._decode(v, f"{self.name}_PREVIOUS") for v in os.environ.get(f"{self.name}_PREVIOUS", "").split(",") if v.strip()
        ]
        return KeySet(self._decode(value, self.name), tuple(previous))

    def changed(self) -> bool:
        return False

    def can_store(self) -> bool:
        return False

    def store(self, keys: KeySet) -> None:  # pragma: no cover - guarded by can_store
        raise ConfigError("keys from the environment cannot be changed by Bastion")


class CommandKeyProvider:
    """An external KMS: a command that prints the key set (JSON, as in the key file)."""

    def __init__(self, argv: list[str]) -> None:
        self.argv = argv

    def load(self) -> KeySet:
        try:
            result = subprocess.run(self.argv, capture_output=True, text=True, timeout=30, check=False)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise ConfigError(f"config key 'encryption.key_command': {exc}") from None
        if result.returncode != 0:
            raise ConfigError(f"config key 'encryption.key_command': exited with {result.returncode}: {result.stderr[-200:]}")
        return _parse_keyset(result.stdout, "encryption.key_command")

    def changed(self) -> bool:
        return False

    def can_store(self) -> bool:
        return False

    def store(self, keys: KeySet) -> None:  # pragma: no cover - guarded by can_store
        raise ConfigError("keys from a command cannot be changed by Bastion")


def text_seal(blob: bytes) -> str:
    return TEXT_PREFIX + base64.urlsafe_b64encode(blob).decode()


def text_unseal(text: str) -> bytes | None:
    if not text.startswith(TEXT_PREFIX):
        return None
    return base64.urlsafe_b64decode(text[len(TEXT_PREFIX):])
