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

from dataclasses import dataclass, replace

from bastion.core.ids import parse_digits
from bastion.errors import InvalidParam

_MAX = 2**62
_MAX_DIGITS = len(str(_MAX))


@dataclass(frozen=True, slots=True)
class StreamToken:
    events: int = 0
    account_data: int = 0
    receipts: int = 0
    typing: int = 0
    presence: int = 0
    to_device: int = 0
    device_lists: int = 0

    def _values(self) -> tuple[int, ...]:
        return (
            self.events, self.account_data, self.receipts, self.typing,
            self.presence, self.to_device, self.device_lists,
        )

    def encode(self) -> str:
        return "s" + "_".join(map(str, self._values()))

    @classmethod
    def decode(cls, text: str, what: str = "since") -> StreamToken:
        if not text.startswith("s") or len(text) > 200:
            raise InvalidParam(f"'{what}' is not a valid sync token")
        parts = text[1:].split("_")
        values = [parse_digits(p, _MAX_DIGITS) for p in parts] if len(parts) <= len(_NAMES) else [None]
        if any(v is None or v > _MAX for v in values):
            raise InvalidParam(f"'{what}' is not a valid sync token")
        return cls(*values)

    def is_after(self, other: StreamToken) -> bool:
        """True if any stream in ``self`` is ahead of ``other``."""
        return any(a > b for a, b in zip(self._values(), other._values(), strict=True))

    def max(self, other: StreamToken) -> StreamToken:
        return StreamToken(*(max(a, b) for a, b in zip(self._values(), other._values(), strict=True)))

    def min(self, other: StreamToken) -> StreamToken:
        return StreamToken(*(min(a, b) for a, b in zip(self._values(), other._values(), strict=True)))

    def with_events(self, position: int) -> StreamToken:
        return replace(self, events=position)


def durable_positions(token: StreamToken) -> dict[str, int]:
    """The positions of the streams kept in the database (allocated in order across workers)."""
    return {
        "events": token.events, "account_data": token.account_data, "receipts": token.receipts,
        "to_device": token.to_device, "device_lists": token.device_lists,
    }


_NAMES = ("events", "account_data", "receipts", "typing", "presence", "to_device", "device_lists")


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
