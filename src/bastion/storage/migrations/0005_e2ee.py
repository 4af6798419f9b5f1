"""End-to-end encryption: device keys, one-time and fallback keys, cross-signing,
signatures, the device-list stream, to-device messages and server-side key backup."""

from yoyo import step

from bastion.storage.migrate import run_script

__depends__ = {"0004_profile_fields"}

SCHEMA = """
CREATE TABLE e2e_device_keys (
    user_id TEXT NOT NULL,
    device_id TEXT NOT NULL,
    keys {BLOB} NOT NULL,
    PRIMARY KEY (user_id, device_id)
);

CREATE TABLE e2e_one_time_keys (
    user_id TEXT NOT NULL,
    device_id TEXT NOT NULL,
    algorithm TEXT NOT NULL,
    key_id TEXT NOT NULL,
    key {BLOB} NOT NULL,
    PRIMARY KEY (user_id, device_id, algorithm, key_id)
);

CREATE TABLE e2e_fallback_keys (
    user_id TEXT NOT NULL,
    device_id TEXT NOT NULL,
    algorithm TEXT NOT NULL,
    key_id TEXT NOT NULL,
    key {BLOB} NOT NULL,
    used {BOOL} NOT NULL DEFAULT FALSE,
    PRIMARY KEY (user_id, device_id, algorithm)
);

CREATE TABLE e2e_cross_signing_keys (
    user_id TEXT NOT NULL,
    usage TEXT NOT NULL,
    public_key TEXT NOT NULL,
    key {BLOB} NOT NULL,
    PRIMARY KEY (user_id, usage)
);

CREATE TABLE e2e_signatures (
    target_user TEXT NOT NULL,
    target_key TEXT NOT NULL,
    signer_user TEXT NOT NULL,
    signer_key TEXT NOT NULL,
    signature TEXT NOT NULL,
    PRIMARY KEY (target_user, target_key, signer_user, signer_key)
);

CREATE TABLE device_list_changes (
    stream_id BIGINT PRIMARY KEY,
    user_id TEXT NOT NULL
);
CREATE INDEX device_list_changes_user ON device_list_changes (user_id, stream_id);

CREATE TABLE to_device_inbox (
    stream_id BIGINT PRIMARY KEY,
    user_id TEXT NOT NULL,
    device_id TEXT NOT NULL,
    message {BLOB} NOT NULL
);
CREATE INDEX to_device_inbox_device ON to_device_inbox (user_id, device_id, stream_id);

CREATE TABLE to_device_txns (
    user_id TEXT NOT NULL,
    device_id TEXT NOT NULL,
    txn_id TEXT NOT NULL,
    created_ts BIGINT NOT NULL,
    PRIMARY KEY (user_id, device_id, txn_id)
);

CREATE TABLE e2e_backup_versions (
    user_id TEXT NOT NULL,
    version BIGINT NOT NULL,
    algorithm TEXT NOT NULL,
    auth_data {BLOB} NOT NULL,
    etag BIGINT NOT NULL DEFAULT 0,
    deleted {BOOL} NOT NULL DEFAULT FALSE,
    PRIMARY KEY (user_id, version)
);

CREATE TABLE e2e_backup_keys (
    user_id TEXT NOT NULL,
    version BIGINT NOT NULL,
    room_id TEXT NOT NULL,
    session_id TEXT NOT NULL,
    first_message_index BIGINT NOT NULL,
    forwarded_count BIGINT NOT NULL,
    is_verified {BOOL} NOT NULL,
    session_data {BLOB} NOT NULL,
    PRIMARY KEY (user_id, version, room_id, session_id)
)
"""

steps = [step(lambda conn: run_script(conn, SCHEMA))]
