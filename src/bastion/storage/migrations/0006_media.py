"""The media repository: uploaded files and their thumbnails."""

from yoyo import step

from bastion.storage.migrate import run_script

__depends__ = {"0005_e2ee"}

SCHEMA = """
CREATE TABLE media (
    media_id TEXT PRIMARY KEY,
    user_id TEXT NOT NULL,
    content_type TEXT,
    upload_name TEXT,
    size BIGINT,
    sha256 TEXT,
    created_ts BIGINT NOT NULL,
    uploaded_ts BIGINT,
    expires_ts BIGINT,
    quarantined {BOOL} NOT NULL DEFAULT FALSE
);
CREATE INDEX media_user ON media (user_id, created_ts);
CREATE INDEX media_created ON media (created_ts);

CREATE TABLE media_thumbnails (
    media_id TEXT NOT NULL,
    width INTEGER NOT NULL,
    height INTEGER NOT NULL,
    method TEXT NOT NULL,
    content_type TEXT NOT NULL,
    size BIGINT NOT NULL,
    PRIMARY KEY (media_id, width, height, method)
)
"""

steps = [step(lambda conn: run_script(conn, SCHEMA))]
