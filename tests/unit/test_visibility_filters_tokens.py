"""History visibility, filters and tokens — pure logic."""

from __future__ import annotations

from itertools import pairwise

import pytest
from hypothesis import given
from hypothesis import strategies as st

from bastion.core.events import Event
from bastion.core.filters import EventFilter, Filter, apply_event_fields
from bastion.core.room_versions import V10
from bastion.core.visibility import is_visible, visible_at, visible_ranges
from bastion.errors import BadJson, InvalidParam
from bastion.services.caches import RECENT_EVENTS_PER_ROOM, RoomSnapshot
from bastion.streams.tokens import StreamToken, decode_pagination, encode_pagination

U = "@u:x"


def ev(pos: int, etype: str = "m.room.message", sender: str = "@a:x", state_key: str | None = None, content=None) -> Event:
    pdu = {
        "room_id": "!r:x", "type": etype, "sender": sender, "content": content or {},
        "origin_server_ts": 0, "depth": pos, "prev_events": [], "auth_events": [],
    }
    if state_key is not None:
        pdu["state_key"] = state_key
    return Event(pdu, f"$e{pos}", V10, stream_ordering=pos)


@pytest.mark.parametrize(
    ("visibility", "memberships", "position", "expected"),
    [
        # joined at 10, event at 20: visible under every setting
        ("joined", [(10, "join")], 20, True),
        # event before the join: only shared/world_readable
        ("joined", [(10, "join")], 5, False),
        ("shared", [(10, "join")], 5, True),
        ("invited", [(10, "join")], 5, False),
        ("world_readable", [], 5, True),
        # invited at 3, joined at 10: 'invited' shows events from the invite on
        ("invited", [(3, "invite"), (10, "join")], 5, True),
        ("invited", [(3, "invite"), (10, "join")], 2, False),
        # left at 30: nothing after that, even with 'shared'
        ("shared", [(10, "join"), (30, "leave")], 40, False),
        ("shared", [(10, "join"), (30, "leave")], 20, True),
        # left and came back: the gap is visible under 'shared' (joined after it)
        ("shared", [(10, "join"), (30, "leave"), (50, "join")], 40, True),
        ("joined", [(10, "join"), (30, "leave"), (50, "join")], 40, False),
        # never joined
        ("shared", [], 5, False),
    ],
)
def test_history_visibility_rules(visibility: str, memberships, position: int, expected: bool) -> None:
    assert is_visible(ev(position), U, memberships, [(1, visibility)]) is expected


def test_own_membership_events_and_visibility_changes() -> None:
    leave = ev(30, "m.room.member", U, U, {"membership": "leave"})
    assert is_visible(leave, U, [(10, "join"), (30, "leave")], [(1, "joined")])
    change = ev(40, "m.room.history_visibility", "@a:x", "", {"history_visibility": "world_readable"})
    assert is_visible(change, U, [], [(1, "joined"), (40, "world_readable")])


def test_filter_parsing_and_matching() -> None:
    flt = Filter.parse({
        "room": {
            "rooms": ["!a:x"],
            "timeline": {"limit": 5, "types": ["m.room.*"], "not_senders": ["@spam:x"], "contains_url": False},
            "state": {"lazy_load_members": True},
        },
        "event_fields": ["content.body", "type"],
    })
    assert flt.room.allows_room("!a:x") and not flt.room.allows_room("!b:x")
    timeline = flt.room.timeline
    assert timeline.limit == 5 and flt.room.state.lazy_load_members
    assert timeline.allows("m.room.message", "@a:x")
    assert not timeline.allows("m.reaction", "@a:x")
    assert not timeline.allows("m.room.message", "@spam:x")
    assert not timeline.allows("m.room.message", "@a:x", content={"url": "mxc://x/y"})
    assert apply_event_fields({"type": "t", "content": {"body": "b", "x": 1}, "sender": "s"}, flt.event_fields) == {
        "type": "t", "content": {"body": "b"}}
    assert EventFilter.parse({"not_types": ["*"]}, "f").allows_type("anything") is False
    for bad in ({"room": {"timeline": {"limit": 0}}}, {"room": {"timeline": {"types": "m.room.message"}}},
                {"event_format": "xml"}, {"room": []}, {"room": {"state": {"lazy_load_members": "yes"}}}):
        with pytest.raises(BadJson):
            Filter.parse(bad)


def test_tokens_round_trip_and_reject_garbage() -> None:
    token = StreamToken(events=42, account_data=7)
    assert StreamToken.decode(token.encode()) == token
    assert StreamToken.decode("s42") == StreamToken(events=42)
    assert token.is_after(StreamToken(events=42, account_data=6))
    assert not token.is_after(token)
    assert decode_pagination(encode_pagination(9)) == 9
    assert decode_pagination("s12_3") == 12
    for bad in ("", "x1", "s", "s-1", "s1_2_3_4_5_6_7_8_9", "t", "t1a", "s" + "9" * 30, "s1__2",
                "s\u00b2", "s1_\u0663", "t\u00b2", "s 1", "s+1",  # digits int() refuses; signs, spaces
                "s1_2_3_4_5_6_7_8", "s1\n", "s4611686018427387905"):  # 8 fields; trailing newline; > 2**62
        with pytest.raises(InvalidParam):
            decode_pagination(bad) if bad.startswith("t") else StreamToken.decode(bad)
    assert StreamToken.decode("s1_2_3_4_5_6_7") == StreamToken(1, 2, 3, 4, 5, 6, 7)


def test_token_max_and_min_are_per_stream() -> None:
    a = StreamToken(events=5, account_data=1, to_device=9)
    b = StreamToken(events=3, account_data=4, device_lists=2)
    assert a.max(b) == b.max(a) == StreamToken(events=5, account_data=4, to_device=9, device_lists=2)
    assert a.min(b) == b.min(a) == StreamToken(events=3, account_data=1)
    older = StreamToken(events=4, account_data=1)
    assert a.max(older) == a and older.max(a) == a
    assert a.min(older) == older and older.min(a) == older
    assert a.max(a) == a.min(a) == a


@given(
    positions=st.lists(st.integers(1, 200), max_size=RECENT_EVENTS_PER_ROOM + 10, unique=True).map(sorted),
    after=st.integers(0, 210),
    upto=st.integers(0, 210),
    limit=st.integers(1, 60),
)
def test_recent_window_scans_match_their_definition(positions: list[int], after: int, upto: int, limit: int) -> None:
    """events_after / latest_events (newest-first scans with an early stop) answer what
    the window holds: (after, upto] and the newest ``limit`` at or before ``upto``, or
    None when the window may be missing some."""
    events = [ev(p) for p in positions]
    window = events[-RECENT_EVENTS_PER_ROOM:]
    floor = 0 if len(events) <= RECENT_EVENTS_PER_ROOM else events[-RECENT_EVENTS_PER_ROOM - 1].stream_ordering
    room = RoomSnapshot("!r:x", V10, {}, None, 0, positions[-1] if positions else 0, window, floor, [])
    got = room.events_after(after, upto)
    if after < floor:
        assert got is None
    else:
        assert got == [e for e in window if after < e.stream_ordering <= upto]
    wanted = [e for e in window if e.stream_ordering <= upto]
    latest = room.latest_events(limit, upto)
    if len(wanted) >= limit:
        assert latest == wanted[-limit:]
    elif floor == 0:
        assert latest == wanted
    else:
        assert latest is None


_MEMBERSHIPS = st.sampled_from(["join", "leave", "invite", "ban", "knock"])
_VISIBILITIES = st.sampled_from(["shared", "joined", "invited", "world_readable"])


@given(
    st.lists(st.tuples(st.integers(1, 60), _MEMBERSHIPS), max_size=6, unique_by=lambda c: c[0]),
    st.lists(st.tuples(st.integers(1, 60), _VISIBILITIES), max_size=4, unique_by=lambda c: c[0]),
)
def test_visible_ranges_hold_exactly_the_positions_a_message_would_be_visible_at(members, settings) -> None:
    """Search counts and pages within these ranges: they must match the per-event rule at
    every position that is not itself a membership or visibility change (those hold
    state events, which are never searched)."""
    taken = {p for p, _ in members}
    settings = [(p, v) for p, v in settings if p not in taken]  # one event per position
    members, settings = sorted(members), sorted(settings)
    ranges = visible_ranges(members, settings)
    changes = taken | {p for p, _ in settings}
    for position in range(0, 70):
        if position in changes:
            continue
        in_range = any(after < position and (before is None or position < before) for after, before in ranges)
        assert in_range == visible_at(position, members, settings), (position, ranges)
    assert all(a[1] is not None and a[1] <= b[0] for a, b in pairwise(ranges))  # sorted, apart
