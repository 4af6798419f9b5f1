"""Users' push rules and pushers."""

from __future__ import annotations

from typing import Any

import orjson

from bastion.storage.database import Txn
from bastion.storage.sealed import seal, unseal


def user_rules(txn: Txn, user_id: str) -> list[tuple[str, str, int, dict[str, Any]]]:
    """(kind, rule_id, priority, rule) ordered by priority, highest first."""
    rows = txn.fetchall(
        "SELECT kind, rule_id, priority, rule FROM push_rules WHERE user_id = ? ORDER BY kind, priority DESC",
        (user_id,),
    )
    return [(r[0], r[1], int(r[2]), orjson.loads(unseal(txn, f"push_rule|{user_id}|{r[0]}|{r[1]}", r[3]))) for r in rows]


def default_overrides(txn: Txn, user_id: str) -> dict[str, tuple[bool, list[Any] | None]]:
    rows = txn.fetchall("SELECT rule_id, enabled, actions FROM push_rules_enabled WHERE user_id = ?", (user_id,))
    return {
        r[0]: (bool(r[1]), orjson.loads(unseal(txn, f"push_rule_actions|{user_id}|{r[0]}", r[2])) if r[2] is not None else None)
        for r in rows
    }


def put_user_rule(txn: Txn, user_id: str, kind: str, rule_id: str, priority: int, rule: dict[str, Any]) -> None:
    txn.execute(
        "INSERT INTO push_rules (user_id, kind, rule_id, priority, rule) VALUES (?, ?, ?, ?, ?) "
        "ON CONFLICT (user_id, kind, rule_id) DO UPDATE SET priority = excluded.priority, rule = excluded.rule",
        (user_id, kind, rule_id, priority, seal(txn, "user", user_id, f"push_rule|{user_id}|{kind}|{rule_id}", orjson.dumps(rule))),
    )


def delete_user_rule(txn: Txn, user_id: str, kind: str, rule_id: str) -> bool:
    return txn.execute(
        "DELETE FROM push_rules WHERE user_id = ? AND kind = ? AND rule_id = ?", (user_id, kind, rule_id)
    ) == 1


def put_default_override(txn: Txn, user_id: str, rule_id: str, enabled: bool, actions: list[Any] | None) -> None:
    txn.execute(
        "INSERT INTO push_rules_enabled (user_id, rule_id, enabled, actions) VALUES (?, ?, ?, ?) "
        "ON CONFLICT (user_id, rule_id) DO UPDATE SET enabled = excluded.enabled, actions = excluded.actions",
        (
            user_id, rule_id, enabled,
            seal(txn, "user", user_id, f"push_rule_actions|{user_id}|{rule_id}", orjson.dumps(actions))
            if actions is not None else None,
        ),
    )


def pushers_for(txn: Txn, user_id: str) -> list[dict[str, Any]]:
    rows = txn.fetchall("SELECT app_id, pushkey, data FROM pushers WHERE user_id = ? ORDER BY created_ts", (user_id,))
    return [orjson.loads(unseal(txn, f"pusher|{user_id}|{r[0]}|{r[1]}", r[2])) for r in rows]


def users_with_pushers(txn: Txn) -> set[str]:
    return {r[0] for r in txn.fetchall("SELECT DISTINCT user_id FROM pushers")}


def put_pusher(txn: Txn, user_id: str, app_id: str, pushkey: str, device_id: str | None, data: dict[str, Any], now: int, append: bool) -> None:
    if not append:
        # Without "append", a pushkey belongs to one user: others' pushers with it go.
        txn.execute("DELETE FROM pushers WHERE app_id = ? AND pushkey = ? AND user_id <> ?", (app_id, pushkey, user_id))
    txn.execute(
        "INSERT INTO pushers (user_id, app_id, pushkey, device_id, data, created_ts) VALUES (?, ?, ?, ?, ?, ?) "
        "ON CONFLICT (user_id, app_id, pushkey) DO UPDATE SET data = excluded.data, device_id = excluded.device_id",
        (user_id, app_id, pushkey, device_id, seal(txn, "user", user_id, f"pusher|{user_id}|{app_id}|{pushkey}", orjson.dumps(data)), now),
    )


def delete_pusher(txn: Txn, user_id: str, app_id: str, pushkey: str) -> bool:
    return txn.execute(
        "DELETE FROM pushers WHERE user_id = ? AND app_id = ? AND pushkey = ?", (user_id, app_id, pushkey)
    ) == 1


def delete_pushers_by_key(txn: Txn, app_id: str, pushkey: str) -> None:
    txn.execute("DELETE FROM pushers WHERE app_id = ? AND pushkey = ?", (app_id, pushkey))
