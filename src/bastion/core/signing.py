"""The server's Ed25519 signing key (signs every event it creates).

Stored in the same one-line format Synapse uses (``ed25519 <version> <base64 seed>``)
so operators recognise it and tools that read Synapse keys read ours. The primitive
comes from ``cryptography`` (OpenSSL), not a hand-written implementation.
"""

from __future__ import annotations

import os
import secrets
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from bastion.core.ids import decode_unpadded_b64, unpadded_b64


@dataclass(frozen=True)
class SigningKey:
    version: str
    private_key: Ed25519PrivateKey

    @property
    def key_id(self) -> str:
        return f"ed25519:{self.version}"

    def sign(self, payload: bytes) -> bytes:
        return self.private_key.sign(payload)

    @property
    def public_key(self) -> Ed25519PublicKey:
        return self.private_key.public_key()

    def public_key_b64(self) -> str:
        return unpadded_b64(self.public_key.public_bytes(Encoding.Raw, PublicFormat.Raw))

    @classmethod
    def generate(cls) -> SigningKey:
        version = "a_" + "".join(secrets.choice("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ") for _ in range(4))
        return cls(version, Ed25519PrivateKey.generate())

    def serialise(self) -> str:
        from cryptography.hazmat.primitives.serialization import NoEncryption, PrivateFormat

        seed = self.private_key.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())
        return f"ed25519 {self.version} {unpadded_b64(seed)}\n"

    @classmethod
    def parse(cls, text: str) -> SigningKey:
        parts = text.strip().split()
        if len(parts) != 3 or parts[0] != "ed25519":
            raise ValueError("expected 'ed25519 <version> <base64 seed>'")
        seed = decode_unpadded_b64(parts[2])
        if len(seed) != 32:
            raise ValueError("the Ed25519 seed must be 32 bytes")
        return cls(parts[1], Ed25519PrivateKey.from_private_bytes(seed))

    def write(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(self.serialise())

    @classmethod
    def load(cls, path: Path) -> SigningKey:
        return cls.parse(path.read_text())
