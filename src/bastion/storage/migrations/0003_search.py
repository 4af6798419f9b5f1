"""Full-text search over message bodies, room names and topics.

SQLite uses an FTS5 table; PostgreSQL a tsvector column with a GIN index. Both
index the *text configuration* 'simple' (no language-specific stemming), which
works for every language a deployment might use.
"""

from typing import Any

from yoyo import step

from bastion.storage.migrate import connection_dialect


def apply(conn: Any) -> None:
    cur = conn.cursor()
    if connection_dialect(conn) == "sqlite":
        cur.execute(
            "CREATE VIRTUAL TABLE event_search USING fts5("
            "value, event_id UNINDEXED, room_id UNINDEXED, key UNINDEXED, stream_ordering UNINDEXED, "
            "tokenize = 'unicode61 remove_diacritics 2')"
        )
    else:
        cur.execute(
            "CREATE TABLE event_search ("
            " event_id TEXT PRIMARY KEY, room_id TEXT NOT NULL, key TEXT NOT NULL,"
            " stream_ordering BIGINT NOT NULL, vector TSVECTOR NOT NULL)"
        )
        cur.execute("CREATE INDEX event_search_vector ON event_search USING GIN (vector)")
        cur.execute("CREATE INDEX event_search_room ON event_search (room_id, stream_ordering)")
    cur.close()


__depends__ = {"0002_receipts_push"}

steps = [step(apply)]
