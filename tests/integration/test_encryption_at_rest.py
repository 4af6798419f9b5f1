"""Encryption at rest against a real Bastion: what a stolen database, backup or disk reveals.

Every test drives a real server process (``bastion serve``) over HTTP, then looks at
what it left behind the way an attacker would: the raw bytes of the SQLite files and
the data directory, every row of every PostgreSQL table (as text, which shows bytea
columns in hex), and the server log.

1. Canary scan: unique strings written through every client API that stores user
   data are nowhere in the database, data directory or log — and the same scan of a
   server running with encryption switched off finds every one (the scan is not blind).
2. Tampering: a modified or moved ciphertext is refused with a clear error for that
   one item while the server keeps serving; a wrong, missing or world-readable key
   file, or encryption switched off over an encrypted database, stops start-up
   without touching the data. One damaged message is left out of lists (history,
   /sync, search) and refused when asked for by ID; the rest of the room keeps working.
3. Key rotation (``bastion keys rotate --all``, then ``rotate-kek``) while matrix-nio
   clients keep sending and syncing: no error, no lost, duplicated or reordered message.
4. An interrupted rotation resumes with ``bastion keys rotate``.
5. Crypto-shredding: after a room purge and a KEK rotation, a backup taken before the
   purge can no longer be decrypted (and, before the KEK rotation, it still could).
6. Erasure: deactivating with ``erase: true`` destroys the user's data key and data;
   their messages stay readable to the room.

Run them on both databases: ``BASTION_TEST_DATABASE=postgresql://... pytest ...``.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import sqlite3
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import pytest
import yaml
from nio import (
    AsyncClient,
    AsyncClientConfig,
    LoginResponse,
    RoomMessageText,
    RoomSendResponse,
    SyncResponse,
)

from tests.harness import MatrixError, MatrixHttp, ServerProcess
from tests.integration.test_directory_devices import admin_user

PUSH_GATEWAY = "https://push.invalid/_matrix/push/v1/notify"
SERVER_OVERRIDES: dict[str, Any] = {"push": {"gateway_url_prefixes": ["https://push.invalid/"]}}


# -- helpers -------------------------------------------------------------------------------------


def canary(label: str) -> str:
    """A unique single word (letters and digits only, so search tokenises it whole) with
    upper-case letters, so its lower-case form is a different string to look for."""
    return f"Canary{label.capitalize()}Q{uuid.uuid4().hex.upper()}"


def q(value: str) -> str:
    return quote(value, safe="")


def pg_table_file(srv: ServerProcess, table: str) -> bytes | None:
    """The on-disk heap file of a PostgreSQL table after a checkpoint (None without the
    privileges: superuser, or pg_checkpoint and pg_read_server_files)."""
    import psycopg

    try:
        with psycopg.connect(srv.database_url, autocommit=True) as conn:
            conn.execute("CHECKPOINT")
            (path,) = conn.execute("SELECT pg_relation_filepath(%s)", (table,)).fetchone()  # type: ignore[misc]
            (data,) = conn.execute("SELECT pg_read_binary_file(%s)", (path,)).fetchone()  # type: ignore[misc]
            return bytes(data)
    except psycopg.errors.InsufficientPrivilege:
        return None


def is_postgres(srv: ServerProcess) -> bool:
    return srv.database_url.startswith("postgres")


def sqlite_path(srv: ServerProcess) -> Path:
    return Path(srv.database_url.removeprefix("sqlite:///"))


def key_file(srv: ServerProcess) -> Path:
    config = yaml.safe_load(srv.config_path.read_text())
    return Path(config["encryption"]["key_file"])


def edit_config(srv: ServerProcess, section: str, **values: Any) -> None:
    config = yaml.safe_load(srv.config_path.read_text())
    config.setdefault(section, {}).update(values)
    srv.config_path.write_text(yaml.safe_dump(config))


class RawDb:
    """Direct access to the server's database, as an attacker (or a backup) has it."""

    def __init__(self, srv: ServerProcess) -> None:
        self.postgres = is_postgres(srv)
        if self.postgres:
            import psycopg

            self.conn: Any = psycopg.connect(srv.database_url)
        else:
            self.conn = sqlite3.connect(sqlite_path(srv), timeout=30)

    def _sql(self, sql: str) -> str:
        return sql.replace("?", "%s") if self.postgres else sql

    def rows(self, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        cur = self.conn.execute(self._sql(sql), params)
        out = [tuple(bytes(v) if isinstance(v, memoryview) else v for v in row) for row in cur.fetchall()]
        self.conn.commit()
        return out

    def value(self, sql: str, params: tuple[Any, ...] = ()) -> Any:
        rows = self.rows(sql, params)
        return rows[0][0] if rows else None

    def execute(self, sql: str, params: tuple[Any, ...] = ()) -> int:
        cur = self.conn.execute(self._sql(sql), params)
        self.conn.commit()
        return cur.rowcount

    def tables(self) -> list[str]:
        if self.postgres:
            return [r[0] for r in self.rows(
                "SELECT table_name FROM information_schema.tables "
                "WHERE table_type = 'BASE TABLE' AND table_schema = current_schema()")]
        return [r[0] for r in self.rows("SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%'")]

    def tables_with_column(self, column: str) -> list[str]:
        if self.postgres:
            return [r[0] for r in self.rows(
                "SELECT table_name FROM information_schema.columns WHERE table_schema = current_schema() AND column_name = ?",
                (column,))]
        return [t for t in self.tables() if any(r[1] == column for r in self.rows(f'PRAGMA table_info("{t}")'))]

    def close(self) -> None:
        self.conn.close()


@contextmanager
def raw_db(srv: ServerProcess) -> Iterator[RawDb]:
    db = RawDb(srv)
    try:
        yield db
    finally:
        db.close()


def stored_data(srv: ServerProcess) -> list[tuple[str, bytes]]:
    """Everything an attacker with the disk or a dump gets: (where, bytes).

    SQLite: the raw bytes of every file of the server (database, WAL, data directory,
    log). PostgreSQL: every row of every table as text (bytea prints as hex), plus the
    server's files.
    """
    out: list[tuple[str, bytes]] = []
    for path in sorted(srv.directory.rglob("*")):
        if path.is_file():
            out.append((str(path.relative_to(srv.directory)), path.read_bytes()))
    if is_postgres(srv):
        import psycopg

        with psycopg.connect(srv.database_url) as conn:
            tables = conn.execute(
                "SELECT table_schema, table_name FROM information_schema.tables "
                "WHERE table_type = 'BASE TABLE' AND table_schema NOT IN ('pg_catalog', 'information_schema')"
            ).fetchall()
            assert tables, "no tables found"
            for schema, table in tables:
                rows = [r[0] for r in conn.execute(f'SELECT t::text FROM "{schema}"."{table}" t')]
                out.append((f"table {table}", "\n".join(rows).encode()))
    else:
        assert any(name == "bastion.db" for name, _ in out), "no SQLite database file found"
    return out


def forms(secret: str) -> dict[str, bytes]:
    """The ways a string shows up in stored bytes without real encryption."""
    raw = secret.encode()
    found = {"plain": raw, "lower-case": secret.lower().encode(), "hex (bytea)": raw.hex().encode()}
    for pad in range(3):
        # Base64 of the string at each alignment: only the characters that depend on it alone.
        encoded = base64.b64encode(b"\0" * pad + raw)
        core = encoded[4 if pad else 0:((pad + len(raw)) // 3) * 4]
        found[f"base64/{pad}"] = core
        found[f"base64url/{pad}"] = core.replace(b"+", b"-").replace(b"/", b"_")
    return found


def scan(data: list[tuple[str, bytes]], secrets: dict[str, str]) -> dict[str, list[str]]:
    """label -> ["<form> in <where>", ...] for every secret found in any form."""
    hits: dict[str, list[str]] = {}
    for label, secret in secrets.items():
        for form, needle in forms(secret).items():
            for where, blob in data:
                if needle in blob:
                    hits.setdefault(label, []).append(f"{form} in {where}")
    return hits


def visible(data: list[tuple[str, bytes]], secret: str) -> bool:
    """Plainly there (as text, or as hex in a bytea column)."""
    return any(secret.encode() in blob or secret.encode().hex().encode() in blob for _, blob in data)


def events_messages(client: MatrixHttp, room_id: str, limit: int = 50) -> list[dict[str, Any]]:
    """Every m.room.message in the room, oldest first, by paginating /messages back from the end."""
    events: list[dict[str, Any]] = []
    token: str | None = None
    for _ in range(1000):
        params: dict[str, Any] = {"dir": "b", "limit": limit}
        if token:
            params["from"] = token
        page = client.call("GET", f"/_matrix/client/v3/rooms/{q(room_id)}/messages", params=params)
        events.extend(e for e in page["chunk"] if e["type"] == "m.room.message")
        token = page.get("end")
        if not page["chunk"] or token is None:
            break
    return list(reversed(events))


def keys_status(srv: ServerProcess) -> dict[str, Any]:
    result = srv.cli("keys", "status", "--json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def assert_all_under_newest_keys(status: dict[str, Any]) -> None:
    bad = [c for c in status["columns"] if c["old_key"] or c["plaintext"] or c["unreadable"]]
    assert bad == [], f"values not under the newest keys: {bad}"
    assert status["rotation_in_progress"] is None


def serve_until_exit(srv: ServerProcess, timeout: float = 30) -> tuple[int, str]:
    """Run ``bastion serve``; it is expected to refuse to start. (returncode, output)."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "bastion", "serve", "--config", str(srv.config_path)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=srv.directory, text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        output, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        output, _ = proc.communicate()
        healthy = False
        try:
            healthy = httpx.get(srv.base_url + "/health", timeout=1).status_code == 200
        except httpx.HTTPError:
            pass
        pytest.fail(f"bastion serve did not exit within {timeout}s (healthy: {healthy}):\n{output[-3000:]}")
    return proc.returncode, output


def login_client(srv: ServerProcess, user: MatrixHttp) -> MatrixHttp:
    client = srv.client()
    body = client.call("POST", "/_matrix/client/v3/login", {
        "type": "m.login.password", "identifier": {"type": "m.id.user", "user": user.user_id},
        "password": user.password}, token=False)
    client.token, client.user_id, client.device_id, client.password = (
        body["access_token"], body["user_id"], body["device_id"], user.password)
    return client


def shared_room(owner: MatrixHttp, *members: MatrixHttp, **create: Any) -> str:
    room_id = owner.create_room(invite=[m.user_id for m in members], **create)
    for member in members:
        member.join(room_id)
    return room_id


# -- 1. canary scan ---------------------------------------------------------------------------------


CANARY_LABELS = (
    "message", "searchword", "redacted", "roomname", "topic", "newtopic", "displayname", "avatar", "profilefield",
    "accountdata", "roomaccountdata", "todevice", "devicename", "useragent", "filter", "pushrule",
    "pushtweak", "pusherapp", "pusherdevice", "pusherdata", "defaultruleactions",
)


def write_canaries(srv: ServerProcess) -> dict[str, str]:
    """Store a unique canary through every client API that keeps user data; check each reads back."""
    c = {label: canary(label) for label in CANARY_LABELS}
    alice = srv.client().register()
    bob = srv.client().register()  # never syncs: the to-device message waits in the inbox
    a = q(alice.user_id)
    # Every request of alice's device carries it: the last one seen is stored with the device.
    alice._http.headers["User-Agent"] = c["useragent"]

    room = shared_room(alice, bob, name=c["roomname"], topic=c["topic"])
    message_id = alice.send(room, c["message"])
    alice.send(room, f"the password is {c['searchword']} today")
    redacted_id = alice.send(room, c["redacted"])
    alice.call("PUT", f"/_matrix/client/v3/rooms/{q(room)}/redact/{q(redacted_id)}/{uuid.uuid4().hex}", {"reason": "oops"})

    # The old topic lives on in the new topic event's unsigned.prev_content too.
    alice.call("PUT", f"/_matrix/client/v3/rooms/{q(room)}/state/m.room.topic", {"topic": c["newtopic"]})
    alice.call("PUT", f"/_matrix/client/v3/profile/{a}/displayname", {"displayname": c["displayname"]})
    alice.call("PUT", f"/_matrix/client/v3/profile/{a}/avatar_url", {"avatar_url": f"mxc://localhost/{c['avatar']}"})
    alice.call("PUT", f"/_matrix/client/v3/profile/{a}/org.example.field", {"org.example.field": c["profilefield"]})
    alice.call("PUT", f"/_matrix/client/v3/user/{a}/account_data/org.example.secret", {"secret": c["accountdata"]})
    alice.call("PUT", f"/_matrix/client/v3/user/{a}/rooms/{q(room)}/account_data/org.example.secret",
               {"secret": c["roomaccountdata"]})
    alice.call("PUT", f"/_matrix/client/v3/sendToDevice/org.example.secret/{uuid.uuid4().hex}",
               {"messages": {bob.user_id: {bob.device_id: {"secret": c["todevice"]}}}})
    alice.call("PUT", f"/_matrix/client/v3/devices/{q(alice.device_id)}", {"display_name": c["devicename"]})
    filter_id = alice.call("POST", f"/_matrix/client/v3/user/{a}/filter",
                           {"room": {"timeline": {"not_types": [c["filter"]]}}})["filter_id"]
    alice.call("PUT", "/_matrix/client/v3/pushrules/global/content/secretword",
               {"pattern": c["pushrule"], "actions": ["notify"]})
    alice.call("POST", "/_matrix/client/v3/pushers/set", {
        "kind": "http", "app_id": "org.example.app", "pushkey": "pushkey-" + uuid.uuid4().hex[:8],
        "app_display_name": c["pusherapp"], "device_display_name": c["pusherdevice"], "lang": "en",
        "data": {"url": PUSH_GATEWAY, "format": "event_id_only", "org.example.secret": c["pusherdata"]},
    })
    # A rule's actions are recorded for each event it matches (for /notifications and badges).
    bob.call("PUT", "/_matrix/client/v3/pushrules/global/override/lunch", {
        "conditions": [{"kind": "event_match", "key": "content.body", "pattern": "*lunch*"}],
        "actions": ["notify", {"set_tweak": "sound", "value": c["pushtweak"]}]})
    lunch = alice.send(room, "lunch?")
    # New actions for a server-default rule are stored apart from the user's own rules.
    alice.call("PUT", "/_matrix/client/v3/pushrules/global/underride/.m.rule.message/actions",
               {"actions": ["notify", {"set_tweak": "sound", "value": c["defaultruleactions"]}]})

    # Everything reads back (the server can decrypt what it stored) ...
    assert alice.call("GET", f"/_matrix/client/v3/rooms/{q(room)}/event/{q(message_id)}")["content"]["body"] == c["message"]
    profile = alice.call("GET", f"/_matrix/client/v3/profile/{a}")
    assert profile["displayname"] == c["displayname"]
    assert profile["avatar_url"] == f"mxc://localhost/{c['avatar']}"
    assert profile.get("org.example.field") == c["profilefield"]
    assert alice.call("GET", f"/_matrix/client/v3/user/{a}/account_data/org.example.secret") == {"secret": c["accountdata"]}
    assert alice.call("GET", f"/_matrix/client/v3/user/{a}/rooms/{q(room)}/account_data/org.example.secret") == {
        "secret": c["roomaccountdata"]}
    assert alice.call("GET", f"/_matrix/client/v3/devices/{q(alice.device_id)}")["display_name"] == c["devicename"]
    assert alice.call("GET", f"/_matrix/client/v3/user/{a}/filter/{filter_id}")["room"]["timeline"]["not_types"] == [c["filter"]]
    rule = alice.call("GET", "/_matrix/client/v3/pushrules/global/content/secretword")
    assert rule["pattern"] == c["pushrule"]
    pushers = alice.call("GET", "/_matrix/client/v3/pushers")["pushers"]
    assert [p["data"].get("org.example.secret") for p in pushers] == [c["pusherdata"]]
    assert pushers[0]["app_display_name"] == c["pusherapp"]
    notified = bob.call("GET", "/_matrix/client/v3/notifications")["notifications"]
    assert [n["actions"] for n in notified if n["event"]["event_id"] == lunch] == [
        ["notify", {"set_tweak": "sound", "value": c["pushtweak"]}]]
    state = alice.call("GET", f"/_matrix/client/v3/rooms/{q(room)}/state/m.room.topic")
    assert state["topic"] == c["newtopic"]
    default_rule = alice.call("GET", "/_matrix/client/v3/pushrules/global/underride/.m.rule.message/actions")
    assert default_rule["actions"] == ["notify", {"set_tweak": "sound", "value": c["defaultruleactions"]}]

    # ... and search finds the word (searching in lower case: the index normalises).
    results = alice.call("POST", "/_matrix/client/v3/search", {
        "search_categories": {"room_events": {"search_term": c["searchword"].lower()}}})["search_categories"]["room_events"]
    assert [r["result"]["content"]["body"] for r in results["results"]] == [f"the password is {c['searchword']} today"]
    return c


def test_canaries_are_nowhere_in_the_database_data_dir_or_log(make_server: Any) -> None:
    srv: ServerProcess = make_server(**SERVER_OVERRIDES)
    canaries = write_canaries(srv)
    assert srv.stop() == 0
    data = stored_data(srv)

    hits = scan(data, canaries)
    assert hits == {}, f"canaries readable at rest: {json.dumps(hits, indent=1)}"
    log = srv.log_path.read_bytes()
    assert log, "no server log"
    assert [label for label, secret in canaries.items() if secret.encode() in log or secret.lower().encode() in log] == []
    # Encryption is really on: sealed text columns and sealed blobs are there.
    assert any(b"enc:1:" in blob for _, blob in data)
    assert any(b"\xbaE" in blob or b"\\xba45" in blob for _, blob in data)


def test_canary_scan_sees_plaintext_when_encryption_is_off(make_server: Any) -> None:
    """Positive control: the same writes and scan on a server without encryption at rest
    find every canary, so the zero above means encrypted, not unseen."""
    srv: ServerProcess = make_server(encryption={"enabled": False}, **SERVER_OVERRIDES)
    canaries = write_canaries(srv)
    assert srv.stop() == 0
    data = stored_data(srv)
    # (A redacted event's content is pruned from the database even without encryption.)
    unseen = [label for label, secret in canaries.items() if label != "redacted" and not visible(data, secret)]
    assert unseen == [], f"the scan cannot see these canaries even without encryption: {unseen}"
    # A plaintext full-text index holds the search word lower-cased; the scan looks for that form too.
    lower = canaries["searchword"].lower().encode()
    assert any(lower in blob for _, blob in data), "the scan cannot see a plaintext search index"


# -- 2. tampering --------------------------------------------------------------------------------------


def _get_event(client: MatrixHttp, room_id: str, event_id: str) -> httpx.Response:
    return client.raw("GET", f"/_matrix/client/v3/rooms/{q(room_id)}/event/{q(event_id)}")


def _assert_integrity_failure(resp: httpx.Response, *not_in_body: str) -> None:
    assert resp.status_code == 500, resp.text
    body = resp.json()
    assert body["errcode"] == "M_UNKNOWN"
    assert "integrity" in body["error"].lower(), body
    for text in not_in_body:
        assert text not in resp.text


def _tamper(srv: ServerProcess, flip: list[str] = (), move: list[tuple[str, str]] = ()) -> None:  # type: ignore[assignment]
    """With the server stopped: flip a ciphertext byte of events' JSON, or copy one event's
    sealed JSON into another's row (source, target)."""
    with raw_db(srv) as db:
        def blob(event_id: str) -> bytes:
            value = bytes(db.value("SELECT json FROM events WHERE event_id = ?", (event_id,)))
            assert value[:2] == b"\xbaE", "events are not sealed"
            return value

        for event_id in flip:
            flipped = bytearray(blob(event_id))
            flipped[30] ^= 0x01  # a byte of the ciphertext proper (after the 24-byte header)
            assert db.execute("UPDATE events SET json = ? WHERE event_id = ?", (bytes(flipped), event_id)) == 1
        for source, target in move:
            # A valid ciphertext, under the right key, in another row of the same room.
            assert db.execute("UPDATE events SET json = ? WHERE event_id = ?", (blob(source), target)) == 1


def test_tampered_or_moved_ciphertext_is_refused_for_that_item_only(make_server: Any) -> None:
    srv: ServerProcess = make_server()
    alice = srv.client().register()
    bob = srv.client().register()
    room = shared_room(alice, bob)
    other_room = shared_room(bob, alice)
    bodies = {name: canary(name) for name in ("flipped", "source", "target", "intact", "other")}
    ids = {name: alice.send(room, bodies[name]) for name in ("flipped", "source", "target", "intact")}
    # Push the tampered events out of the room's recent-events window (50): a tampered
    # *recent* event takes the whole room down (test_tampered_recent_event_... below).
    recent = [alice.send(room, f"later {i}") for i in range(55)]
    ids["other"] = bob.send(other_room, bodies["other"])
    assert srv.stop() == 0
    _tamper(srv, flip=[ids["flipped"]], move=[(ids["source"], ids["target"])])
    srv.start()

    # (a) one flipped byte: that event is refused with a clear error ...
    _assert_integrity_failure(_get_event(bob, room, ids["flipped"]), bodies["flipped"])
    # (b) the moved ciphertext fails its row binding; it is never served as the source event
    # (which itself, in its own row, still reads fine).
    _assert_integrity_failure(_get_event(bob, room, ids["target"]), bodies["source"], bodies["target"])
    # ... while the server keeps serving everything else.
    assert httpx.get(srv.base_url + "/health", timeout=5).status_code == 200
    for name in ("source", "intact"):
        resp = _get_event(bob, room, ids[name])
        assert resp.status_code == 200, resp.text
        assert resp.json()["content"]["body"] == bodies[name]
    resp = _get_event(bob, room, recent[-1])
    assert resp.status_code == 200 and resp.json()["content"]["body"] == "later 54", resp.text
    assert alice.send(room, "the room still works")
    assert [e["content"]["body"] for e in events_messages(alice, other_room)] == [bodies["other"]]
    assert bob.sync()["rooms"]["join"].keys() >= {room, other_room}
    # The operator can see what happened.
    log = srv.log_path.read_text(errors="replace")
    integrity_lines = [line for line in log.splitlines() if "integrity" in line.lower() and "ERROR" in line]
    assert len(integrity_lines) == 2, log[-3000:]
    assert all("/event/" in line and "failed authentication" in line for line in integrity_lines), integrity_lines


def test_tampered_recent_event_does_not_take_the_room_or_sync_down(make_server: Any) -> None:
    srv: ServerProcess = make_server()
    alice = srv.client().register()
    bob = srv.client().register()
    room = shared_room(alice, bob)
    first = alice.send(room, "first")
    tampered = alice.send(room, "tampered")
    assert srv.stop() == 0
    _tamper(srv, flip=[tampered])
    srv.start()

    _assert_integrity_failure(_get_event(bob, room, tampered), "tampered")
    resp = _get_event(bob, room, first)
    assert resp.status_code == 200, resp.text
    assert bob.raw("GET", "/_matrix/client/v3/sync", params={"timeout": 0}).status_code == 200
    assert alice.send(room, "the room still works")


def test_tampered_old_event_does_not_block_history_search_or_sync(make_server: Any) -> None:
    srv: ServerProcess = make_server()
    alice = srv.client().register()
    bob = srv.client().register()
    room = shared_room(alice, bob)
    oldest = alice.send(room, "oldest searchable")
    tampered = alice.send(room, "tampered searchable")
    for i in range(55):
        alice.send(room, f"later {i}")
    assert srv.stop() == 0
    _tamper(srv, flip=[tampered])
    srv.start()

    _assert_integrity_failure(_get_event(bob, room, tampered), "tampered")
    sync = bob.raw("GET", "/_matrix/client/v3/sync",
                   params={"timeout": 0, "filter": json.dumps({"room": {"timeline": {"limit": 100}}})})
    assert sync.status_code == 200, sync.text
    search = bob.raw("POST", "/_matrix/client/v3/search",
                     json={"search_categories": {"room_events": {"search_term": "searchable"}}})
    assert search.status_code == 200, search.text
    history = [e["event_id"] for e in events_messages(bob, room, limit=20)]
    assert oldest in history and tampered not in history


def test_startup_refuses_wrong_missing_or_exposed_keys_and_disabled_encryption(make_server: Any) -> None:
    from bastion.security.crypto import KeySet, new_kek, serialise_keyset

    srv: ServerProcess = make_server()
    alice = srv.client().register()
    room = alice.create_room(name="keys")
    secret = canary("kept")
    event_id = alice.send(room, secret)
    assert srv.stop() == 0

    def snapshot() -> dict[str, list[tuple[Any, ...]]]:
        with raw_db(srv) as db:
            return {
                "events": db.rows("SELECT event_id, json, unsigned_static FROM events ORDER BY stream_ordering"),
                "encryption_keys": db.rows("SELECT * FROM encryption_keys ORDER BY id"),
                "server_meta": db.rows("SELECT key, value FROM server_meta ORDER BY key"),
                "profiles": db.rows("SELECT * FROM profiles ORDER BY user_id"),
            }

    before = snapshot()
    path = key_file(srv)
    original = path.read_bytes()
    assert path.stat().st_mode & 0o777 == 0o600
    config = srv.config_path.read_text()

    # (c) another valid key set: a key mismatch, and nothing written.
    path.write_text(serialise_keyset(KeySet(new_kek())))
    path.chmod(0o600)
    rc, out = serve_until_exit(srv)
    assert rc != 0
    assert "key mismatch" in out.lower(), out[-2000:]
    assert "Traceback" not in out, out[-3000:]
    assert snapshot() == before
    path.write_bytes(original)
    path.chmod(0o600)

    # (d) no key file: the error names the setting.
    path.rename(path.with_name("kek.json.away"))
    rc, out = serve_until_exit(srv)
    assert rc != 0
    assert "encryption.key_file" in out and "does not exist" in out, out[-2000:]
    assert "Traceback" not in out, out[-3000:]
    path.with_name("kek.json.away").rename(path)

    # (e) a key file other users can read.
    path.chmod(0o644)
    rc, out = serve_until_exit(srv)
    assert rc != 0
    assert "encryption.key_file" in out and "chmod 600" in out, out[-2000:]
    assert "Traceback" not in out, out[-3000:]
    path.chmod(0o600)

    # (f) encryption switched off over a database that holds encrypted data.
    edit_config(srv, "encryption", enabled=False)
    rc, out = serve_until_exit(srv)
    assert rc != 0
    assert "encryption.enabled" in out and "encrypted data" in out, out[-2000:]
    assert "Traceback" not in out, out[-3000:]
    srv.config_path.write_text(config)

    assert snapshot() == before
    # Positive control: with the right key file and config the same database starts and reads.
    srv.start()
    resp = _get_event(alice, room, event_id)
    assert resp.status_code == 200 and resp.json()["content"]["body"] == secret


# -- 3. rotation while clients work ----------------------------------------------------------------------


async def _cli(srv: ServerProcess, *args: str, timeout: float = 120) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bastion", *args, "--config", str(srv.config_path),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, cwd=srv.directory,
    )
    out, err = await asyncio.wait_for(proc.communicate(), timeout)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


SYNC_FILTER = {"room": {"timeline": {"limit": 500}}, "presence": {"not_types": ["*"]}}


class Member:
    """A nio client that records every test message it receives through /sync, per room."""

    def __init__(self, srv: ServerProcess, user: MatrixHttp, index: int, phase: list[str]) -> None:
        self.user = user
        self.phase = phase  # [what the test is doing now]
        self.sent_in: dict[str, int] = {}
        self.index = index
        self.client = AsyncClient(srv.base_url, user.user_id, config=AsyncClientConfig(encryption_enabled=False))
        self.received: dict[str, list[str]] = {}
        self.sent: dict[str, list[tuple[str, str]]] = {}  # room -> [(event id, body)]
        self.errors: list[str] = []
        self.syncing = True

    async def start(self) -> None:
        resp = await self.client.login(self.user.password, device_name=f"rotation {self.index}")
        assert isinstance(resp, LoginResponse), resp
        first = await self.client.sync(timeout=0, sync_filter=SYNC_FILTER)
        assert isinstance(first, SyncResponse), first
        self.client.add_event_callback(self._on_message, RoomMessageText)

    async def _on_message(self, room: Any, event: RoomMessageText) -> None:
        if event.body.startswith("rot-"):
            self.received.setdefault(room.room_id, []).append(event.event_id)

    async def sync_loop(self) -> None:
        while self.syncing:
            try:
                resp = await self.client.sync(timeout=1000, sync_filter=SYNC_FILTER)
            except Exception as exc:  # a transport error is an error a user would see too
                self.errors.append(f"{self.user.user_id} sync raised {exc!r}")
                await asyncio.sleep(0.2)
                continue
            if not isinstance(resp, SyncResponse):
                self.errors.append(f"{self.user.user_id} sync: {resp}")
                await asyncio.sleep(0.2)
                continue
            for room_id, info in resp.rooms.join.items():
                if info.timeline.limited:
                    self.errors.append(f"{self.user.user_id}: a gappy (limited) timeline in {room_id}")

    async def send_loop(self, rooms: list[str], stop: asyncio.Event, interval: float) -> None:
        n = 0
        while not stop.is_set():
            room_id = rooms[n % len(rooms)]
            body = f"rot-{self.index}-{n}"
            try:
                resp = await self.client.room_send(room_id, "m.room.message", {"msgtype": "m.text", "body": body})
            except Exception as exc:
                self.errors.append(f"{self.user.user_id} send raised {exc!r}")
            else:
                if isinstance(resp, RoomSendResponse):
                    self.sent.setdefault(room_id, []).append((resp.event_id, body))
                    self.sent_in[self.phase[0]] = self.sent_in.get(self.phase[0], 0) + 1
                else:
                    self.errors.append(f"{self.user.user_id} send {body}: {resp}")
            n += 1
            await asyncio.sleep(interval)


@pytest.mark.slow
def test_rotation_while_clients_send_and_sync(make_server: Any) -> None:
    srv: ServerProcess = make_server()
    users = [srv.client().register() for _ in range(4)]
    # Two rooms of three members each; two users are in both.
    rooms = {
        shared_room(users[0], users[1], users[2], name="rotation one"): [0, 1, 2],
        shared_room(users[3], users[1], users[2], name="rotation two"): [1, 2, 3],
    }
    # Some history from before the rotation, too.
    before = {room: [users[members[0]].send(room, f"old-{i}") for i in range(5)] for room, members in rooms.items()}
    old_kek = json.loads(key_file(srv).read_text())["primary"]
    timings: dict[str, float] = {}

    async def scenario() -> dict[str, list[tuple[str, str]]]:
        phase = ["before"]
        members = [Member(srv, user, i, phase) for i, user in enumerate(users)]
        try:
            for m in members:
                await m.start()
            stop = asyncio.Event()
            syncs = [asyncio.create_task(m.sync_loop()) for m in members]
            senders = [
                asyncio.create_task(m.send_loop([r for r, idx in rooms.items() if m.index in idx], stop, 0.3))
                for m in members
            ]
            await asyncio.sleep(1.0)
            t0 = time.monotonic()
            phase[0] = "rotate"
            rc, out, err = await _cli(srv, "keys", "rotate", "--all")
            timings["rotate --all"] = time.monotonic() - t0
            assert rc == 0, out + err
            assert "Done:" in out, out
            t0 = time.monotonic()
            phase[0] = "rotate-kek"
            rc, out, err = await _cli(srv, "keys", "rotate-kek")
            timings["rotate-kek"] = time.monotonic() - t0
            assert rc == 0, out + err
            phase[0] = "after"
            await asyncio.sleep(1.0)
            stop.set()
            await asyncio.gather(*senders)
            for name in ("before", "rotate", "rotate-kek", "after"):
                sent_then = sum(m.sent_in.get(name, 0) for m in members)
                assert sent_then >= 3, f"only {sent_then} messages sent during {name!r}: the test did not overlap"

            sent_by_room: dict[str, list[tuple[str, str]]] = {}
            for m in members:
                for room_id, items in m.sent.items():
                    sent_by_room.setdefault(room_id, []).extend(items)
            expected = {room: {eid for eid, _ in items} for room, items in sent_by_room.items()}

            def caught_up() -> bool:
                return all(
                    set(m.received.get(room, [])) >= expected.get(room, set())
                    for room, idx in rooms.items() for m in members if m.index in idx
                )

            deadline = time.monotonic() + 30
            while not caught_up() and time.monotonic() < deadline:
                await asyncio.sleep(0.2)
            await asyncio.sleep(1.5)  # time for any duplicate delivery to show up
            for m in members:
                m.syncing = False
            await asyncio.gather(*syncs)
            errors = [e for m in members for e in m.errors]
            assert errors == [], errors
            assert caught_up(), "some messages never reached some members"
            timings["messages"] = sum(len(v) for v in sent_by_room.values())
            for m in members:
                for room, idx in rooms.items():
                    if m.index in idx:
                        m_received = m.received.get(room, [])
                        assert len(m_received) == len(set(m_received)), f"{m.user.user_id} got duplicates in {room}"
                        assert set(m_received) == expected[room], f"{m.user.user_id}: wrong messages in {room}"
                    else:
                        assert room not in m.received
            # Each member saw each room's messages in one and the same order, that of the server.
            for room, idx in rooms.items():
                orders = {tuple(members[i].received[room]) for i in idx}
                assert len(orders) == 1, f"members saw different orders in {room}"
                server_order = [e["event_id"] for e in events_messages(users[idx[0]], room) if e["content"]["body"].startswith("rot-")]
                assert list(orders.pop()) == server_order
            # ... and each sender's messages in the order it sent them.
            for m in members:
                for room, items in m.sent.items():
                    position = {eid: i for i, eid in enumerate(members[rooms[room][0]].received[room])}
                    assert [position[eid] for eid, _ in items] == sorted(position[eid] for eid, _ in items)
            return sent_by_room
        finally:
            for m in members:
                await m.client.close()

    sent = asyncio.run(asyncio.wait_for(scenario(), 150))
    assert all(len(items) >= 10 for items in sent.values()), {r: len(v) for r, v in sent.items()}

    def check_history() -> None:
        for room, idx in rooms.items():
            events = events_messages(users[idx[0]], room)
            by_id = {e["event_id"]: e["content"]["body"] for e in events}
            assert [by_id.get(eid) for eid in before[room]] == [f"old-{i}" for i in range(5)]
            assert {eid: by_id.get(eid) for eid, _ in sent[room]} == dict(sent[room])
            assert len(events) == 5 + len(sent[room])

    check_history()
    # The running server wraps keys it creates from now on with the new KEK.
    newcomer = srv.client().register()
    new_room = newcomer.create_room(name="after the rotation")
    newcomer.send(new_room, "fresh keys")
    status = keys_status(srv)
    assert_all_under_newest_keys(status)
    assert status["kek"]["primary"] != old_kek
    assert status["kek"]["others"] == []
    assert status["kek"]["wrapping_keks_in_use"] == [status["kek"]["primary"]]
    assert status["deks"]["room"].get("retired", 0) >= 2, status["deks"]  # the rotation did happen
    assert status["deks"]["user"].get("retired", 0) >= 4, status["deks"]
    events_column = next(c for c in status["columns"] if c["column"] == "events.json")
    assert events_column["active_key"] == events_column["rows"] > 0

    # After a restart the new KEK opens everything; the old one is gone from the key file.
    srv.restart()
    keys = json.loads(key_file(srv).read_text())
    assert [k["id"] for k in keys["keys"]] == [keys["primary"]] == [status["kek"]["primary"]]
    assert old_kek not in key_file(srv).read_text()
    check_history()
    assert [e["content"]["body"] for e in events_messages(newcomer, new_room)] == ["fresh keys"]
    print(f"rotation timings: {timings}")


# -- 4. interrupted rotation -----------------------------------------------------------------------------


def test_interrupted_rotation_resumes(make_server: Any) -> None:
    from bastion import keytool
    from bastion.app import open_migrated_database
    from bastion.settings import load_settings

    srv: ServerProcess = make_server()
    alice = srv.client().register()
    bob = srv.client().register()
    room = shared_room(alice, bob, name="interrupted", topic="resumable")
    bodies = [f"before rotation {i}" for i in range(12)]
    for body in bodies:
        alice.send(room, body)
    alice.call("PUT", f"/_matrix/client/v3/profile/{q(alice.user_id)}/displayname", {"displayname": "Alice Rotated"})
    alice.call("PUT", f"/_matrix/client/v3/user/{q(alice.user_id)}/account_data/org.example.x", {"kept": True})

    db = open_migrated_database(load_settings(srv.config_path))
    try:
        job = keytool.start_rotation(db, "all", None)
        with pytest.raises(InterruptedError):
            keytool.run_rotation(db, job, batch=2, stop_after_batches=3)
    finally:
        asyncio.run(db.close())

    # New data goes under the new keys meanwhile; reading works throughout.
    alice.send(room, "during rotation")
    status = keys_status(srv)
    assert status["rotation_in_progress"] is not None
    assert status["rotation_in_progress"]["scope"] == "all"
    events_column = next(c for c in status["columns"] if c["column"] == "events.json")
    assert events_column["old_key"] > 0, events_column
    assert events_column["active_key"] > 0, events_column  # partly done: the interrupted batches and the new message
    assert [e["content"]["body"] for e in events_messages(bob, room)] == [*bodies, "during rotation"]

    # Starting another rotation is refused; plain "rotate" resumes and finishes.
    refused = srv.cli("keys", "rotate", "--all")
    assert refused.returncode != 0 and "in progress" in refused.stderr, refused.stderr
    resumed = srv.cli("keys", "rotate")
    assert resumed.returncode == 0, resumed.stderr
    assert "Resuming" in resumed.stdout, resumed.stdout
    status = keys_status(srv)
    assert_all_under_newest_keys(status)
    assert status["deks"]["room"].get("retired", 0) >= 1

    assert [e["content"]["body"] for e in events_messages(bob, room)] == [*bodies, "during rotation"]
    assert alice.call("GET", f"/_matrix/client/v3/profile/{q(alice.user_id)}")["displayname"] == "Alice Rotated"
    assert alice.call("GET", f"/_matrix/client/v3/user/{q(alice.user_id)}/account_data/org.example.x") == {"kept": True}
    srv.restart()
    assert [e["content"]["body"] for e in events_messages(bob, room)] == [*bodies, "during rotation"]


# -- 5. crypto-shredding --------------------------------------------------------------------------------------


KEY_COLUMNS = "id, scope, scope_id, version, suite, wrapped, kek_id, created_ts, state"


class BackupTxn:
    """Just enough of a transaction for the Keyring to read data keys from a backup."""

    def __init__(self, key_rows: list[tuple[Any, ...]]) -> None:
        self.conn = sqlite3.connect(":memory:")
        self.conn.execute(f"CREATE TABLE encryption_keys ({KEY_COLUMNS})")
        self.conn.executemany("INSERT INTO encryption_keys VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)", key_rows)
        self.scratch: dict[str, Any] = {}

    def fetchone(self, sql: str, params: tuple[Any, ...] = ()) -> Any:
        return self.conn.execute(sql, params).fetchone()


def decrypt_backup(srv: ServerProcess, key_rows: list[tuple[Any, ...]], event_rows: list[tuple[str, bytes]]) -> list[bytes]:
    """Decrypt a backup's event rows with the key file configured now (a fresh Keyring)."""
    from bastion.app import build_keyring
    from bastion.settings import load_settings

    keyring = build_keyring(load_settings(srv.config_path))
    assert keyring is not None
    txn = BackupTxn(key_rows)
    return [keyring.decrypt(txn, f"event|{event_id}|json".encode(), blob) for event_id, blob in event_rows]  # type: ignore[arg-type]


def unwrap_backup_keys(srv: ServerProcess, key_rows: list[tuple[Any, ...]]) -> list[bytes]:
    from bastion.app import build_keyring
    from bastion.settings import load_settings

    keyring = build_keyring(load_settings(srv.config_path))
    assert keyring is not None
    return [keyring._unwrap_key(row[:7]) for row in key_rows]


@pytest.mark.slow
def test_purged_room_cannot_be_read_from_an_old_backup_after_kek_rotation(make_server: Any, tmp_path: Path) -> None:
    from bastion.security.crypto import IntegrityError

    srv: ServerProcess = make_server()
    admin = admin_user(srv, "shredder")
    alice = srv.client().register()
    bob = srv.client().register()
    purged = shared_room(alice, bob, name="to be purged")
    kept = shared_room(alice, bob, name="survivor")
    secrets = [canary(f"purged{i}") for i in range(3)]
    for secret in secrets:
        alice.send(purged, f"{secret} is confidential")
    bob.send(kept, "kept before")
    search = alice.call("POST", "/_matrix/client/v3/search", {
        "search_categories": {"room_events": {"search_term": "confidential"}}})["search_categories"]["room_events"]
    assert search["count"] == 3  # the purged room has a blind-index key too

    # The "backup": the database as it was before the purge.
    if is_postgres(srv):
        with raw_db(srv) as db:
            backup_keys = db.rows(f"SELECT {KEY_COLUMNS} FROM encryption_keys ORDER BY id")
            backup_events = db.rows("SELECT event_id, json FROM events WHERE room_id = ? ORDER BY stream_ordering", (purged,))
    else:
        backup_file = tmp_path / "backup.db"
        src, dst = sqlite3.connect(sqlite_path(srv)), sqlite3.connect(backup_file)
        src.backup(dst)
        src.close()
        backup_keys = [tuple(r) for r in dst.execute(f"SELECT {KEY_COLUMNS} FROM encryption_keys ORDER BY id")]
        backup_events = [tuple(r) for r in dst.execute(
            "SELECT event_id, json FROM events WHERE room_id = ? ORDER BY stream_ordering", (purged,))]
        dst.close()
    purged_keys = [row for row in backup_keys if row[2] == purged]
    assert {row[1] for row in purged_keys} == {"room", "room-search"}
    assert all(row[5] for row in purged_keys)
    assert len(backup_events) >= 8
    heap_before = pg_table_file(srv, "encryption_keys") if is_postgres(srv) else None
    if heap_before is not None:
        assert all(bytes(row[5]) in heap_before for row in purged_keys)  # control: findable where it exists

    sent_ids = [eid for eid, _ in backup_events]
    with raw_db(srv) as db:  # control: the room's sends left idempotency records
        assert db.value(
            f"SELECT COUNT(*) FROM event_txns WHERE event_id IN ({', '.join('?' for _ in sent_ids)})", tuple(sent_ids)) >= 3

    # Purge through the admin API: members are removed, rows deleted, keys destroyed.
    resp = admin.raw("DELETE", f"/_synapse/admin/v1/rooms/{q(purged)}", json={})
    assert resp.status_code == 200, resp.text
    assert set(resp.json()["kicked_users"]) == {alice.user_id, bob.user_id}
    assert admin.raw("DELETE", f"/_synapse/admin/v1/rooms/{q(purged)}", json={}).status_code == 404
    with pytest.raises(MatrixError) as err:
        bob.call("GET", f"/_matrix/client/v3/rooms/{q(purged)}/messages", params={"dir": "b"})
    assert err.value.status in (403, 404)
    assert purged not in bob.sync().get("rooms", {}).get("join", {})
    with raw_db(srv) as db:
        leftovers = {t: db.value(f'SELECT COUNT(*) FROM "{t}" WHERE room_id = ?', (purged,)) for t in db.tables_with_column("room_id")}
        assert {t: n for t, n in leftovers.items() if n} == {}
        assert "events" in leftovers and "encryption_keys" not in leftovers
        event_ids = [eid for eid, _ in backup_events]
        assert db.value(
            f"SELECT COUNT(*) FROM events WHERE event_id IN ({', '.join('?' for _ in event_ids)})", tuple(event_ids)) == 0
        # The idempotent-send records (client transaction IDs, event types, the room in
        # their scope) have no room_id column: they go by the events they recorded.
        assert db.value(
            f"SELECT COUNT(*) FROM event_txns WHERE event_id IN ({', '.join('?' for _ in event_ids)})", tuple(event_ids)) == 0
        key_states = db.rows("SELECT scope, state, wrapped FROM encryption_keys WHERE scope_id = ?", (purged,))
        assert sorted((s, st, w) for s, st, w in key_states) == sorted((row[1], "destroyed", None) for row in purged_keys)
    if not is_postgres(srv):
        # The wrapped keys are gone from the database file and the WAL, not just unlinked.
        live = sqlite_path(srv).read_bytes()
        wal = sqlite_path(srv).with_name(sqlite_path(srv).name + "-wal")
        live += wal.read_bytes() if wal.exists() else b""
        backup_bytes = backup_file.read_bytes()
        for row in purged_keys:
            assert bytes(row[5]) in backup_bytes  # control: findable where it exists
            assert bytes(row[5]) not in live, f"the destroyed {row[1]} key of the purged room is still on disk"
    elif heap_before is not None:
        # PostgreSQL: vacuumed, so no dead tuple in the table's file keeps them (the WAL does,
        # like any backup: that is what the KEK rotation below is for).
        heap_after = pg_table_file(srv, "encryption_keys")
        assert heap_after is not None
        for row in purged_keys:
            assert bytes(row[5]) not in heap_after, f"the destroyed {row[1]} key of the purged room is still on disk"

    # Positive control: before the KEK rotation, the backup still decrypts with the key file.
    plain = decrypt_backup(srv, backup_keys, backup_events)
    assert all(any(s.encode() in p for p in plain) for s in secrets)
    assert len(unwrap_backup_keys(srv, purged_keys)) == len(purged_keys)

    rotated = srv.cli("keys", "rotate-kek")
    assert rotated.returncode == 0, rotated.stderr

    # Now nothing in the backup opens with the key file in use.
    for event_id, blob in backup_events:
        with pytest.raises(IntegrityError):
            decrypt_backup(srv, backup_keys, [(event_id, blob)])
    for row in purged_keys:
        with pytest.raises(IntegrityError):
            unwrap_backup_keys(srv, [row])

    # The other room is unaffected.
    bob.send(kept, "kept after")
    assert [e["content"]["body"] for e in events_messages(alice, kept)] == ["kept before", "kept after"]
    search = alice.call("POST", "/_matrix/client/v3/search", {
        "search_categories": {"room_events": {"search_term": "kept"}}})["search_categories"]["room_events"]
    assert sorted(r["result"]["content"]["body"] for r in search["results"]) == ["kept after", "kept before"]
    status = keys_status(srv)
    assert all(c["unreadable"] == 0 for c in status["columns"]), status["columns"]
    srv.restart()
    assert [e["content"]["body"] for e in events_messages(bob, kept)] == ["kept before", "kept after"]


# -- 6. erasure ---------------------------------------------------------------------------------------------------


def test_erasing_deactivation_destroys_the_user_key_and_data(make_server: Any) -> None:
    srv: ServerProcess = make_server(**SERVER_OVERRIDES)
    alice = srv.client().register()
    bob = srv.client().register()
    a = q(alice.user_id)
    room = shared_room(alice, bob, name="erasure")
    secret = canary("erased")
    alice.call("PUT", f"/_matrix/client/v3/profile/{a}/displayname", {"displayname": secret})
    alice.call("PUT", f"/_matrix/client/v3/profile/{a}/org.example.field", {"org.example.field": secret})
    alice.call("PUT", f"/_matrix/client/v3/user/{a}/account_data/org.example.secret", {"secret": secret})
    alice.call("PUT", f"/_matrix/client/v3/user/{a}/rooms/{q(room)}/account_data/org.example.secret", {"secret": secret})
    alice.call("POST", f"/_matrix/client/v3/user/{a}/filter", {"room": {"timeline": {"not_types": [secret]}}})
    alice.call("PUT", f"/_matrix/client/v3/devices/{q(alice.device_id)}", {"display_name": secret})
    alice.call("PUT", "/_matrix/client/v3/pushrules/global/content/secretword", {"pattern": secret, "actions": ["notify"]})
    alice.call("POST", "/_matrix/client/v3/pushers/set", {
        "kind": "http", "app_id": "org.example.app", "pushkey": "erasure-" + uuid.uuid4().hex[:8],
        "app_display_name": "app", "device_display_name": "dev", "lang": "en", "data": {"url": PUSH_GATEWAY}})
    bob.call("PUT", f"/_matrix/client/v3/sendToDevice/org.example.secret/{uuid.uuid4().hex}",
             {"messages": {alice.user_id: {alice.device_id: {"secret": secret}}}})
    said = [alice.send(room, f"alice says {i}") for i in range(3)]
    alice.call("PUT", "/_matrix/client/v3/pushrules/global/underride/.m.rule.message/actions",
               {"actions": ["notify", {"set_tweak": "sound", "value": secret}]})
    backup = alice.call("POST", "/_matrix/client/v3/room_keys/version", {
        "algorithm": "m.megolm_backup.v1.curve25519-aes-sha2", "auth_data": {"public_key": secret}})["version"]
    alice.call("PUT", f"/_matrix/client/v3/room_keys/keys/{q(room)}/session1", {
        "first_message_index": 0, "forwarded_count": 0, "is_verified": False, "session_data": {"ciphertext": secret}},
        params={"version": backup})
    erased_tables = (
        "profile_fields", "account_data", "filters", "push_rules", "push_rules_enabled", "pushers", "to_device_inbox",
        "e2e_backup_versions", "e2e_backup_keys",
    )

    with raw_db(srv) as db:
        user_keys = db.rows("SELECT id, state FROM encryption_keys WHERE scope = 'user' AND scope_id = ?", (alice.user_id,))
        assert user_keys and all(state == "active" or state == "retired" for _, state in user_keys)
        for table in erased_tables:
            assert db.value(f"SELECT COUNT(*) FROM {table} WHERE user_id = ?", (alice.user_id,)) > 0, table

    first = alice.raw("POST", "/_matrix/client/v3/account/deactivate", json={"erase": True})
    assert first.status_code == 401, first.text
    done = alice.call("POST", "/_matrix/client/v3/account/deactivate", {
        "erase": True,
        "auth": {"type": "m.login.password", "identifier": {"type": "m.id.user", "user": alice.user_id},
                 "password": alice.password, "session": first.json()["session"]},
    })
    assert "id_server_unbind_result" in done

    with raw_db(srv) as db:
        states = db.rows("SELECT state, wrapped FROM encryption_keys WHERE scope = 'user' AND scope_id = ?", (alice.user_id,))
        assert states and all(state == "destroyed" and wrapped is None for state, wrapped in states), states
        for table in erased_tables:
            assert db.value(f"SELECT COUNT(*) FROM {table} WHERE user_id = ?", (alice.user_id,)) == 0, table
        assert db.rows("SELECT displayname, avatar_url FROM profiles WHERE user_id = ?", (alice.user_id,)) in ([], [(None, None)])
        names = db.rows("SELECT display_name FROM devices WHERE user_id = ?", (alice.user_id,))
        assert all(name is None for (name,) in names), names

    # The server keeps going; the erased user's messages stay readable to the room (room-scoped keys).
    assert httpx.get(srv.base_url + "/health", timeout=5).status_code == 200
    assert alice.raw("GET", "/_matrix/client/v3/account/whoami").status_code == 401
    messages = {e["event_id"]: e["content"]["body"] for e in events_messages(bob, room)}
    assert [messages.get(eid) for eid in said] == [f"alice says {i}" for i in range(3)]
    bob.send(room, "bob is still here")
    bob.sync()
    profile = bob.raw("GET", f"/_matrix/client/v3/profile/{a}")
    assert secret not in profile.text

    # The last-seen data gathered in memory before the erasure is written at the next
    # flush (here: on shutdown). It must not bring the erased user a new data key.
    srv.restart()
    with raw_db(srv) as db:
        states = db.rows("SELECT state FROM encryption_keys WHERE scope = 'user' AND scope_id = ?", (alice.user_id,))
        assert {state for (state,) in states} == {"destroyed"}, states
        seen = db.rows("SELECT last_seen_ip, last_seen_user_agent FROM devices WHERE user_id = ?", (alice.user_id,))
        assert all(ip is None and ua is None for ip, ua in seen), seen

    # Nothing is left under the destroyed key, and a full rotation afterwards still works.
    status = keys_status(srv)
    assert all(c["unreadable"] == 0 for c in status["columns"]), status["columns"]
    rotated = srv.cli("keys", "rotate", "--all")
    assert rotated.returncode == 0, rotated.stderr
    assert_all_under_newest_keys(keys_status(srv))
    assert [e["content"]["body"] for e in events_messages(bob, room)][-1] == "bob is still here"
