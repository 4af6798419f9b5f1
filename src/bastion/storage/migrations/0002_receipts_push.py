"""Receipts, push rules and pushers."""

from yoyo import step

from bastion.storage.migrate import run_script

__depends__ = {"0001_initial"}

SCHEMA = """
CREATE TABLE receipts (
    room_id TEXT NOT NULL,
    user_id TEXT NOT NULL,
    receipt_type TEXT NOT NULL,
    thread_id TEXT NOT NULL,
    event_id TEXT NOT NULL,
    event_stream BIGINT NOT NULL,
    ts BIGINT NOT NULL,
    stream_id BIGINT NOT NULL,
    PRIMARY KEY (room_id, user_id, receipt_type, thread_id)
);
CREATE INDEX receipts_stream ON receipts (room_id, stream_id);
CREATE INDEX receipts_user ON receipts (user_id);

CREATE TABLE push_rules (
    user_id TEXT NOT NULL,
    kind TEXT NOT NULL,
    rule_id TEXT NOT NULL,
    priority BIGINT NOT NULL,
    rule {BLOB} NOT NULL,
    PRIMARY KEY (user_id, kind, rule_id)
);

CREATE TABLE push_rules_enabled (
    user_id TEXT NOT NULL,
    rule_id TEXT NOT NULL,
    enabled {BOOL} NOT NULL,
    actions {BLOB},
    PRIMARY KEY (user_id, rule_id)
);

CREATE TABLE pushers (
    user_id TEXT NOT NULL,
    app_id TEXT NOT NULL,
    pushkey TEXT NOT NULL,
    device_id TEXT,
    data {BLOB} NOT NULL,
    created_ts BIGINT NOT NULL,
    PRIMARY KEY (user_id, app_id, pushkey)
);
CREATE INDEX pushers_app ON pushers (app_id, pushkey)
"""

steps = [step(lambda conn: run_script(conn, SCHEMA))]
