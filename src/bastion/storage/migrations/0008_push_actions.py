"""Push actions decided when an event arrives, and the room settings the user directory needs.

``event_push_actions`` holds one row per (user, event) that notified the user: unread
counts and ``/notifications`` read these rows, so changing a push rule later, or
restarting, does not rewrite the past. Rows are written in the event's own
transaction to ``event_push_actions_staging``, which is ordered by stream position
(appending touches a page or two), and moved in batches to ``event_push_actions``,
which is ordered by user (one insert per member per message there would touch a
page per member and index in every commit). Readers look at both.

The actions are user data when a user's own rule produced them (tweak values): those
are sealed under the user's key (``actions``); the action lists of the spec's
server-default rules are stored as a number (``actions_preset``) instead, so the
common case costs no encryption and leaves nothing in clear.

``rooms.join_rule`` and ``rooms.history_visibility`` mirror the current
``m.room.join_rules`` / ``m.room.history_visibility`` state (NULL: not known yet; rooms
created before this migration are filled in by the server, which can decrypt the
state events).
"""

from typing import Any

from yoyo import step

from bastion.storage.migrate import connection_dialect, run_script

__depends__ = {"0007_encryption_at_rest"}

COLUMNS = """
    user_id TEXT NOT NULL,
    room_id TEXT NOT NULL,
    event_id TEXT NOT NULL,
    stream_ordering BIGINT NOT NULL,
    notify {BOOL} NOT NULL,
    highlight {BOOL} NOT NULL,
    actions_preset SMALLINT,
    actions TEXT,
    thread_id TEXT,"""

# On SQLite both tables are clustered on their key (WITHOUT ROWID: one B-tree fewer to
# write for every row); PostgreSQL has no such option and needs none.
TABLES = (
    "CREATE TABLE event_push_actions (" + COLUMNS + " PRIMARY KEY (user_id, stream_ordering))@OPTIONS;"
    "CREATE TABLE event_push_actions_staging (" + COLUMNS + " PRIMARY KEY (stream_ordering, user_id))@OPTIONS;"
)

SCHEMA = """
CREATE INDEX event_push_actions_room ON event_push_actions (user_id, room_id, stream_ordering);
CREATE INDEX event_push_actions_highlight ON event_push_actions (user_id, stream_ordering) WHERE highlight;

ALTER TABLE rooms ADD COLUMN join_rule TEXT;
ALTER TABLE rooms ADD COLUMN history_visibility TEXT
"""


def apply(conn: Any) -> None:
    options = " WITHOUT ROWID" if connection_dialect(conn) == "sqlite" else ""
    run_script(conn, TABLES.replace("@OPTIONS", options) + SCHEMA)


steps = [step(apply)]
