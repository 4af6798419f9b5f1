"""Sync and pagination tokens.

A sync token is a tuple of stream positions, one per stream a client can sync,
written ``s<events>_<account_data>_<receipts>_<typing>_<presence>_<to_device>_<device_lists>``.
Streams added later append a field; tokens from an older server parse with the
missing fields as 0. Typing and presence positions live in memory only: after a
restart they start again from 0, and a client's larger position is clamped to the
server's current one (see ``SyncService.sync``), so nothing is skipped. Pagination tokens for ``/messages`` name one position in the event
stream, ``t<stream_ordering>``; ``/messages`` also accepts sync tokens (their events
field), as the spec requires for ``prev_batch``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace

from bastion.core.ids import parse_digits
from bastion.errors import InvalidParam

_MAX = 2**62
_MAX_DIGITS = len(str(_MAX))
_TOKEN_RE = re.compile(rf"s[0-9]{{1,{_MAX_DIGITS}}}(?:_[0-9]{{1,{_MAX_DIGITS}}}){{0,6}}", re.ASCII)


@dataclass(frozen=True, slots=True)
class StreamToken:
    events: int = 0
    account_data: int = 0
    receipts: int = 0
    typing: int = 0
    presence: int = 0
    to_device: int = 0
    device_lists: int = 0

    def encode(self) -> str:
        return (
            f"s{self.events}_{self.account_data}_{self.receipts}_{self.typing}_"
            f"{self.presence}_{self.to_device}_{self.device_lists}"
        )

    @classmethod
    def decode(cls, text: str, what: str = "since") -> StreamToken:
        # One regular expression checks the whole grammar (ASCII digits, at most
        # _MAX_DIGITS each, one to seven fields); int() then cannot fail.
        match = _TOKEN_RE.fullmatch(text) if len(text) <= 200 else None
        if match is None:
            raise InvalidParam(f"'{what}' is not a valid sync token")
        values = [int(p) for p in text[1:].split("_")]
        if any(v > _MAX for v in values):
            raise InvalidParam(f"'{what}' is not a valid sync token")
        return cls(*values)

    # These run on every /sync and every notification: written out field by field
    # (a generator over zipped tuples costs several times as much).

    def is_after(self, other: StreamToken) -> bool:
        """True if any stream in ``self`` is ahead of ``other``."""
        return (
            self.events > other.events or self.account_data > other.account_data
            or self.receipts > other.receipts or self.typing > other.typing
            or self.presence > other.presence or self.to_device > other.to_device
            or self.device_lists > other.device_lists
        )

    def max(self, other: StreamToken) -> StreamToken:
        if not other.is_after(self):
            return self
        if not self.is_after(other):
            return other
        return StreamToken(
            max(self.events, other.events), max(self.account_data, other.account_data),
            max(self.receipts, other.receipts), max(self.typing, other.typing),
            max(self.presence, other.presence), max(self.to_device, other.to_device),
            max(self.device_lists, other.device_lists),
        )

    def min(self, other: StreamToken) -> StreamToken:
        if not self.is_after(other):
            return self
        if not other.is_after(self):
            return other
        return StreamToken(
            min(self.events, other.events), min(self.account_data, other.account_data),
            min(self.receipts, other.receipts), min(self.typing, other.typing),
            min(self.presence, other.presence), min(self.to_device, other.to_device),
            min(self.device_lists, other.device_lists),
        )

    def with_events(self, position: int) -> StreamToken:
        return replace(self, events=position)


def durable_positions(token: StreamToken) -> dict[str, int]:
    """The positions of the streams kept in the database (allocated in order across workers)."""
    return {
        "events": token.events, "account_data": token.account_data, "receipts": token.receipts,
        "to_device": token.to_device, "device_lists": token.device_lists,
    }


def encode_pagination(position: int) -> str:
    return f"t{position}"


def decode_pagination(text: str, what: str = "from") -> int:
    """A position in the event stream from a ``t<n>`` token or a sync token."""
    position = parse_digits(text[1:], max_digits=23) if text.startswith("t") else None
    if position is not None:
        return position
    if text.startswith("s"):
        return StreamToken.decode(text, what).events
    raise InvalidParam(f"'{what}' is not a valid pagination token")
