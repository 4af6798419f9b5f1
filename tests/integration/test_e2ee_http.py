"""End-to-end encryption support over HTTP, with keys signed for real (Ed25519).

These tests act as a client's crypto layer would: they generate device and
cross-signing keys, sign them with canonical JSON, and check what the server stores,
hands out and refuses.
"""

from __future__ import annotations

import base64
import uuid
from typing import Any

import canonicaljson
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from tests.harness import MatrixError, MatrixHttp, ServerProcess


def b64(data: bytes) -> str:
    return base64.b64encode(data).rstrip(b"=").decode()


class Signer:
    def __init__(self) -> None:
        self.key = Ed25519PrivateKey.generate()
        self.public = b64(self.key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw))

    def sign(self, obj: dict[str, Any], user_id: str, key_id: str) -> dict[str, Any]:
        payload = canonicaljson.encode_canonical_json({k: v for k, v in obj.items() if k not in ("signatures", "unsigned")})
        sig = b64(self.key.sign(payload))
        signatures = {u: dict(s) for u, s in obj.get("signatures", {}).items()}
        signatures.setdefault(user_id, {})[key_id] = sig
        return {**obj, "signatures": signatures}


def device_keys(user: MatrixHttp, signer: Signer) -> dict[str, Any]:
    keys = {
        "user_id": user.user_id,
        "device_id": user.device_id,
        "algorithms": ["m.olm.v1.curve25519-aes-sha2", "m.megolm.v1.aes-sha2"],
        "keys": {f"curve25519:{user.device_id}": b64(uuid.uuid4().bytes * 2), f"ed25519:{user.device_id}": signer.public},
    }
    return signer.sign(keys, user.user_id, f"ed25519:{user.device_id}")


def otks(user: MatrixHttp, signer: Signer, n: int, fallback: bool = False) -> dict[str, Any]:
    out = {}
    for _ in range(n):
        body: dict[str, Any] = {"key": b64(uuid.uuid4().bytes * 2)}
        if fallback:
            body["fallback"] = True
        out[f"signed_curve25519:{uuid.uuid4().hex[:8]}"] = signer.sign(body, user.user_id, f"ed25519:{user.device_id}")
    return out


@pytest.fixture
def pair(server: ServerProcess) -> tuple[MatrixHttp, MatrixHttp, str]:
    alice, bob = server.client().register(), server.client().register()
    room = alice.create_room(invite=[bob.user_id], initial_state=[
        {"type": "m.room.encryption", "content": {"algorithm": "m.megolm.v1.aes-sha2"}}])
    bob.join(room)
    return alice, bob, room


def test_upload_query_claim_and_fallback(pair) -> None:
    alice, bob, _ = pair
    signer = Signer()
    resp = bob.call("POST", "/_matrix/client/v3/keys/upload", {
        "device_keys": device_keys(bob, signer), "one_time_keys": otks(bob, signer, 2),
        "fallback_keys": otks(bob, signer, 1, fallback=True)})
    assert resp == {"one_time_key_counts": {"signed_curve25519": 2}}
    sync = bob.sync()
    assert sync["device_one_time_keys_count"] == {"signed_curve25519": 2}
    assert sync["device_unused_fallback_key_types"] == ["signed_curve25519"]
    bob.call("PUT", f"/_matrix/client/v3/devices/{bob.device_id}", {"display_name": "Bob's phone"})
    queried = alice.call("POST", "/_matrix/client/v3/keys/query", {"device_keys": {bob.user_id: []}})
    keys = queried["device_keys"][bob.user_id][bob.device_id]
    assert keys["keys"][f"ed25519:{bob.device_id}"] == signer.public
    assert keys["unsigned"] == {"device_display_name": "Bob's phone"}
    claimed = [alice.call("POST", "/_matrix/client/v3/keys/claim",
                          {"one_time_keys": {bob.user_id: {bob.device_id: "signed_curve25519"}}}) for _ in range(4)]
    ids = [next(iter(c["one_time_keys"][bob.user_id][bob.device_id])) for c in claimed]
    assert len(set(ids[:2])) == 2  # each one-time key handed out once
    assert ids[2] == ids[3]  # then the fallback key, again and again
    sync = bob.sync()
    assert sync["device_one_time_keys_count"] == {"signed_curve25519": 0}
    assert sync["device_unused_fallback_key_types"] == []  # the fallback key was used
    unknown = alice.call("POST", "/_matrix/client/v3/keys/claim", {"one_time_keys": {bob.user_id: {"NODEVICE": "signed_curve25519"}}})
    assert unknown["one_time_keys"] == {}


def test_bad_keys_are_refused_and_change_nothing(pair) -> None:
    _, bob, _ = pair
    signer, other = Signer(), Signer()
    good = device_keys(bob, signer)
    forged = {**good, "signatures": other.sign(good, bob.user_id, f"ed25519:{bob.device_id}")["signatures"]}
    for body, code in [
        ({"device_keys": forged}, "M_INVALID_SIGNATURE"),
        ({"device_keys": {**good, "user_id": "@someone:localhost"}}, "M_INVALID_PARAM"),
        ({"device_keys": {**good, "keys": "nope"}}, "M_BAD_JSON"),
        ({"device_keys": good, "one_time_keys": otks(bob, other, 1)}, "M_INVALID_SIGNATURE"),
        ({"one_time_keys": {"no-colon": "x"}}, "M_BAD_JSON"),
    ]:
        with pytest.raises(MatrixError) as err:
            bob.call("POST", "/_matrix/client/v3/keys/upload", body)
        assert err.value.status == 400 and err.value.errcode == code, body
    assert bob.call("POST", "/_matrix/client/v3/keys/query", {"device_keys": {bob.user_id: []}})["device_keys"][bob.user_id] == {}
    bob.call("POST", "/_matrix/client/v3/keys/upload", {"device_keys": good})
    key = otks(bob, signer, 1)
    bob.call("POST", "/_matrix/client/v3/keys/upload", {"one_time_keys": key})
    changed = {next(iter(key)): signer.sign({"key": "different"}, bob.user_id, f"ed25519:{bob.device_id}")}
    with pytest.raises(MatrixError) as err:
        bob.call("POST", "/_matrix/client/v3/keys/upload", {"one_time_keys": changed})
    assert err.value.errcode == "M_INVALID_PARAM"


def test_device_list_changes_reach_room_members(pair, server: ServerProcess) -> None:
    alice, bob, _ = pair
    since = alice.sync()["next_batch"]
    bob.call("POST", "/_matrix/client/v3/keys/upload", {"device_keys": device_keys(bob, Signer())})
    sync = alice.sync(since=since)
    assert bob.user_id in sync["device_lists"]["changed"]
    changes = alice.call("GET", "/_matrix/client/v3/keys/changes", params={"from": since, "to": sync["next_batch"]})
    assert bob.user_id in changes["changed"]
    stranger = server.client().register()
    since_s = stranger.sync()["next_batch"]
    bob.call("POST", "/_matrix/client/v3/keys/upload", {"device_keys": device_keys(bob, Signer())})
    assert bob.user_id not in stranger.sync(since=since_s)["device_lists"]["changed"]  # shares no room
    # deleting a device is a change too
    since = alice.sync()["next_batch"]
    bob.call("POST", "/_matrix/client/v3/logout", {})
    assert bob.user_id in alice.sync(since=since)["device_lists"]["changed"]


def test_device_lists_left_when_no_room_is_shared(pair) -> None:
    alice, bob, room = pair
    since = alice.sync()["next_batch"]
    bob.call("POST", f"/_matrix/client/v3/rooms/{room}/leave", {})
    assert bob.user_id in alice.sync(since=since)["device_lists"]["left"]


def test_to_device_exactly_once_and_wildcard(pair, server: ServerProcess) -> None:
    alice, bob, _ = pair
    bob2 = MatrixHttp(server.base_url, server.server_name)
    login = bob2.call("POST", "/_matrix/client/v3/login", {"type": "m.login.password", "identifier": {"type": "m.id.user", "user": bob.user_id}, "password": bob.password}, token=False)
    bob2.token, bob2.device_id, bob2.user_id = login["access_token"], login["device_id"], bob.user_id
    since1 = bob.sync()["next_batch"]
    since2 = bob2.sync()["next_batch"]
    alice.call("PUT", "/_matrix/client/v3/sendToDevice/m.test/t1", {"messages": {bob.user_id: {bob.device_id: {"n": 1}}}})
    alice.call("PUT", "/_matrix/client/v3/sendToDevice/m.test/t1", {"messages": {bob.user_id: {bob.device_id: {"n": 1}}}})  # retry
    alice.call("PUT", "/_matrix/client/v3/sendToDevice/m.test/t2", {"messages": {bob.user_id: {"*": {"n": 2}}}})
    first = bob.sync(since=since1)
    assert [e["content"]["n"] for e in first["to_device"]["events"]] == [1, 2]
    assert first["to_device"]["events"][0] == {"type": "m.test", "sender": alice.user_id, "content": {"n": 1}}
    # Repeating the same since (the client lost the response) gets them again: nothing acknowledged is lost.
    again = bob.sync(since=since1)
    assert [e["content"]["n"] for e in again["to_device"]["events"]] == [1, 2]
    # Syncing past them acknowledges: they are gone.
    assert bob.sync(since=first["next_batch"])["to_device"]["events"] == []
    assert [e["content"]["n"] for e in bob2.sync(since=since2)["to_device"]["events"]] == [2]
    with pytest.raises(MatrixError) as err:
        alice.call("PUT", "/_matrix/client/v3/sendToDevice/m.test/t3", {"messages": {bob.user_id: {bob.device_id: {"x": "y" * 70000}}}})
    assert err.value.status == 413


def test_to_device_kept_while_offline_and_paged(pair) -> None:
    alice, bob, _ = pair
    since = bob.sync()["next_batch"]
    for i in range(150):
        alice.call("PUT", f"/_matrix/client/v3/sendToDevice/m.test/p{i}", {"messages": {bob.user_id: {bob.device_id: {"i": i}}}})
    seen: list[int] = []
    for _ in range(5):
        sync = bob.sync(since=since)
        events = sync["to_device"]["events"]
        seen += [e["content"]["i"] for e in events]
        since = sync["next_batch"]
        if not events:
            break
    assert seen == list(range(150))


def test_cross_signing_and_signatures(pair) -> None:
    alice, bob, _ = pair
    device_signer = Signer()
    alice.call("POST", "/_matrix/client/v3/keys/upload", {"device_keys": device_keys(alice, device_signer)})
    master, ssk, usk = Signer(), Signer(), Signer()
    uid = alice.user_id

    def cs_key(signer: Signer, usage: str) -> dict[str, Any]:
        return {"user_id": uid, "usage": [usage], "keys": {f"ed25519:{signer.public}": signer.public}}

    master_key = cs_key(master, "master")
    self_signing = master.sign(cs_key(ssk, "self_signing"), uid, f"ed25519:{master.public}")
    user_signing = master.sign(cs_key(usk, "user_signing"), uid, f"ed25519:{master.public}")
    forged = Signer().sign(cs_key(ssk, "self_signing"), uid, f"ed25519:{master.public}")
    with pytest.raises(MatrixError) as err:
        alice.call("POST", "/_matrix/client/v3/keys/device_signing/upload", {"master_key": master_key, "self_signing_key": forged})
    assert err.value.errcode == "M_INVALID_SIGNATURE"
    with pytest.raises(MatrixError) as err:
        alice.call("POST", "/_matrix/client/v3/keys/device_signing/upload", {"self_signing_key": self_signing})
    assert err.value.errcode == "M_MISSING_PARAM"
    alice.call("POST", "/_matrix/client/v3/keys/device_signing/upload",
               {"master_key": master_key, "self_signing_key": self_signing, "user_signing_key": user_signing})
    # Uploading exactly the stored keys again (a retry after a lost response) needs no
    # password (spec v1.11+); replacing them does (user-interactive auth).
    alice.call("POST", "/_matrix/client/v3/keys/device_signing/upload",
               {"master_key": master_key, "self_signing_key": self_signing})
    resp = alice.raw("POST", "/_matrix/client/v3/keys/device_signing/upload",
                     json={"master_key": cs_key(Signer(), "master")})
    assert resp.status_code == 401 and "flows" in resp.json()
    # Sign the device with the self-signing key; bob sees the signature.
    stored = alice.call("POST", "/_matrix/client/v3/keys/query", {"device_keys": {uid: [alice.device_id]}})["device_keys"][uid][alice.device_id]
    unsigned = {k: v for k, v in stored.items() if k != "unsigned"}
    signed_device = ssk.sign(unsigned, uid, f"ed25519:{ssk.public}")
    result = alice.call("POST", "/_matrix/client/v3/keys/signatures/upload", {uid: {alice.device_id: signed_device}})
    assert result["failures"] == {}
    bad = Signer().sign(unsigned, uid, f"ed25519:{ssk.public}")
    failed = alice.call("POST", "/_matrix/client/v3/keys/signatures/upload", {uid: {alice.device_id: bad}})
    assert failed["failures"][uid][alice.device_id]["errcode"] == "M_INVALID_SIGNATURE"
    seen = bob.call("POST", "/_matrix/client/v3/keys/query", {"device_keys": {uid: []}})
    assert f"ed25519:{ssk.public}" in seen["device_keys"][uid][alice.device_id]["signatures"][uid]
    assert seen["master_keys"][uid]["keys"] == master_key["keys"]
    assert seen["self_signing_keys"][uid]["keys"] == self_signing["keys"]
    assert "user_signing_keys" not in seen  # only the owner sees their user-signing key
    mine = alice.call("POST", "/_matrix/client/v3/keys/query", {"device_keys": {uid: []}})
    assert mine["user_signing_keys"][uid]["keys"] == user_signing["keys"]



@pytest.mark.parametrize("signatures", ["x", -1, 1.5, True, [1, "a"], {"@someone:else": "x"}])
def test_a_signed_object_with_malformed_signatures_is_a_failure_not_a_crash(pair, signatures) -> None:
    """``signatures`` that is not an object of objects is reported for that key under
    ``failures`` (spec: POST /keys/signatures/upload), and nothing is stored."""
    alice, _, _ = pair
    alice.call("POST", "/_matrix/client/v3/keys/upload", {"device_keys": device_keys(alice, Signer())})
    uid = alice.user_id
    stored = alice.call("POST", "/_matrix/client/v3/keys/query", {"device_keys": {uid: [alice.device_id]}})["device_keys"][uid][alice.device_id]
    odd = {**{k: v for k, v in stored.items() if k not in ("unsigned", "signatures")}, "signatures": signatures}
    result = alice.call("POST", "/_matrix/client/v3/keys/signatures/upload", {uid: {alice.device_id: odd}})
    assert result["failures"][uid][alice.device_id]["errcode"] == "M_INVALID_SIGNATURE"
    after = alice.call("POST", "/_matrix/client/v3/keys/query", {"device_keys": {uid: [alice.device_id]}})["device_keys"][uid][alice.device_id]
    assert after["signatures"] == stored["signatures"]


def test_a_login_may_not_take_a_cross_signing_key_id_as_its_device_id(pair) -> None:
    """spec (POST /login, 403): the device ID may not be the same as a cross-signing key
    ID — both would sign as "ed25519:<id>", and clients could not tell them apart."""
    alice, _, _ = pair
    master = Signer()
    uid = alice.user_id
    alice.call("POST", "/_matrix/client/v3/keys/device_signing/upload", {
        "master_key": {"user_id": uid, "usage": ["master"], "keys": {f"ed25519:{master.public}": master.public}}})
    body = {"type": "m.login.password", "identifier": {"type": "m.id.user", "user": uid}, "password": alice.password}
    with pytest.raises(MatrixError) as err:
        alice.call("POST", "/_matrix/client/v3/login", {**body, "device_id": master.public}, token=False)
    assert err.value.status == 403 and err.value.errcode == "M_FORBIDDEN"
    devices = alice.call("GET", "/_matrix/client/v3/devices")["devices"]
    assert master.public not in [d["device_id"] for d in devices]
    assert alice.call("POST", "/_matrix/client/v3/login", {**body, "device_id": "ANOTHER"}, token=False)["device_id"] == "ANOTHER"

def test_key_backup_versions_and_keys(pair) -> None:
    _, bob, room = pair
    with pytest.raises(MatrixError) as err:
        bob.call("GET", "/_matrix/client/v3/room_keys/version")
    assert err.value.status == 404
    info = {"algorithm": "m.megolm_backup.v1.curve25519-aes-sha2", "auth_data": {"public_key": "abc", "signatures": {}}}
    version = bob.call("POST", "/_matrix/client/v3/room_keys/version", info)["version"]
    current = bob.call("GET", "/_matrix/client/v3/room_keys/version")
    assert current["version"] == version and current["count"] == 0
    session = {"first_message_index": 5, "forwarded_count": 0, "is_verified": False, "session_data": {"ciphertext": "c1", "ephemeral": "e", "mac": "m"}}
    put = bob.call("PUT", f"/_matrix/client/v3/room_keys/keys/{room}/sess1", session, params={"version": version})
    assert put["count"] == 1
    etag = put["etag"]
    worse = {**session, "first_message_index": 9, "session_data": {"ciphertext": "worse"}}
    assert bob.call("PUT", f"/_matrix/client/v3/room_keys/keys/{room}/sess1", worse, params={"version": version})["etag"] == etag
    better = {**session, "is_verified": True, "session_data": {"ciphertext": "better"}}
    after = bob.call("PUT", f"/_matrix/client/v3/room_keys/keys/{room}/sess1", better, params={"version": version})
    assert after["etag"] != etag
    got = bob.call("GET", f"/_matrix/client/v3/room_keys/keys/{room}/sess1", params={"version": version})
    assert got["session_data"] == {"ciphertext": "better"}
    everything = bob.call("GET", "/_matrix/client/v3/room_keys/keys", params={"version": version})
    assert list(everything["rooms"][room]["sessions"]) == ["sess1"]
    newer = bob.call("POST", "/_matrix/client/v3/room_keys/version", info)["version"]
    with pytest.raises(MatrixError) as err:
        bob.call("PUT", f"/_matrix/client/v3/room_keys/keys/{room}/sess2", session, params={"version": version})
    assert err.value.status == 403 and err.value.errcode == "M_WRONG_ROOM_KEYS_VERSION"
    assert err.value.body["current_version"] == newer
    bob.call("DELETE", f"/_matrix/client/v3/room_keys/version/{newer}")
    assert bob.call("GET", "/_matrix/client/v3/room_keys/version")["version"] == version
    bob.call("DELETE", f"/_matrix/client/v3/room_keys/keys/{room}", params={"version": version})
    assert bob.call("GET", "/_matrix/client/v3/room_keys/version")["count"] == 0
    with pytest.raises(MatrixError) as err:
        bob.call("PUT", f"/_matrix/client/v3/room_keys/keys/{room}/x", {"first_message_index": "0"}, params={"version": version})
    assert err.value.errcode == "M_BAD_JSON"


def test_encryption_by_default(make_server) -> None:
    srv = make_server(encryption_enabled_by_default_for_room_type="invite")
    user = srv.client().register()
    private = user.create_room()
    assert user.call("GET", f"/_matrix/client/v3/rooms/{private}/state/m.room.encryption/") == {"algorithm": "m.megolm.v1.aes-sha2"}
