"""Envelope encryption: the AEAD blob format, KEK providers, and the keyring on a real SQLite database."""

from __future__ import annotations

import asyncio
import base64
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from bastion.errors import ConfigError
from bastion.security.crypto import (
    AesGcm,
    EnvKeyProvider,
    FileKeyProvider,
    IntegrityError,
    KeySet,
    Sm4Gcm,
    new_kek,
    open_blob,
    parse_header,
    seal,
    serialise_keyset,
    suite_available,
)
from bastion.security.keyring import Keyring
from bastion.storage import keys as keys_store
from bastion.storage.database import Database, open_database
from bastion.storage.migrate import migrate
from bastion.storage.sealed import seal as seal_field
from bastion.storage.sealed import seal_text, unseal, unseal_text


def _roundtrip(aead: AesGcm | Sm4Gcm) -> None:
    blob = seal(aead, 7, b"event|$a|json", b"hello")
    suite, dek_id, nonce, ct = parse_header(blob)
    assert (suite, dek_id) == (aead.suite_id, 7)
    assert b"hello" not in blob
    assert open_blob(aead, 7, b"event|$a|json", nonce, ct) == b"hello"
    with pytest.raises(IntegrityError):  # moved to another row
        open_blob(aead, 7, b"event|$b|json", nonce, ct)
    with pytest.raises(IntegrityError):  # claims another key id
        open_blob(aead, 8, b"event|$a|json", nonce, ct)
    flipped = bytearray(ct)
    flipped[0] ^= 1
    with pytest.raises(IntegrityError):
        open_blob(aead, 7, b"event|$a|json", nonce, bytes(flipped))


def test_aes_gcm_blob_is_bound_to_its_row_and_key() -> None:
    _roundtrip(AesGcm(os.urandom(32)))


@pytest.mark.skipif(not suite_available("sm4-gcm"), reason="this OpenSSL has no SM4")
def test_sm4_gcm_blob_is_bound_to_its_row_and_key() -> None:
    _roundtrip(Sm4Gcm(os.urandom(16)))


def test_random_nonces_differ() -> None:
    aead = AesGcm(os.urandom(32))
    assert seal(aead, 1, b"x", b"same") != seal(aead, 1, b"x", b"same")


def test_file_provider_refuses_group_or_world_readable_keys(tmp_path: Path) -> None:
    path = tmp_path / "kek.json"
    keys = KeySet(new_kek())
    FileKeyProvider(path).store(keys)
    assert path.stat().st_mode & 0o777 == 0o600
    assert FileKeyProvider(path).load().primary == keys.primary
    path.chmod(0o644)
    with pytest.raises(ConfigError, match="chmod 600"):
        FileKeyProvider(path).load()
    with pytest.raises(ConfigError, match="does not exist"):
        FileKeyProvider(tmp_path / "missing.json").load()
    bad = tmp_path / "bad.json"
    bad.write_text('{"keys": []}')
    bad.chmod(0o600)
    with pytest.raises(ConfigError, match="not a valid Bastion key set"):
        FileKeyProvider(bad).load()


def test_file_provider_notices_a_rewritten_key_file(tmp_path: Path) -> None:
    path = tmp_path / "kek.json"
    provider = FileKeyProvider(path)
    provider.store(KeySet(new_kek()))
    provider.load()
    assert not provider.changed()
    old = provider.load()
    FileKeyProvider(path).store(KeySet(new_kek(), (old.primary,)))
    assert provider.changed()
    assert provider.load().by_id(old.primary.key_id) is not None


def test_env_provider(monkeypatch: pytest.MonkeyPatch) -> None:
    primary, previous = os.urandom(32), os.urandom(32)
    monkeypatch.setenv("TEST_KEK", base64.b64encode(primary).decode())
    monkeypatch.setenv("TEST_KEK_PREVIOUS", base64.b64encode(previous).decode())
    keys = EnvKeyProvider("TEST_KEK").load()
    assert keys.primary.key == primary and [k.key for k in keys.others] == [previous]
    monkeypatch.setenv("TEST_KEK", base64.b64encode(b"short").decode())
    with pytest.raises(ConfigError, match="32 bytes"):
        EnvKeyProvider("TEST_KEK").load()
    monkeypatch.delenv("TEST_KEK")
    with pytest.raises(ConfigError, match="not set"):
        EnvKeyProvider("TEST_KEK").load()


def test_keyset_serialisation_round_trips() -> None:
    keys = KeySet(new_kek(), (new_kek(),))
    path_text = serialise_keyset(keys)
    from bastion.security.crypto import _parse_keyset

    parsed = _parse_keyset(path_text, "test")
    assert parsed.primary == keys.primary and parsed.others == keys.others


# -- the keyring against a real database -------------------------------------------------------------


@pytest.fixture
def db(tmp_path: Path) -> Iterator[Database]:
    url = f"sqlite:///{tmp_path / 'k.db'}"
    migrate(url)
    database = open_database(url)
    database.crypto = Keyring(KeySet(new_kek()), "aes-256-gcm")
    yield database
    asyncio.run(database.close())


def test_fields_round_trip_and_rows_written_in_plaintext_still_read(db: Database) -> None:
    sealed = db.run_sync(seal_field, "room", "!r:x", "event|$e|json", b'{"body":"hi"}')
    assert sealed[:2] == b"\xbaE"
    assert db.run_sync(unseal, "event|$e|json", sealed) == b'{"body":"hi"}'
    assert db.run_sync(unseal, "event|$e|json", b'{"plain":1}') == b'{"plain":1}'
    text = db.run_sync(seal_text, "user", "@a:x", "profile|@a:x|displayname", "Alice")
    assert text.startswith("enc:1:") and "Alice" not in text
    assert db.run_sync(unseal_text, "profile|@a:x|displayname", text) == "Alice"
    with pytest.raises(IntegrityError):
        db.run_sync(unseal_text, "profile|@b:x|displayname", text)


def test_one_data_key_per_scope_and_new_versions_keep_old_data_readable(db: Database) -> None:
    a1 = db.run_sync(seal_field, "room", "!a:x", "f|1", b"one")
    b1 = db.run_sync(seal_field, "room", "!b:x", "f|1", b"one")
    assert parse_header(a1)[1] != parse_header(b1)[1]
    db.run_sync(keys_store.start_new_versions, "room", ["!a:x"])
    a2 = db.run_sync(seal_field, "room", "!a:x", "f|2", b"two")
    assert parse_header(a2)[1] != parse_header(a1)[1]
    assert db.run_sync(unseal, "f|1", a1) == b"one"
    states = {(r[1], r[3]): r[7] for r in db.run_sync(keys_store.key_inventory)}
    assert states[("room", 1)] in ("retired", "active") and ("room", 2) in states


def test_destroyed_keys_make_ciphertext_unreadable_even_for_a_fresh_keyring(db: Database) -> None:
    blob = db.run_sync(seal_field, "room", "!gone:x", "f|1", b"secret")
    db.run_sync(keys_store.destroy_scope_keys, "room", "!gone:x")
    fresh = Keyring(db.crypto.keys, "aes-256-gcm")
    db.crypto = fresh
    with pytest.raises(IntegrityError):
        db.run_sync(unseal, "f|1", blob)
    # new data in the same scope gets a new key, not the destroyed one
    again = db.run_sync(seal_field, "room", "!gone:x", "f|2", b"new")
    assert db.run_sync(unseal, "f|2", again) == b"new"


def test_a_wrong_kek_cannot_unwrap_data_keys(db: Database) -> None:
    blob = db.run_sync(seal_field, "user", "@a:x", "f|1", b"secret")
    db.crypto = Keyring(KeySet(new_kek()), "aes-256-gcm")
    with pytest.raises(IntegrityError, match="not configured"):
        db.run_sync(unseal, "f|1", blob)


def test_rewrap_moves_every_key_to_the_new_kek(db: Database) -> None:
    blob = db.run_sync(seal_field, "user", "@a:x", "f|1", b"secret")
    old = db.crypto.keys.primary
    new = new_kek()
    db.crypto.reload(KeySet(new, (old,)))
    cursor, moved = db.run_sync(keys_store.rewrap_batch, 0, 100)
    assert cursor is None and moved == 1
    db.crypto = Keyring(KeySet(new), "aes-256-gcm")  # the old KEK is gone
    assert db.run_sync(unseal, "f|1", blob) == b"secret"
