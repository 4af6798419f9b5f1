"""Event format for room versions 10/11: canonical JSON, hashes, signatures, IDs, redaction."""

from __future__ import annotations

import hashlib

import canonicaljson
import pytest
import signedjson.key
import signedjson.sign
from hypothesis import given, settings
from hypothesis import strategies as st

from bastion.core.canonical_json import check_event_values, encode_canonical
from bastion.core.events import build_event, compute_event_id, redact_pdu, verify_content_hash
from bastion.core.ids import decode_unpadded_b64, urlsafe_unpadded_b64
from bastion.core.room_versions import V10, V11
from bastion.core.signing import SigningKey
from bastion.errors import BadJson

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-(2**53) + 1, max_value=2**53 - 1) | st.text(),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(), children, max_size=4),
    max_leaves=20,
)


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.text(), json_values, max_size=6))
def test_canonical_json_matches_reference_implementation(value: dict) -> None:
    assert encode_canonical(value) == canonicaljson.encode_canonical_json(value)


def test_canonical_values_reject_floats_and_big_ints() -> None:
    check_event_values({"a": [1, {"b": -(2**53) + 1}], "s": "x"})
    with pytest.raises(BadJson):
        check_event_values({"a": 1.5})
    with pytest.raises(BadJson):
        check_event_values({"a": [{"b": 2**53}]})


def _event(key: SigningKey, version=V10, content=None, event_type="m.room.message", state_key=None, redacts=None):
    return build_event(
        room_version=version,
        room_id="!room:example.org",
        sender="@alice:example.org",
        event_type=event_type,
        content=content if content is not None else {"msgtype": "m.text", "body": "hello"},
        state_key=state_key,
        prev_events=["$prev"],
        auth_events=["$create", "$pl", "$member"],
        depth=5,
        origin_server_ts=1_700_000_000_000,
        signing_key=key,
        server_name="example.org",
        redacts=redacts,
    )


def test_signature_verifies_with_signedjson() -> None:
    key = SigningKey.generate()
    event = _event(key)
    verify_key = signedjson.key.decode_verify_key_bytes(key.key_id, decode_unpadded_b64(key.public_key_b64()))
    redacted = redact_pdu(event.pdu, V10)
    signedjson.sign.verify_signed_json(redacted, "example.org", verify_key)
    tampered = dict(redacted, depth=6)
    with pytest.raises(signedjson.sign.SignatureVerifyException):
        signedjson.sign.verify_signed_json(tampered, "example.org", verify_key)


def test_content_hash_and_reference_hash_follow_the_spec() -> None:
    key = SigningKey.generate()
    event = _event(key)
    assert verify_content_hash(event)
    body = {k: v for k, v in event.pdu.items() if k not in ("unsigned", "signatures", "hashes")}
    expected = hashlib.sha256(canonicaljson.encode_canonical_json(body)).digest()
    assert event.pdu["hashes"]["sha256"] == signedjson.key.encode_base64(expected)
    reference = {k: v for k, v in redact_pdu(event.pdu, V10).items() if k not in ("signatures", "unsigned")}
    ref_hash = hashlib.sha256(canonicaljson.encode_canonical_json(reference)).digest()
    assert event.event_id == "$" + urlsafe_unpadded_b64(ref_hash)


def test_event_id_is_stable_under_redaction_and_signatures() -> None:
    key = SigningKey.generate()
    event = _event(key)
    assert compute_event_id(redact_pdu(event.pdu, V10), V10) == event.event_id
    other_sig = dict(event.pdu, signatures={"other.org": {"ed25519:x": "abc"}})
    assert compute_event_id(other_sig, V10) == event.event_id
    changed = _event(key, content={"msgtype": "m.text", "body": "other"})
    # Content is covered by the content hash, which is part of the reference hash.
    assert changed.event_id != event.event_id


def test_redaction_v10_keeps_protocol_fields_only() -> None:
    pdu = {
        "type": "m.room.power_levels", "room_id": "!r:x", "sender": "@a:x", "state_key": "",
        "content": {"ban": 50, "invite": 0, "users": {"@a:x": 100}, "custom": True},
        "origin": "x", "membership": "join", "unsigned": {"age": 1}, "depth": 3,
        "prev_events": [], "auth_events": [], "origin_server_ts": 1, "hashes": {}, "signatures": {},
    }
    v10 = redact_pdu(pdu, V10)
    assert v10["content"] == {"ban": 50, "users": {"@a:x": 100}}  # 'invite' is not kept before v11
    assert "origin" in v10 and "membership" in v10 and "unsigned" not in v10
    v11 = redact_pdu(pdu, V11)
    assert v11["content"] == {"ban": 50, "invite": 0, "users": {"@a:x": 100}}
    assert "origin" not in v11 and "membership" not in v11


def test_redaction_v11_create_and_redaction_events() -> None:
    create = {"type": "m.room.create", "content": {"room_version": "11", "m.federate": False, "type": "m.space"}}
    assert redact_pdu(create, V11)["content"] == create["content"]
    assert redact_pdu(create, V10)["content"] == {}
    redaction = {"type": "m.room.redaction", "content": {"redacts": "$x", "reason": "spam"}}
    assert redact_pdu(redaction, V11)["content"] == {"redacts": "$x"}
    member = {"type": "m.room.member", "content": {"membership": "invite", "displayname": "A",
              "third_party_invite": {"display_name": "a", "signed": {"mxid": "@a:x"}}}}
    assert redact_pdu(member, V11)["content"] == {"membership": "invite", "third_party_invite": {"signed": {"mxid": "@a:x"}}}
    assert redact_pdu(member, V10)["content"] == {"membership": "invite"}


def test_v11_redacts_lives_in_content_and_client_form_has_both() -> None:
    key = SigningKey.generate()
    v11 = _event(key, V11, content={"reason": "x"}, event_type="m.room.redaction", redacts="$target")
    assert v11.pdu["content"]["redacts"] == "$target" and "redacts" not in v11.pdu
    assert v11.client_dict()["redacts"] == "$target"
    v10 = _event(key, V10, content={"reason": "x"}, event_type="m.room.redaction", redacts="$target")
    assert v10.pdu["redacts"] == "$target"
    client = v10.client_dict()
    assert client["redacts"] == "$target" and client["content"]["redacts"] == "$target"


def test_too_large_event_is_refused() -> None:
    key = SigningKey.generate()
    with pytest.raises(ValueError):
        _event(key, content={"body": "x" * 70_000})


def test_client_bytes_splice_age_and_transaction_id() -> None:
    import orjson

    key = SigningKey.generate()
    event = _event(key)
    event.txn_id = "txn1"
    event.txn_device_id = "DEV"
    own = orjson.loads(event.client_bytes(1_700_000_000_500, ("@alice:example.org", "DEV")))
    other = orjson.loads(event.client_bytes(1_700_000_000_500, ("@bob:example.org", "DEV")))
    assert own["unsigned"] == {"age": 500, "transaction_id": "txn1"}
    assert other["unsigned"] == {"age": 500}
    assert own["content"] == {"msgtype": "m.text", "body": "hello"}
    event.unsigned_static = {"prev_content": {"a": 1}}
    event.invalidate_client_cache()
    assert orjson.loads(event.client_bytes(1_700_000_000_000))["unsigned"] == {"age": 0, "prev_content": {"a": 1}}


def test_signing_key_round_trip(tmp_path) -> None:
    key = SigningKey.generate()
    path = tmp_path / "k"
    key.write(path)
    assert oct(path.stat().st_mode & 0o777) == "0o600"
    loaded = SigningKey.load(path)
    assert loaded.key_id == key.key_id and loaded.sign(b"x") == key.sign(b"x")
    with pytest.raises(ValueError):
        SigningKey.parse("ed25519 a_x notbase64!!")
