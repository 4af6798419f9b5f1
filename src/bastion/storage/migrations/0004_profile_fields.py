"""Extended profile fields (Matrix v1.16): m.tz and namespaced custom keys."""

from yoyo import step

from bastion.storage.migrate import run_script

__depends__ = {"0003_search"}

SCHEMA = """
CREATE TABLE profile_fields (
    user_id TEXT NOT NULL,
    field TEXT NOT NULL,
    value {BLOB} NOT NULL,
    PRIMARY KEY (user_id, field)
)
"""

steps = [step(lambda conn: run_script(conn, SCHEMA))]
