"""Durable cache invalidations, so several workers can cache access tokens and key counts.

A write that changes what a cached read returns — an access token revoked, a user made
admin or deactivated, a device's one-time or fallback keys uploaded or claimed — adds
a row here in the same transaction, at a position of the ``invalidations`` stream.
Every worker reads the stream positions before each authenticated request (the
read-your-writes barrier) and drops the cache entries named by the new rows, so a
token revoked on one worker fails on the very next request to any other, with or
without Redis. Rows are pruned once every worker has long since read them.

``push_actions_moved`` remembers up to which stream position staged push actions
have been moved to ``event_push_actions``: a worker catching up on another worker's
events reads their push decisions from the staging table alone when none of them has
been moved yet (so its ``/sync`` unread counts need no query per request).
"""

from yoyo import step

from bastion.storage.migrate import run_script

__depends__ = {"0010_redacted_relations"}

SCHEMA = """
CREATE TABLE cache_invalidations (
    stream_id BIGINT PRIMARY KEY,
    kind TEXT NOT NULL,
    user_id TEXT NOT NULL,
    device_id TEXT
);

INSERT INTO stream_positions (stream, position) VALUES ('invalidations', 0);

CREATE TABLE push_actions_moved (
    only_row INTEGER PRIMARY KEY CHECK (only_row = 1),
    upto BIGINT NOT NULL
);

INSERT INTO push_actions_moved (only_row, upto)
    SELECT 1, COALESCE(MAX(stream_ordering), 0) FROM event_push_actions
"""

steps = [step(lambda conn: run_script(conn, SCHEMA))]
