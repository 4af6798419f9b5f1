"""A redacted child event no longer relates to its parent.

The spec (Client-Server API, "Relationships" / "Aggregations of child events"): when a
child event is redacted the relationship is broken and the server de-aggregates it. A
redaction now clears the event's ``relates_to``/``rel_type``; this clears them for the
events redacted before.
"""

from yoyo import step

from bastion.storage.migrate import run_script

__depends__ = {"0009_stream_positions"}

SCHEMA = """
UPDATE events SET relates_to = NULL, rel_type = NULL WHERE redacted_by IS NOT NULL AND relates_to IS NOT NULL
"""

steps = [step(lambda conn: run_script(conn, SCHEMA))]
