"""Rooms, memberships (the current membership of every user in every room) and aliases."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from bastion.storage.database import Txn
from bastion.storage.sealed import seal, unseal


@dataclass(frozen=True, slots=True)
class RoomRow:
    room_id: str
    room_version: str
    creator: str
    created_ts: int
    is_public: bool


@dataclass(frozen=True, slots=True)
class MembershipRow:
    room_id: str
    membership: str
    event_id: str
    stream_ordering: int
    forgotten: bool


def insert_room(txn: Txn, room_id: str, room_version: str, creator: str, now_ms: int, is_public: bool) -> None:
    txn.execute(
        "INSERT INTO rooms (room_id, room_version, creator, created_ts, is_public) VALUES (?, ?, ?, ?, ?)",
        (room_id, room_version, creator, now_ms, is_public),
    )


def get_room(txn: Txn, room_id: str) -> RoomRow | None:
    return get_rooms(txn, [room_id]).get(room_id)


def get_rooms(txn: Txn, room_ids: Sequence[str]) -> dict[str, RoomRow]:
    """The rooms that exist among ``room_ids``, in one statement."""
    if not room_ids:
        return {}
    where, params = txn.any_of("room_id", room_ids)
    rows = txn.fetchall(f"SELECT room_id, room_version, creator, created_ts, is_public FROM rooms WHERE {where}", params)
    return {r[0]: RoomRow(r[0], r[1], r[2], r[3], bool(r[4])) for r in rows}


def get_user_memberships(txn: Txn, user_id: str) -> list[MembershipRow]:
    rows = txn.fetchall(
        "SELECT room_id, membership, event_id, stream_ordering, forgotten FROM memberships WHERE user_id = ?",
        (user_id,),
    )
    return [MembershipRow(r[0], r[1], r[2], r[3], bool(r[4])) for r in rows]


def set_forgotten(txn: Txn, user_id: str, room_id: str) -> bool:
    return (
        txn.execute(
            "UPDATE memberships SET forgotten = TRUE WHERE user_id = ? AND room_id = ? AND membership IN ('leave', 'ban')",
            (user_id, room_id),
        )
        == 1
    )


def room_members(txn: Txn, room_id: str, membership: str) -> list[str]:
    return [
        r[0]
        for r in txn.fetchall(
            "SELECT user_id FROM memberships WHERE room_id = ? AND membership = ?", (room_id, membership)
        )
    ]


# -- aliases ----------------------------------------------------------------------------------


def insert_alias(txn: Txn, alias: str, room_id: str, creator: str, now_ms: int) -> bool:
    return (
        txn.execute(
            "INSERT INTO room_aliases (alias, room_id, creator, created_ts) VALUES (?, ?, ?, ?) "
            "ON CONFLICT (alias) DO NOTHING",
            (alias, room_id, creator, now_ms),
        )
        == 1
    )


def get_alias(txn: Txn, alias: str) -> tuple[str, str] | None:
    row = txn.fetchone("SELECT room_id, creator FROM room_aliases WHERE alias = ?", (alias,))
    return (row[0], row[1]) if row is not None else None


def move_alias(txn: Txn, alias: str, room_id: str) -> None:
    txn.execute("UPDATE room_aliases SET room_id = ? WHERE alias = ?", (room_id, alias))


def delete_alias(txn: Txn, alias: str) -> bool:
    return txn.execute("DELETE FROM room_aliases WHERE alias = ?", (alias,)) == 1


def aliases_for_room(txn: Txn, room_id: str) -> list[str]:
    return [r[0] for r in txn.fetchall("SELECT alias FROM room_aliases WHERE room_id = ? ORDER BY alias", (room_id,))]


# -- filters and account data ------------------------------------------------------------------


def insert_filter(txn: Txn, user_id: str, filter_json: bytes) -> int:
    next_id = int(txn.fetchval("SELECT COALESCE(MAX(filter_id), -1) + 1 FROM filters WHERE user_id = ?", (user_id,)))
    sealed = seal(txn, "user", user_id, f"filter|{user_id}|{next_id}", filter_json)
    txn.execute("INSERT INTO filters (user_id, filter_id, json) VALUES (?, ?, ?)", (user_id, next_id, sealed))
    return next_id


def get_filter(txn: Txn, user_id: str, filter_id: int) -> bytes | None:
    value = txn.fetchval("SELECT json FROM filters WHERE user_id = ? AND filter_id = ?", (user_id, filter_id))
    return unseal(txn, f"filter|{user_id}|{filter_id}", value) if value is not None else None


def _account_data_binding(user_id: str, room_id: str, data_type: str) -> str:
    return f"account_data|{user_id}|{room_id}|{data_type}"


def put_account_data(txn: Txn, user_id: str, room_id: str, data_type: str, stream_id: int, content: bytes) -> None:
    sealed = seal(txn, "user", user_id, _account_data_binding(user_id, room_id, data_type), content)
    txn.execute(
        "INSERT INTO account_data (user_id, room_id, type, stream_id, content) VALUES (?, ?, ?, ?, ?) "
        "ON CONFLICT (user_id, room_id, type) DO UPDATE SET stream_id = excluded.stream_id, content = excluded.content",
        (user_id, room_id, data_type, stream_id, sealed),
    )


def get_account_data(txn: Txn, user_id: str, room_id: str, data_type: str) -> bytes | None:
    value = txn.fetchval(
        "SELECT content FROM account_data WHERE user_id = ? AND room_id = ? AND type = ?",
        (user_id, room_id, data_type),
    )
    return unseal(txn, _account_data_binding(user_id, room_id, data_type), value) if value is not None else None


def account_data_since(txn: Txn, user_id: str, after: int, upto: int) -> list[tuple[str, str, bytes]]:
    rows = txn.fetchall(
        "SELECT room_id, type, content FROM account_data WHERE user_id = ? AND stream_id > ? AND stream_id <= ? "
        "ORDER BY stream_id",
        (user_id, after, upto),
    )
    return [(r[0], r[1], unseal(txn, _account_data_binding(user_id, r[0], r[1]), r[2])) for r in rows]


def max_account_data_stream(txn: Txn) -> int:
    return int(txn.fetchval("SELECT COALESCE(MAX(stream_id), 0) FROM account_data"))
