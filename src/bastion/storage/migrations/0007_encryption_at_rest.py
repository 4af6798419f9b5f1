"""Encryption at rest: wrapped data keys, server metadata, the blind search index,
and re-encryption progress."""

from yoyo import step

from bastion.storage.migrate import run_script

__depends__ = {"0006_media"}

SCHEMA = """
CREATE TABLE encryption_keys (
    id {SERIAL_PK},
    scope TEXT NOT NULL,
    scope_id TEXT NOT NULL,
    version INTEGER NOT NULL,
    suite TEXT NOT NULL,
    wrapped {BLOB},
    kek_id TEXT NOT NULL,
    created_ts BIGINT NOT NULL,
    state TEXT NOT NULL
);
CREATE UNIQUE INDEX encryption_keys_scope ON encryption_keys (scope, scope_id, version);

CREATE TABLE server_meta (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL
);

CREATE TABLE event_search_tokens (
    room_id TEXT NOT NULL,
    token {BLOB} NOT NULL,
    event_id TEXT NOT NULL,
    stream_ordering BIGINT NOT NULL,
    key TEXT NOT NULL,
    hits INTEGER NOT NULL,
    PRIMARY KEY (room_id, token, event_id)
);
CREATE INDEX event_search_tokens_event ON event_search_tokens (event_id);

CREATE TABLE reencryption_progress (
    target TEXT PRIMARY KEY,
    cursor TEXT NOT NULL,
    updated_ts BIGINT NOT NULL
)
"""

steps = [step(lambda conn: run_script(conn, SCHEMA))]
