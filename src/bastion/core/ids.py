"""Matrix identifiers: grammar checks, parsing and generation (spec appendix "Identifier Grammar").

Validation here is strict for identifiers Bastion mints and for anything used as a
key in authorisation (power-level user IDs, membership targets); it follows the
"historical" user-ID grammar for IDs that may come from other servers' users.
"""

from __future__ import annotations

import base64
import re
import secrets
import string
from typing import TypeGuard

MAX_ID_LENGTH = 255
MAX_DEVICE_ID_LENGTH = 255  # characters, as login accepts them

# Localparts Bastion creates: the spec's current grammar.
_LOCALPART_RE = re.compile(r"^[a-z0-9._=\-/+]+$")
# User IDs accepted from elsewhere: historical grammar (printable ASCII except ':').
_HISTORICAL_LOCALPART_RE = re.compile(r"^[\x21-\x39\x3b-\x7e]+$")
# server_name = hostname [ ":" port ]; hostname = IPv4 / "[" IPv6 "]" / DNS name
_SERVER_NAME_RE = re.compile(
    r"^(?:\[[0-9A-Fa-f:.]{2,45}\]|[A-Za-z0-9\-.]{1,255})(?::[0-9]{1,5})?$"
)
_OPAQUE_RE = re.compile(r"^[0-9A-Za-z._~\-]+$")


def unpadded_b64(data: bytes) -> str:
    """Standard unpadded Base64 (spec appendix)."""
    return base64.b64encode(data).rstrip(b"=").decode("ascii")


def urlsafe_unpadded_b64(data: bytes) -> str:
    """URL-safe unpadded Base64, used for event IDs in room versions 4+."""
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def decode_unpadded_b64(text: str) -> bytes:
    """Decode standard or URL-safe Base64 with or without padding."""
    text = text.replace("-", "+").replace("_", "/")
    return base64.b64decode(text + "=" * (-len(text) % 4), validate=True)


def is_valid_server_name(name: str) -> bool:
    if not _SERVER_NAME_RE.match(name):
        return False
    if ":" in name and not name.startswith("["):
        port = name.rsplit(":", 1)[1]
        return 0 < int(port) < 65536
    return True


def split_id(identifier: str, sigil: str) -> tuple[str, str] | None:
    """Split ``<sigil>localpart:server`` into (localpart, server), or None if malformed."""
    if not identifier or identifier[0] != sigil or ":" not in identifier or "\x00" in identifier:
        return None
    local, _, server = identifier[1:].partition(":")
    if not local or not server or not is_valid_server_name(server):
        return None
    return local, server


def is_valid_user_id(user_id: object) -> bool:
    if not isinstance(user_id, str) or len(user_id.encode()) > MAX_ID_LENGTH:
        return False
    parts = split_id(user_id, "@")
    return parts is not None and bool(_HISTORICAL_LOCALPART_RE.match(parts[0]))


def is_valid_localpart(localpart: str) -> bool:
    """Whether ``localpart`` may be used for a new account on this server."""
    return bool(_LOCALPART_RE.match(localpart))


def is_valid_room_id(room_id: object) -> bool:
    if not isinstance(room_id, str) or len(room_id.encode()) > MAX_ID_LENGTH:
        return False
    return split_id(room_id, "!") is not None


def is_valid_room_alias(alias: object) -> bool:
    if not isinstance(alias, str) or len(alias.encode()) > MAX_ID_LENGTH:
        return False
    parts = split_id(alias, "#")
    return parts is not None and all(c not in parts[0] for c in ("\x00", ":"))


def is_valid_event_id(event_id: object) -> TypeGuard[str]:
    return (
        isinstance(event_id, str)
        and 1 < len(event_id.encode()) <= MAX_ID_LENGTH
        and event_id[0] == "$"
        and "\x00" not in event_id
    )


def is_valid_opaque_id(value: str, max_length: int = 255) -> bool:
    """Opaque identifier grammar ([0-9A-Za-z._~-], 1..max_length chars)."""
    return 0 < len(value) <= max_length and bool(_OPAQUE_RE.match(value))


def parse_digits(text: str, max_digits: int = 18) -> int | None:
    """The number ``text`` writes in ASCII digits (at most ``max_digits``), else None.

    For the numbers inside opaque tokens. ``str.isdigit()`` alone is not enough: it
    accepts digits ``int()`` refuses ("²"), and ``int()`` refuses more than 4,300 digits.
    """
    if not text or len(text) > max_digits or not text.isascii() or not text.isdigit():
        return None
    return int(text)


def server_of(identifier: str) -> str:
    """The server-name part of a sigil-prefixed identifier."""
    return identifier.split(":", 1)[1]


def localpart_of(identifier: str) -> str:
    return identifier[1:].split(":", 1)[0]


_ALPHABET = string.ascii_letters


def random_string(length: int, alphabet: str = _ALPHABET) -> str:
    return "".join(secrets.choice(alphabet) for _ in range(length))


def generate_room_id(server_name: str) -> str:
    return f"!{random_string(18)}:{server_name}"


def generate_device_id() -> str:
    return random_string(10, string.ascii_uppercase)
