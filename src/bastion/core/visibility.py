"""Who may see which room event (spec: "Room History Visibility", server behaviour).

The rules depend on the room state *at the event*: the ``m.room.history_visibility``
setting and the user's membership. Callers pass the two as sorted change lists —
``[(stream_ordering, value), ...]`` — so a batch of events is checked with two
binary searches each and no database access.

Rules, for an event at stream position ``e``:

1. visibility ``world_readable`` → allow;
2. the user's membership was ``join`` → allow;
3. visibility ``shared`` and the user joined at any point after the event → allow;
4. membership ``invite`` and visibility ``invited`` → allow;
5. otherwise deny.

A ``m.room.history_visibility`` event is visible if the setting before *or* after
it allows; the user's own ``m.room.member`` events likewise use the membership
before or after.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Sequence

from bastion.core.events import Event

Changes = Sequence[tuple[int, str]]

DEFAULT_VISIBILITY = "shared"
KNOWN_VISIBILITIES = frozenset({"world_readable", "shared", "invited", "joined"})


def _value_before(changes: Changes, position: int, default: str) -> str:
    idx = bisect_left(changes, (position, "")) - 1
    return changes[idx][1] if idx >= 0 else default


def _joined_after(memberships: Changes, position: int) -> bool:
    idx = bisect_left(memberships, (position + 1, ""))
    return any(m == "join" for _, m in memberships[idx:])


def _allowed(visibility: str, membership: str, joined_later: bool) -> bool:
    if visibility == "world_readable":
        return True
    if membership == "join":
        return True
    if visibility == "shared" and joined_later:
        return True
    return visibility == "invited" and membership == "invite"


def normalise_visibility(value: object) -> str:
    return value if isinstance(value, str) and value in KNOWN_VISIBILITIES else DEFAULT_VISIBILITY


def is_visible(event: Event, user_id: str, memberships: Changes, visibilities: Changes) -> bool:
    pos = event.stream_ordering
    vis_before = _value_before(visibilities, pos, DEFAULT_VISIBILITY)
    mem_before = _value_before(memberships, pos, "leave")
    joined_later = _joined_after(memberships, pos)
    if _allowed(vis_before, mem_before, joined_later):
        return True
    if event.type == "m.room.history_visibility" and event.state_key == "":
        vis_after = normalise_visibility(event.content.get("history_visibility"))
        if _allowed(vis_after, mem_before, joined_later):
            return True
    if event.type == "m.room.member" and event.state_key == user_id:
        mem_after = event.membership or "leave"
        if _allowed(vis_before, mem_after, joined_later):
            return True
    return False


def visible_at(position: int, memberships: Changes, visibilities: Changes) -> bool:
    """Visibility of a non-state event at ``position`` (no special cases apply)."""
    return _allowed(
        _value_before(visibilities, position, DEFAULT_VISIBILITY),
        _value_before(memberships, position, "leave"),
        _joined_after(memberships, position),
    )


def filter_visible(events: Sequence[Event], user_id: str, memberships: Changes, visibilities: Changes) -> list[Event]:
    return [e for e in events if is_visible(e, user_id, memberships, visibilities)]


def visible_ranges(memberships: Changes, visibilities: Changes) -> list[tuple[int, int | None]]:
    """The stream ranges ``(after, before)`` — ``after < position < before``, ``None``
    for no upper bound — holding every non-state event the user may see, merged.

    What decides an event's visibility (the setting and the membership before it,
    whether the user joins later) changes only at the user's own membership events
    and at visibility changes, so it is constant between two such positions. Those
    positions are state events: an event that is neither never sits on one. For
    queries that must not count what the user cannot see (search)."""
    points = sorted({p for p, _ in memberships} | {p for p, _ in visibilities})
    bounds: list[tuple[int, int | None]] = list(zip([-1, *points], [*points, None], strict=True))
    out: list[tuple[int, int | None]] = []
    for lo, hi in bounds:
        if hi is not None and hi - lo < 2:
            continue  # no position strictly between
        if not visible_at(lo + 1, memberships, visibilities):
            continue
        if out and out[-1][1] == lo:  # only a state event between: one range
            out[-1] = (out[-1][0], hi)
        else:
            out.append((lo, hi))
    return out
