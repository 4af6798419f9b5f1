"""matrix-nio with end-to-end encryption enabled, against a real Bastion over HTTP.

Every test is one asyncio program in which nio clients (Olm/Megolm from the
``vodozemac`` wheel, one on-disk crypto store each) do what an encrypting Matrix
client does: upload device and one-time keys, track device lists, claim keys, share
Megolm sessions over Olm-encrypted to-device messages, decrypt room events, run
interactive SAS verification, and back up and restore room keys.

What the tests prove about the server is end-to-end: a real client can talk
encrypted through it, restore history from its key backup on a new device, verify
devices through its to-device channel, and the server never holds plaintext.

nio 0.26 has no key-backup support, so the backup client is written here:
``m.megolm_backup.v1.curve25519-aes-sha2`` implemented from the spec with
``cryptography`` for uploading, and vodozemac's libolm-compatible ``PkDecryption``
(an independent implementation of the same algorithm) for restoring.
"""

from __future__ import annotations

import asyncio
import base64
import json
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import pytest
import vodozemac
from cryptography.hazmat.primitives import hashes, hmac, padding
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from nio import (
    AsyncClient,
    AsyncClientConfig,
    JoinResponse,
    KeysClaimResponse,
    KeysQueryResponse,
    KeysUploadError,
    KeysUploadResponse,
    KeyVerificationEvent,
    LoginResponse,
    MegolmEvent,
    RoomCreateEvent,
    RoomCreateResponse,
    RoomKeyEvent,
    RoomMessagesResponse,
    RoomMessageText,
    RoomSendResponse,
    ShareGroupSessionResponse,
    SyncResponse,
    ToDeviceResponse,
)
from nio.api import Api
from nio.crypto import SasState
from nio.crypto.key_export import encrypt_and_save

from tests.harness import MatrixHttp, ServerProcess

SCENARIO_TIMEOUT = 60.0  # seconds per test; every wait below is bounded on its own too
MEGOLM = "m.megolm.v1.aes-sha2"
BACKUP_ALGORITHM = "m.megolm_backup.v1.curve25519-aes-sha2"
ENCRYPTION_STATE = {"type": "m.room.encryption", "state_key": "", "content": {"algorithm": MEGOLM}}


# -- helpers -----------------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def _quiet_nio_logs(caplog: pytest.LogCaptureFixture) -> None:
    """nio logs every crypto step at INFO; keep failure reports readable."""
    caplog.set_level("WARNING", logger="nio")


def run(scenario: Callable[[], Awaitable[None]]) -> None:
    async def bounded() -> None:
        await asyncio.wait_for(scenario(), SCENARIO_TIMEOUT)

    asyncio.run(bounded())


def marker(label: str) -> str:
    """A message body that occurs nowhere else (ASCII, so byte searches are exact)."""
    return f"{label}-{uuid.uuid4().hex}"


def b64(data: bytes) -> str:
    return base64.b64encode(data).rstrip(b"=").decode()


def seg(value: str) -> str:
    """One URL path segment: Megolm session ids are base64 and may contain '/' and '+'."""
    return quote(value, safe="")


def unb64(text: str) -> bytes:
    return base64.b64decode(text + "=" * (-len(text) % 4))


class Clients:
    """Logs encrypting nio clients in (one crypto store directory each); closes them all."""

    def __init__(self, server: ServerProcess, tmp_path: Path) -> None:
        self.server = server
        self.tmp_path = tmp_path
        self.opened: list[AsyncClient] = []

    async def login(self, user: MatrixHttp, device_name: str) -> AsyncClient:
        store = self.tmp_path / f"nio-store-{uuid.uuid4().hex[:8]}"
        store.mkdir()
        config = AsyncClientConfig(encryption_enabled=True, store_sync_tokens=True)
        client = AsyncClient(self.server.base_url, user.user_id, store_path=str(store), config=config)
        self.opened.append(client)
        resp = await client.login(user.password, device_name=device_name)
        assert isinstance(resp, LoginResponse), resp
        client.load_store()  # login already loads it; a no-op then
        assert client.olm is not None, "nio did not load its crypto store"
        assert client.should_upload_keys
        uploaded = await client.keys_upload()
        assert isinstance(uploaded, KeysUploadResponse), uploaded
        # nio uploads as many one-time keys as the account holds; the server counts them all.
        assert uploaded.signed_curve25519_count == client.olm.account.max_one_time_keys
        return client

    async def new_user(self, device_name: str) -> tuple[AsyncClient, MatrixHttp]:
        user = self.server.client().register()
        return await self.login(user, device_name), user

    async def close(self) -> None:
        for client in self.opened:
            await client.close()


def scenario_with_clients(server: ServerProcess, tmp_path: Path, body: Callable[[Clients], Awaitable[None]]) -> None:
    async def scenario() -> None:
        clients = Clients(server, tmp_path)
        try:
            await body(clients)
        finally:
            await clients.close()

    run(scenario)


async def api(client: AsyncClient, method: str, path: str, body: Any = None, *,
              params: dict[str, Any] | None = None, expect: int = 200) -> Any:
    """A raw client-server call with the nio client's access token (for what nio does not wrap)."""
    async with httpx.AsyncClient(base_url=client.homeserver, timeout=10) as http:
        resp = await http.request(method, path, json=body, params=params,
                                  headers={"Authorization": f"Bearer {client.access_token}"})
    assert resp.status_code == expect, f"{method} {path} -> {resp.status_code} {resp.text}"
    return resp.json()


async def pump(client: AsyncClient) -> SyncResponse:
    """One iteration of what nio's sync_forever does: sync, then the crypto housekeeping
    (upload one-time keys, query changed device lists, claim keys, send queued to-device)."""
    resp = await client.sync(timeout=200)
    assert isinstance(resp, SyncResponse), resp
    if client.should_upload_keys:
        up = await client.keys_upload()
        assert isinstance(up, KeysUploadResponse), up
    if client.should_query_keys:
        queried = await client.keys_query()
        assert isinstance(queried, KeysQueryResponse), queried
    if client.should_claim_keys:
        claimed = await client.keys_claim(client.get_users_for_key_claiming())
        assert isinstance(claimed, KeysClaimResponse), claimed
    for sent in await client.send_to_device_messages():
        assert isinstance(sent, ToDeviceResponse), sent
    return resp


async def pump_until(clients: list[AsyncClient], done: Callable[[], bool], what: str, timeout: float = 15.0) -> None:
    """Pump every client in turn until ``done()`` holds; always pumps at least once."""
    deadline = time.monotonic() + timeout
    while True:
        for client in clients:
            await pump(client)
        if done():
            return
        assert time.monotonic() < deadline, f"never saw {what}"


class Inbox:
    """Room messages a client received through sync: decrypted ones and undecryptable ones."""

    def __init__(self, client: AsyncClient) -> None:
        self.texts: list[RoomMessageText] = []
        self.undecryptable: list[MegolmEvent] = []
        self.room_keys: list[RoomKeyEvent] = []
        client.add_event_callback(self._on_text, RoomMessageText)
        client.add_event_callback(self._on_megolm, MegolmEvent)
        client.add_to_device_callback(self._on_room_key, RoomKeyEvent)

    async def _on_text(self, room: Any, event: RoomMessageText) -> None:
        self.texts.append(event)

    async def _on_megolm(self, room: Any, event: MegolmEvent) -> None:
        self.undecryptable.append(event)

    async def _on_room_key(self, event: RoomKeyEvent) -> None:
        self.room_keys.append(event)

    def by_body(self, body: str) -> RoomMessageText | None:
        return next((e for e in self.texts if e.body == body), None)


async def encrypted_room(alice: AsyncClient, *others: AsyncClient, name: str | None = None) -> str:
    """alice creates an encrypted room (m.room.encryption in initial_state), the others
    join; every client has synced it as encrypted with every member in it."""
    extra = {"name": name} if name else {}
    created = await alice.room_create(invite=[o.user_id for o in others if o.user_id != alice.user_id],
                                      initial_state=[ENCRYPTION_STATE], **extra)
    assert isinstance(created, RoomCreateResponse), created
    room_id = created.room_id
    for other in others:
        if other.user_id != alice.user_id:
            joined = await other.join(room_id)
            assert isinstance(joined, JoinResponse), joined
    members = {alice.user_id, *(o.user_id for o in others)}
    everyone = [alice, *others]

    def synced() -> bool:
        return all(room_id in c.rooms and c.rooms[room_id].encrypted and set(c.rooms[room_id].users) == members
                   for c in everyone)

    await pump_until(everyone, synced, "the encrypted room on every client")
    return room_id


async def send_encrypted(client: AsyncClient, room_id: str, body: str) -> str:
    resp = await client.room_send(room_id, "m.room.message", {"msgtype": "m.text", "body": body},
                                  ignore_unverified_devices=True)
    assert isinstance(resp, RoomSendResponse), resp
    return resp.event_id


async def history(client: AsyncClient, room_id: str) -> list[Any]:
    """The room's timeline through /messages (nio decrypts what it can), oldest first."""
    token = client.next_batch
    events: list[Any] = []
    for _ in range(20):
        page = await client.room_messages(room_id, start=token, limit=10)
        assert isinstance(page, RoomMessagesResponse), page
        events.extend(page.chunk)
        if not page.chunk or page.end is None or isinstance(page.chunk[-1], RoomCreateEvent):
            break
        token = page.end
    assert events and isinstance(events[-1], RoomCreateEvent), "did not paginate back to m.room.create"
    return list(reversed(events))


# -- m.megolm_backup.v1.curve25519-aes-sha2 (client side, from the spec) -----------------------


def _backup_keys(shared_secret: bytes) -> tuple[bytes, bytes, bytes]:
    okm = HKDF(algorithm=hashes.SHA256(), length=80, salt=b"\0" * 32, info=b"").derive(shared_secret)
    return okm[:32], okm[32:64], okm[64:]


def _empty_mac(mac_key: bytes) -> bytes:
    # Spec step 5 (with the libolm bug every implementation kept): HMAC over the empty string.
    h = hmac.HMAC(mac_key, hashes.SHA256())
    h.update(b"")
    return h.finalize()[:8]


def backup_encrypt(public_key: str, session: dict[str, Any]) -> dict[str, str]:
    """Spec steps 1-5: ECDH with an ephemeral key, HKDF-SHA-256 to 80 bytes, AES-256-CBC
    with PKCS#7, and the (empty-input) HMAC-SHA-256 truncated to 8 bytes."""
    ephemeral = X25519PrivateKey.generate()
    shared = ephemeral.exchange(X25519PublicKey.from_public_bytes(unb64(public_key)))
    aes_key, mac_key, iv = _backup_keys(shared)
    padder = padding.PKCS7(128).padder()
    padded = padder.update(json.dumps(session).encode()) + padder.finalize()
    encryptor = Cipher(algorithms.AES(aes_key), modes.CBC(iv)).encryptor()
    ciphertext = encryptor.update(padded) + encryptor.finalize()
    return {
        "ephemeral": b64(ephemeral.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)),
        "ciphertext": b64(ciphertext),
        "mac": b64(_empty_mac(mac_key)),
    }


def backup_decrypt(private_key: bytes, session_data: dict[str, str]) -> dict[str, Any]:
    """Restore with vodozemac's libolm-compatible PkDecryption: a second, independent
    implementation, so the test's encryptor cannot agree only with itself."""
    decryption = vodozemac.PkDecryption.from_key(vodozemac.Curve25519SecretKey.from_bytes(private_key))
    message = vodozemac.Message.from_base64(session_data["ciphertext"], session_data["mac"], session_data["ephemeral"])
    return json.loads(decryption.decrypt(message))


# -- 1. encrypted conversation -----------------------------------------------------------------


def test_two_nio_clients_exchange_megolm_encrypted_messages(server: ServerProcess, tmp_path: Path) -> None:
    async def body(c: Clients) -> None:
        alice, _ = await c.new_user("alice phone")
        bob, _ = await c.new_user("bob laptop")
        inbox = {alice.user_id: Inbox(alice), bob.user_id: Inbox(bob)}
        room_id = await encrypted_room(alice, bob)

        sent: list[tuple[AsyncClient, AsyncClient, str, str]] = []  # sender, receiver, body, event id
        for i in range(3):  # interleaved, so both Megolm sessions are in use at once
            for sender, receiver in ((alice, bob), (bob, alice)):
                text = marker(f"{sender.user_id[1:4]} says {i}")
                event_id = await send_encrypted(sender, room_id, text)
                sent.append((sender, receiver, text, event_id))
                await pump_until([receiver, sender], lambda t=text, r=receiver: inbox[r.user_id].by_body(t) is not None,
                                 f"{receiver.user_id} decrypting {text!r}")

        for sender, receiver, text, event_id in sent:
            got = inbox[receiver.user_id].by_body(text)
            assert got is not None and got.decrypted, text
            assert got.event_id == event_id and got.sender == sender.user_id
            assert got.session_id == sender.olm.outbound_group_sessions[room_id].id
            assert got.sender_key == sender.olm.account.identity_keys["curve25519"]
            # What the server stores and serves is m.room.encrypted: Megolm ciphertext, no body.
            raw = await api(receiver, "GET", f"/_matrix/client/v3/rooms/{seg(room_id)}/event/{seg(event_id)}")
            assert raw["type"] == "m.room.encrypted", raw
            content = raw["content"]
            assert content["algorithm"] == MEGOLM and content["ciphertext"], raw
            assert content["session_id"] == got.session_id and content["sender_key"] == got.sender_key
            assert "body" not in content and text not in json.dumps(raw)
        for client in (alice, bob):
            assert inbox[client.user_id].undecryptable == [], "a message arrived before its room key"

        # The Megolm session keys travelled as Olm-encrypted to-device messages.
        for receiver, sender in ((bob, alice), (alice, bob)):
            keys = [k for k in inbox[receiver.user_id].room_keys if k.sender == sender.user_id]
            assert [(k.room_id, k.session_id, k.algorithm) for k in keys] == [
                (room_id, sender.olm.outbound_group_sessions[room_id].id, MEGOLM)]
            assert keys[0].sender_key == sender.olm.account.identity_keys["curve25519"]  # came over Olm

        # Each side claimed one of the other's one-time keys; the count in /sync fell and
        # nio topped it up again.
        for client in (alice, bob):
            max_keys = client.olm.account.max_one_time_keys
            await pump_until([client], lambda cl=client, m=max_keys: cl.olm.uploaded_key_count == m,
                             f"{client.user_id}'s one-time keys topped up")
        claim = await api(alice, "POST", "/_matrix/client/v3/keys/claim",
                          {"one_time_keys": {bob.user_id: {bob.device_id: "signed_curve25519"}}})
        [(key_id, otk)] = claim["one_time_keys"][bob.user_id][bob.device_id].items()
        assert key_id.startswith("signed_curve25519:")
        assert alice.olm.verify_json(dict(otk), bob.olm.account.identity_keys["ed25519"], bob.user_id, bob.device_id)
        resp = await bob.sync(timeout=0)
        assert isinstance(resp, SyncResponse)
        assert resp.device_key_count.signed_curve25519 == bob.olm.account.max_one_time_keys - 1

    scenario_with_clients(server, tmp_path, body)


# -- 2. key backup round trip ------------------------------------------------------------------


def test_key_backup_restores_history_on_a_new_device(server: ServerProcess, tmp_path: Path) -> None:
    async def body(c: Clients) -> None:
        alice, alice_http = await c.new_user("alice phone")
        bob, _ = await c.new_user("bob laptop")
        inbox = {alice.user_id: Inbox(alice), bob.user_id: Inbox(bob)}
        room_id = await encrypted_room(alice, bob)

        bodies: list[str] = []
        for sender, receiver in ((alice, bob), (bob, alice), (alice, bob), (bob, alice)):
            text = marker("history")
            bodies.append(text)
            await send_encrypted(sender, room_id, text)
            await pump_until([receiver, sender], lambda t=text, r=receiver: inbox[r.user_id].by_body(t) is not None,
                             f"{receiver.user_id} decrypting {text!r}")

        # alice sets up backup: a Curve25519 key pair whose private half is her recovery key.
        recovery = X25519PrivateKey.generate()
        recovery_key = recovery.private_bytes_raw()
        auth_data: dict[str, Any] = {"public_key": b64(recovery.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw))}
        auth_data["signatures"] = {alice.user_id: {f"ed25519:{alice.device_id}": alice.olm.sign_json(auth_data)}}
        created = await api(alice, "POST", "/_matrix/client/v3/room_keys/version",
                            {"algorithm": BACKUP_ALGORITHM, "auth_data": auth_data})
        version = created["version"]

        sessions = [s for s in alice.olm.inbound_group_store if s.room_id == room_id]
        assert {s.sender_key for s in sessions} == {alice.olm.account.identity_keys["curve25519"],
                                                    bob.olm.account.identity_keys["curve25519"]}
        backed_up: dict[str, Any] = {}
        for session in sessions:
            plain = {
                "algorithm": MEGOLM,
                "sender_key": session.sender_key,
                "sender_claimed_keys": {"ed25519": session.ed25519},
                "forwarding_curve25519_key_chain": session.forwarding_chain,
                "session_key": session.export_session(session.first_known_index),
            }
            backed_up[session.id] = {
                "first_message_index": session.first_known_index,
                "forwarded_count": len(session.forwarding_chain),
                "is_verified": False,
                "session_data": backup_encrypt(auth_data["public_key"], plain),
            }
        # The sanity check of the test's own encryptor: vodozemac decrypts what it made.
        first = next(iter(backed_up.values()))
        assert backup_decrypt(recovery_key, first["session_data"])["sender_key"] in {s.sender_key for s in sessions}
        put = await api(alice, "PUT", "/_matrix/client/v3/room_keys/keys", {"rooms": {room_id: {"sessions": backed_up}}},
                        params={"version": version})
        assert put["count"] == len(sessions) == 2, put

        # A message after the backup, in alice's same Megolm session (a later ratchet index):
        # the key backed up at index 0 must decrypt it too.
        late = marker("after backup")
        bodies.append(late)
        await send_encrypted(alice, room_id, late)
        await pump_until([bob, alice], lambda: inbox[bob.user_id].by_body(late) is not None, "bob decrypting the late message")

        # Later alice signs in on a new device, which has none of the room keys.
        alice2 = await c.login(alice_http, "alice new laptop")
        await pump_until([alice2], lambda: room_id in alice2.rooms and alice2.rooms[room_id].encrypted, "the room on alice2")
        await pump_until([alice2], lambda: alice.device_id in alice2.device_store[alice.user_id],
                         "alice2 learning alice's first device")
        before = [e for e in await history(alice2, room_id) if isinstance(e, (MegolmEvent, RoomMessageText))]
        assert len(before) == len(bodies) and all(isinstance(e, MegolmEvent) for e in before), before

        # It finds the backup and checks it was made by one of alice's devices.
        current = await api(alice2, "GET", "/_matrix/client/v3/room_keys/version")
        assert current["version"] == version and current["algorithm"] == BACKUP_ALGORITHM
        assert current["count"] == 2 and current["etag"] == put["etag"]
        signer = alice2.device_store[alice.user_id][alice.device_id]
        assert alice2.olm.verify_json(json.loads(json.dumps(current["auth_data"])), signer.ed25519,
                                      alice.user_id, alice.device_id), current["auth_data"]

        # Download everything and decrypt it with the recovery key.
        everything = await api(alice2, "GET", "/_matrix/client/v3/room_keys/keys", params={"version": version})
        assert set(everything["rooms"]) == {room_id}
        downloaded = everything["rooms"][room_id]["sessions"]
        assert set(downloaded) == set(backed_up)
        # The narrower routes serve the same data (session ids are base64: '/' and '+' escaped).
        per_room = await api(alice2, "GET", f"/_matrix/client/v3/room_keys/keys/{seg(room_id)}", params={"version": version})
        assert per_room == {"sessions": downloaded}
        for session_id in downloaded:
            one = await api(alice2, "GET", f"/_matrix/client/v3/room_keys/keys/{seg(room_id)}/{seg(session_id)}",
                            params={"version": version})
            assert one == downloaded[session_id]
        exported = []
        for session_id, data in downloaded.items():
            assert data["session_data"] == backed_up[session_id]["session_data"]
            assert data["first_message_index"] == backed_up[session_id]["first_message_index"]
            restored = backup_decrypt(recovery_key, data["session_data"])
            assert restored["algorithm"] == MEGOLM
            exported.append({**restored, "room_id": room_id, "session_id": session_id})

        # Import them the way nio imports keys (the spec's key export file format).
        key_file = tmp_path / "restored-keys.txt"
        encrypt_and_save(json.dumps(exported).encode(), str(key_file), "restore", count=1000)
        await alice2.import_keys(str(key_file), "restore")

        after = [e for e in await history(alice2, room_id) if isinstance(e, (MegolmEvent, RoomMessageText))]
        assert [type(e).__name__ for e in after] == ["RoomMessageText"] * len(bodies), after
        assert [e.body for e in after] == bodies
        assert [e.sender for e in after] == [alice.user_id, bob.user_id, alice.user_id, bob.user_id, alice.user_id]

        # Going forward the new device needs no backup: bob's client learns of it from
        # device_lists.changed and shares his session with it.
        await pump_until([bob], lambda: alice2.device_id in bob.device_store[alice.user_id], "bob learning alice2")
        live_inbox = Inbox(alice2)
        live = marker("live to the new device")
        await send_encrypted(bob, room_id, live)
        await pump_until([alice2, bob], lambda: live_inbox.by_body(live) is not None, "alice2 decrypting bob's new message")

    scenario_with_clients(server, tmp_path, body)


# -- 3. interactive verification ---------------------------------------------------------------


def test_sas_verification_between_two_devices_of_one_user(server: ServerProcess, tmp_path: Path) -> None:
    async def body(c: Clients) -> None:
        first, user = await c.new_user("alice phone")
        second = await c.login(user, "alice laptop")
        seen: dict[str, list[str]] = {first.device_id: [], second.device_id: []}

        def recorder(client: AsyncClient) -> Callable[[KeyVerificationEvent], Awaitable[None]]:
            async def record(event: KeyVerificationEvent) -> None:
                assert event.sender == user.user_id
                seen[client.device_id].append(event.source["type"])
            return record

        for client in (first, second):
            client.add_to_device_callback(recorder(client), KeyVerificationEvent)

        # A room alice's devices share makes nio track her device list (as it does for any
        # user in an encrypted room); each device learns the other from device_lists.changed.
        room_id = await encrypted_room(first, second)
        await pump_until([first, second],
                         lambda: second.device_id in first.device_store[user.user_id]
                         and first.device_id in second.device_store[user.user_id],
                         "each device in the other's device store")
        other = first.device_store[user.user_id][second.device_id]
        assert not other.verified

        started = await first.start_key_verification(other)
        assert isinstance(started, ToDeviceResponse), started
        [transaction] = list(first.key_verifications)

        await pump_until([second], lambda: transaction in second.key_verifications, "the verification start")
        accepted = await second.accept_key_verification(transaction)
        assert isinstance(accepted, ToDeviceResponse), accepted
        ours, theirs = first.key_verifications[transaction], second.key_verifications[transaction]
        # accept -> first shares its key -> second shares its key -> both can show the SAS.
        await pump_until([first, second], lambda: ours.state == theirs.state == SasState.key_received,
                         "the SAS key exchange")
        assert ours.get_emoji() == theirs.get_emoji() and len(ours.get_emoji()) == 7
        assert ours.get_decimals() == theirs.get_decimals()

        for client in (first, second):  # the user compares the emoji and taps "they match" on both
            confirmed = await client.confirm_short_auth_string(transaction)
            assert isinstance(confirmed, ToDeviceResponse), confirmed
        await pump_until([first, second], lambda: ours.verified and theirs.verified, "both MACs")
        assert not ours.canceled and not theirs.canceled
        assert first.device_store[user.user_id][second.device_id].verified
        assert second.device_store[user.user_id][first.device_id].verified
        assert seen[second.device_id] == ["m.key.verification.start", "m.key.verification.key", "m.key.verification.mac"]
        assert seen[first.device_id] == ["m.key.verification.accept", "m.key.verification.key", "m.key.verification.mac"]

        # The verification is what it is for: a message from the verified device decrypts as verified.
        inbox = Inbox(second)
        text = marker("from a verified device")
        await send_encrypted(first, room_id, text)
        await pump_until([second], lambda: inbox.by_body(text) is not None, "the message from the verified device")
        got = inbox.by_body(text)
        assert got is not None and got.decrypted and got.verified

    scenario_with_clients(server, tmp_path, body)


# -- 4. the database holds no plaintext --------------------------------------------------------


def _database_dump(server: ServerProcess) -> bytes:
    if not server.database_url.startswith("postgres"):
        db = server.directory / "bastion.db"
        assert db.exists(), f"no SQLite database at {db}"
        parts = [db.read_bytes()]
        for suffix in ("-wal", "-journal"):
            extra = db.with_name(db.name + suffix)
            if extra.exists():
                parts.append(extra.read_bytes())
        return b"\n".join(parts)
    import psycopg

    out: list[str] = []
    with psycopg.connect(server.database_url) as conn:
        tables = conn.execute(
            "SELECT table_schema, table_name FROM information_schema.tables "
            "WHERE table_type = 'BASE TABLE' AND table_schema NOT IN ('pg_catalog', 'information_schema')"
        ).fetchall()
        assert tables, "no tables found"
        for schema, table in tables:
            for (row,) in conn.execute(f'SELECT t::text FROM "{schema}"."{table}" t'):
                out.append(row)
    return "\n".join(out).encode()


def _found(haystack: bytes, needle: str) -> bool:
    # Plain text, or the hex form a bytea column prints as.
    return needle.encode() in haystack or needle.encode().hex().encode() in haystack


def test_database_holds_no_plaintext_of_encrypted_messages(make_server: Any, tmp_path: Path) -> None:
    """End-to-end encryption alone keeps messages out of the database: the server runs
    with encryption at rest switched *off*, so the positive control below (a plain room)
    is visible to the scan and only E2EE protects the secrets. (With encryption at rest
    on, nothing is visible at all: tests/integration/test_encryption_at_rest.py.)"""
    server: ServerProcess = make_server(encryption={"enabled": False})
    secrets: list[str] = []
    controls: list[str] = []

    async def body(c: Clients) -> None:
        alice, _ = await c.new_user("alice phone")
        bob, _ = await c.new_user("bob laptop")
        room_name = marker("visible room name")
        controls.append(room_name)
        inbox = {alice.user_id: Inbox(alice), bob.user_id: Inbox(bob)}
        room_id = await encrypted_room(alice, bob, name=room_name)
        for client in (alice, bob):
            # Share the Megolm session first, so the key as sent (index 0) can be searched for.
            shared = await client.share_group_session(room_id, ignore_unverified_devices=True)
            assert isinstance(shared, ShareGroupSessionResponse), shared
            secrets.append(client.olm.outbound_group_sessions[room_id].session_key)
        for sender, receiver in ((alice, bob), (bob, alice), (alice, bob)):
            text = marker("secret")
            secrets.append(text)
            event_id = await send_encrypted(sender, room_id, text)
            stored = await api(receiver, "GET", f"/_matrix/client/v3/rooms/{seg(room_id)}/event/{seg(event_id)}")
            controls.append(stored["content"]["ciphertext"])  # the encrypted events are in what is scanned
            await pump_until([receiver, sender], lambda t=text, r=receiver: inbox[r.user_id].by_body(t) is not None,
                             f"{receiver.user_id} decrypting {text!r}")
        # Positive control: a message in an unencrypted room is stored in plain text, so a
        # scan that finds nothing is not a scan that cannot see.
        plain_room = await alice.room_create()
        assert isinstance(plain_room, RoomCreateResponse), plain_room
        await pump_until([alice], lambda: plain_room.room_id in alice.rooms, "the unencrypted room")
        assert not alice.rooms[plain_room.room_id].encrypted
        control = marker("plaintext control")
        controls.append(control)
        resp = await alice.room_send(plain_room.room_id, "m.room.message", {"msgtype": "m.text", "body": control})
        assert isinstance(resp, RoomSendResponse), resp

    scenario_with_clients(server, tmp_path, body)

    dump = _database_dump(server)
    for control in controls:
        assert _found(dump, control), f"the scan cannot see plain data ({control!r} not found)"
    leaked = [s for s in secrets if _found(dump, s)]
    assert leaked == [], f"plaintext in the database: {leaked}"
    log = server.log_path.read_bytes()
    assert [s for s in secrets if s.encode() in log] == []


# -- 5. tampered key uploads -------------------------------------------------------------------


def test_tampered_key_uploads_are_refused_and_keys_stay_intact(server: ServerProcess, tmp_path: Path) -> None:
    async def body(c: Clients) -> None:
        alice, _ = await c.new_user("alice phone")
        bob, _ = await c.new_user("bob laptop")
        real = dict(alice.olm.account.identity_keys)
        attacker = vodozemac.Account()
        attacker_keys = {"ed25519": attacker.ed25519_key.to_base64(), "curve25519": attacker.curve25519_key.to_base64()}

        def device_keys(curve: str, ed: str, sign: Callable[[str], str]) -> dict[str, Any]:
            keys = {
                "algorithms": ["m.olm.v1.curve25519-aes-sha2", MEGOLM],
                "device_id": alice.device_id,
                "user_id": alice.user_id,
                "keys": {f"curve25519:{alice.device_id}": curve, f"ed25519:{alice.device_id}": ed},
            }
            keys["signatures"] = {alice.user_id: {f"ed25519:{alice.device_id}": sign(Api.to_canonical_json(keys))}}
            return keys

        def attacker_sign(payload: str) -> str:
            return attacker.sign(payload.encode()).to_base64()

        def swap(keys: dict[str, Any], algorithm: str) -> dict[str, Any]:
            # A key replaced after signing: the signature is alice's, over other keys.
            return {**keys, "keys": {**keys["keys"], f"{algorithm}:{alice.device_id}": attacker_keys[algorithm]}}

        genuine = device_keys(real["curve25519"], real["ed25519"], alice.olm.account.sign)
        tampered = {
            "alice's keys signed by another key": device_keys(real["curve25519"], real["ed25519"], attacker_sign),
            "ed25519 key swapped after signing": swap(genuine, "ed25519"),
            "curve25519 key swapped after signing": swap(genuine, "curve25519"),
        }
        for what, keys in tampered.items():
            refused = await api(alice, "POST", "/_matrix/client/v3/keys/upload", {"device_keys": keys}, expect=400)
            assert refused["errcode"] == "M_INVALID_SIGNATURE", (what, refused)

        # nio's own upload path, with its signer swapped: one-time keys signed by another key.
        genuine_sign = alice.olm.sign_json
        alice.olm.sign_json = lambda payload: attacker_sign(Api.to_canonical_json(payload))  # type: ignore[method-assign]
        alice.olm.uploaded_key_count = alice.olm.account.max_one_time_keys - 2  # "two were used": upload two more
        try:
            failed = await alice.keys_upload()
        finally:
            alice.olm.sign_json = genuine_sign  # type: ignore[method-assign]
        assert isinstance(failed, KeysUploadError), failed
        assert failed.status_code == "M_INVALID_SIGNATURE", failed

        # Nothing changed: the same keys, still verifiably alice's, and no extra one-time keys.
        queried = await api(bob, "POST", "/_matrix/client/v3/keys/query", {"device_keys": {alice.user_id: []}})
        stored = queried["device_keys"][alice.user_id][alice.device_id]
        assert stored["keys"] == genuine["keys"]
        assert stored["signatures"][alice.user_id] == genuine["signatures"][alice.user_id]
        assert bob.olm.verify_json(json.loads(json.dumps(stored)), real["ed25519"], alice.user_id, alice.device_id)
        resp = await alice.sync(timeout=0)
        assert isinstance(resp, SyncResponse), resp
        assert resp.device_key_count.signed_curve25519 == alice.olm.account.max_one_time_keys

        # And alice's real identity still works end to end: bob sets up an Olm session from
        # what the server hands out and she decrypts his message.
        inbox = Inbox(alice)
        room_id = await encrypted_room(bob, alice)
        text = marker("still alice")
        await send_encrypted(bob, room_id, text)
        await pump_until([alice, bob], lambda: inbox.by_body(text) is not None, "alice decrypting bob's message")
        assert bob.device_store[alice.user_id][alice.device_id].ed25519 == real["ed25519"]

    scenario_with_clients(server, tmp_path, body)
