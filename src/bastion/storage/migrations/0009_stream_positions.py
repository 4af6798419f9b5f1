"""Durable stream positions, allocated inside the writing transaction.

``stream_positions`` holds the last position handed out for each stream. A writer
takes positions with ``UPDATE ... SET position = position + n RETURNING position`` in
the same transaction as the rows it writes, so the row lock orders writers — on one
process or many — and a position becomes visible only after every smaller one has
committed or been abandoned (docs/architecture.md, "Streams with several writers").
Positions also survive deletions: a to-device stream whose delivered rows were deleted
no longer restarts from a smaller number after a restart.

``registration_nonces`` holds shared-secret registration nonces, so a nonce fetched
from one worker is accepted by another (and still only once).
"""

from typing import Any

from yoyo import step

from bastion.storage.migrate import connection_dialect, run_script

__depends__ = {"0008_push_actions"}

SCHEMA = """
CREATE TABLE stream_positions (
    stream TEXT PRIMARY KEY,
    position BIGINT NOT NULL
);

CREATE TABLE registration_nonces (
    nonce TEXT PRIMARY KEY,
    created_ts BIGINT NOT NULL
)
"""

SOURCES = {
    "events": "SELECT COALESCE(MAX(stream_ordering), 0) FROM events",
    "account_data": "SELECT COALESCE(MAX(stream_id), 0) FROM account_data",
    "receipts": "SELECT COALESCE(MAX(stream_id), 0) FROM receipts",
    "to_device": "SELECT COALESCE(MAX(stream_id), 0) FROM to_device_inbox",
    "device_lists": "SELECT COALESCE(MAX(stream_id), 0) FROM device_list_changes",
}


def apply(conn: Any) -> None:
    run_script(conn, SCHEMA)
    cur = conn.cursor()
    try:
        for stream, query in SOURCES.items():
            cur.execute(query)
            (position,) = cur.fetchone()
            placeholder = "?" if connection_dialect(conn) == "sqlite" else "%s"
            cur.execute(
                f"INSERT INTO stream_positions (stream, position) VALUES ({placeholder}, {placeholder})",
                (stream, int(position)),
            )
    finally:
        cur.close()


steps = [step(apply)]
