"""Access tokens: 256 random bits, handed to the client once, stored only as SHA-256.

A database dump therefore holds no usable token. SHA-256 (not a slow hash) is
right here: the token has full entropy, so it cannot be guessed offline, and the
lookup must be fast because every request does it.
"""

from __future__ import annotations

import hashlib
import secrets

TOKEN_PREFIX = "bst_"


def generate_access_token() -> str:
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


def hash_token(token: str) -> bytes:
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).digest()


def generate_secret(nbytes: int = 32) -> str:
    return secrets.token_urlsafe(nbytes)
