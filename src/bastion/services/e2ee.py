"""End-to-end encryption support: device keys, one-time/fallback keys, cross-signing,
the device-list stream and to-device messages.

The server stores and hands out *public* keys and opaque ciphertext; it never needs a
private key or a plaintext. Everything a client signs is checked before it is stored
(a device's keys by the device's own Ed25519 key; one-time keys by the device;
self- and user-signing keys by the master key; signatures by the key they claim),
and a request with anything invalid changes nothing.

Changes to a user's devices or cross-signing keys are positions in the device-list
stream; ``/sync`` reports them (``device_lists.changed``) to users who share a room.
To-device messages are positions in the to-device stream, delivered to one device at
a time and deleted once that device syncs past them.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import replace
from typing import Any

import orjson
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from bastion.clock import now_ms
from bastion.cluster.replication import Replicator
from bastion.core.canonical_json import check_event_values, encode_canonical
from bastion.core.ids import MAX_DEVICE_ID_LENGTH, decode_unpadded_b64, is_valid_user_id, server_of
from bastion.errors import BadJson, InvalidParam, MatrixError, MissingParam, TooLarge
from bastion.services.caches import MembershipIndex, RoomCache
from bastion.services.requester import Requester
from bastion.storage import e2e as e2e_store
from bastion.storage import streams as streams_store
from bastion.storage.database import Database, Txn
from bastion.streams.notifier import Notifier

MAX_TO_DEVICE_CONTENT = 65536
TO_DEVICE_BATCH = 100
OTK_ALGORITHM = "signed_curve25519"


class InvalidSignature(MatrixError):
    errcode = "M_INVALID_SIGNATURE"


def verify_signed(obj: dict[str, Any], signer_user: str, key_id: str, public_key_b64: str) -> bool:
    """Matrix "Signing JSON": the signature over canonical JSON without signatures/unsigned."""
    signatures = obj.get("signatures")
    if not isinstance(signatures, dict):
        return False
    by_user = signatures.get(signer_user)
    sig = by_user.get(key_id) if isinstance(by_user, dict) else None
    if not isinstance(sig, str):
        return False
    payload = encode_canonical({k: v for k, v in obj.items() if k not in ("signatures", "unsigned")})
    try:
        Ed25519PublicKey.from_public_bytes(decode_unpadded_b64(public_key_b64)).verify(decode_unpadded_b64(sig), payload)
    except Exception:
        return False
    return True


def _strip(obj: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in obj.items() if k not in ("signatures", "unsigned")}


def _single_ed25519(key: dict[str, Any]) -> str:
    """The public key of a cross-signing key object (its one ``ed25519:<pub>`` entry)."""
    keys = key.get("keys")
    if not isinstance(keys, dict) or len(keys) != 1:
        raise InvalidParam("a cross-signing key must contain exactly one key")
    ((key_id, value),) = keys.items()
    if not isinstance(value, str) or key_id != f"ed25519:{value}":
        raise InvalidParam("cross-signing keys are named 'ed25519:<public key>'")
    return value


class KeysService:
    def __init__(
        self,
        db: Database,
        server_name: str,
        rooms: RoomCache,
        memberships: MembershipIndex,
        notifier: Notifier,
        replicator: Replicator,
    ) -> None:
        self._db = db
        self.server_name = server_name
        self._rooms = rooms
        self._memberships = memberships
        self._notifier = notifier
        self._replicator = replicator
        # Cached until a key upload or claim changes them: on this worker directly, on
        # others through the cache-invalidation stream (app._apply_invalidations).
        self._counts_generation = 0
        self._counts: dict[tuple[str, str], tuple[dict[str, int], list[str]]] = {}
        # Highest to-device position queued per device (0: nothing pending); unknown
        # devices are looked up once.
        self._pending: dict[tuple[str, str], int] = {}

    # -- streams ------------------------------------------------------------------------------

    async def _peers(self, user_id: str) -> set[str]:
        peers = {user_id}
        for room_id, membership in (await self._memberships.rooms_for(user_id)).items():
            if membership.membership == "join":
                room = self._rooms.cached(room_id) or await self._rooms.get(room_id)
                if room is not None:
                    peers |= room.joined
        return peers

    async def _device_lists_changed(self, users: Iterable[str], extra: Any = None) -> None:
        """Record device-list changes (after ``extra(txn)`` in the same transaction) and wake peers."""
        users = sorted(set(users))

        def txn_fn(txn: Txn) -> tuple[Any, int]:
            result = extra(txn) if extra is not None else None
            first = streams_store.allocate(txn, "device_lists", len(users)) if users else 0
            for offset, user in enumerate(users):
                e2e_store.add_device_list_change(txn, first + offset, user)
            return result, first

        result, first = await self._db.write(txn_fn)
        if users:
            async with self._replicator.lock("device_lists"):
                await self._replicator.before_local_apply("device_lists", first)
                self._replicator.after_local_apply("device_lists", first + len(users) - 1)
                self._notifier.advance(replace(self._notifier.current, device_lists=self._replicator.applied["device_lists"]))
            await self._wake_peers(users)
        return result

    async def _wake_peers(self, users: Iterable[str]) -> None:
        woken: set[str] = set()
        for user in users:
            woken |= await self._peers(user)
        self._notifier.notify_users(woken)

    # -- other workers' changes ------------------------------------------------------------------

    @staticmethod
    def load_device_list_changes(txn: Txn, after: int, upto: int) -> list[str]:
        return [r[0] for r in txn.fetchall(
            "SELECT DISTINCT user_id FROM device_list_changes WHERE stream_id > ? AND stream_id <= ?", (after, upto)
        )]

    async def apply_remote_device_lists(self, users: list[str], upto: int) -> None:
        self._notifier.advance(replace(self._notifier.current, device_lists=upto))
        await self._wake_peers(users)

    @staticmethod
    def load_to_device(txn: Txn, after: int, upto: int) -> list[tuple[int, str, str]]:
        rows = txn.fetchall(
            "SELECT stream_id, user_id, device_id FROM to_device_inbox WHERE stream_id > ? AND stream_id <= ?", (after, upto)
        )
        return [(int(r[0]), r[1], r[2]) for r in rows]

    async def apply_remote_to_device(self, rows: list[tuple[int, str, str]], upto: int) -> None:
        for stream_id, user_id, device_id in rows:
            # Recorded for devices not cached yet too: a read of their queue may be in
            # flight, and what it stores when it returns must not hide this message.
            key = (user_id, device_id)
            if self._pending.get(key, 0) < stream_id:
                self._pending[key] = stream_id
        self._notifier.advance(replace(self._notifier.current, to_device=upto))
        self._notifier.notify_users({u for _, u, _ in rows})

    async def device_deleted(self, user_id: str, device_ids: list[str]) -> None:
        for device_id in device_ids:
            self.forget_counts((user_id, device_id))
            self._pending.pop((user_id, device_id), None)

        def cleanup(txn: Txn) -> None:
            for device_id in device_ids:
                e2e_store.delete_device_e2e(txn, user_id, device_id)

        await self._device_lists_changed([user_id], cleanup)

    # -- upload ---------------------------------------------------------------------------------

    async def upload(self, requester: Requester, body: dict[str, Any]) -> dict[str, Any]:
        user, device = requester.user_id, requester.device_id
        if device is None:
            raise InvalidParam("This access token has no device")
        device_keys = body.get("device_keys")
        one_time = body.get("one_time_keys") or {}
        fallback = body.get("fallback_keys") or {}
        if not isinstance(one_time, dict) or not isinstance(fallback, dict):
            raise BadJson("'one_time_keys' and 'fallback_keys' must be objects")
        ed25519: str | None = None
        if device_keys is not None:
            ed25519 = self._check_device_keys(device_keys, user, device)
        existing = await self._db.read(e2e_store.get_device_keys, user, device)
        if ed25519 is None and existing is not None:
            ed25519 = existing.get("keys", {}).get(f"ed25519:{device}")
        otks = self._check_keys(one_time, user, device, ed25519, "one_time_keys")
        fbks = self._check_keys(fallback, user, device, ed25519, "fallback_keys")
        if len(otks) > 1000:
            raise InvalidParam("Upload at most 1000 one-time keys at a time")

        def txn_fn(txn: Txn) -> bool:
            clash = e2e_store.existing_one_time_keys(txn, user, device, [(a, k) for a, k, _ in otks])
            for (algorithm, key_id, raw) in otks:
                old = clash.get((algorithm, key_id))
                if old is not None and old != raw:
                    raise InvalidParam(f"One-time key {algorithm}:{key_id} already exists with different content")
            e2e_store.add_one_time_keys(txn, user, device, [(a, k, r) for a, k, r in otks])
            for algorithm, key_id, raw in fbks:
                e2e_store.set_fallback_key(txn, user, device, algorithm, key_id, raw)
            changed = False
            if device_keys is not None:
                current = e2e_store.get_device_keys(txn, user, device)
                if current is None or _strip(current) != _strip(device_keys) or current.get("signatures") != device_keys.get("signatures"):
                    e2e_store.set_device_keys(txn, user, device, _strip(device_keys) | {"signatures": device_keys["signatures"]})
                    changed = True
            return changed

        if device_keys is not None:
            changed_holder: dict[str, bool] = {}

            def with_change(txn: Txn) -> None:
                changed_holder["changed"] = txn_fn(txn)

            # Keys and the device-list change commit together.
            await self._device_lists_changed([user], with_change)
        else:
            await self._db.write(txn_fn)
        self.forget_counts((user, device))
        counts, _ = await self.counts(user, device)
        return {"one_time_key_counts": counts}

    def _check_device_keys(self, keys: Any, user: str, device: str) -> str:
        if not isinstance(keys, dict):
            raise BadJson("'device_keys' must be an object")
        if keys.get("user_id") != user or keys.get("device_id") != device:
            raise InvalidParam("device_keys must be for this user and device")
        algorithms = keys.get("algorithms")
        if not isinstance(algorithms, list) or not all(isinstance(a, str) for a in algorithms):
            raise BadJson("'algorithms' must be a list of strings")
        key_map = keys.get("keys")
        if not isinstance(key_map, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in key_map.items()):
            raise BadJson("'keys' must map key IDs to keys")
        ed25519 = key_map.get(f"ed25519:{device}")
        if ed25519 is None:
            raise BadJson(f"device keys need ed25519:{device}")
        check_event_values(keys, "device_keys")
        if not verify_signed(keys, user, f"ed25519:{device}", ed25519):
            raise InvalidSignature("The device keys are not signed by the device's Ed25519 key")
        return ed25519

    def _check_keys(self, keys: dict[str, Any], user: str, device: str, ed25519: str | None, what: str) -> list[tuple[str, str, bytes]]:
        out: list[tuple[str, str, bytes]] = []
        for full_id, value in keys.items():
            algorithm, sep, key_id = full_id.partition(":")
            if not sep or not algorithm or not key_id or len(full_id) > 255 or "\x00" in full_id:
                raise BadJson(f"{what} keys are named '<algorithm>:<key id>'")
            if isinstance(value, dict):
                check_event_values(value, what)
                if not isinstance(value.get("key"), str):
                    raise BadJson(f"{what}: signed keys need a 'key' string")
                if ed25519 is None or not verify_signed(value, user, f"ed25519:{device}", ed25519):
                    raise InvalidSignature(f"{what} {full_id} is not signed by the device")
            elif not isinstance(value, str):
                raise BadJson(f"{what} values are key strings or signed key objects")
            out.append((algorithm, key_id, orjson.dumps(value)))
        return out

    async def counts(self, user: str, device: str) -> tuple[dict[str, int], list[str]]:
        """(one-time key counts, unused fallback key algorithms) for a device; cached."""
        cached = self._counts.get((user, device))
        if cached is not None:
            return cached

        def load(txn: Txn) -> tuple[dict[str, int], list[str]]:
            return e2e_store.one_time_key_counts(txn, user, device), e2e_store.unused_fallback_algorithms(txn, user, device)

        generation = self._counts_generation
        counts, unused = await self._db.read(load)
        counts.setdefault(OTK_ALGORITHM, 0)
        if generation == self._counts_generation:  # else a change may have landed since the read began
            self._counts[(user, device)] = (counts, unused)
            if len(self._counts) > 100_000:
                self._counts.pop(next(iter(self._counts)))
        return counts, unused

    def forget_counts(self, device: tuple[str, str] | None = None) -> None:
        """Drop the cached counts of one (user, device), or of all devices."""
        self._counts_generation += 1
        if device is None:
            self._counts.clear()
        else:
            self._counts.pop(device, None)

    # -- query and claim ------------------------------------------------------------------------------

    async def query(self, requester: Requester, body: dict[str, Any]) -> dict[str, Any]:
        wanted = body.get("device_keys")
        if not isinstance(wanted, dict):
            raise BadJson("'device_keys' must map user IDs to lists of device IDs")
        result: dict[str, Any] = {"device_keys": {}, "master_keys": {}, "self_signing_keys": {}, "failures": {}}
        user_signing: dict[str, Any] = {}
        for user_id, devices in wanted.items():
            if not is_valid_user_id(user_id):
                raise InvalidParam(f"{user_id!r} is not a user ID")
            if not isinstance(devices, list) or not all(isinstance(d, str) for d in devices):
                raise BadJson("device lists must be lists of device IDs")
            if server_of(user_id) != self.server_name:
                result["failures"][server_of(user_id)] = {"errcode": "M_UNRECOGNIZED", "error": "This server does not federate"}
                continue

            def load(txn: Txn, user_id: str = user_id, devices: list[str] = devices) -> tuple[Any, Any, Any]:
                return (
                    e2e_store.query_device_keys(txn, user_id, devices),
                    e2e_store.get_cross_signing_keys(txn, user_id),
                    e2e_store.signatures_for(txn, user_id),
                )

            device_rows, cross, signatures = await self._db.read(load)
            extra: dict[str, dict[str, dict[str, str]]] = {}
            for target_key, signer_user, signer_key, signature in signatures:
                extra.setdefault(target_key, {}).setdefault(signer_user, {})[signer_key] = signature
            user_devices: dict[str, Any] = {}
            for device_id, (keys, display_name) in device_rows.items():
                keys = dict(keys)
                sigs = {u: dict(s) for u, s in (keys.get("signatures") or {}).items()}
                for signer_user, by_key in extra.get(device_id, {}).items():
                    sigs.setdefault(signer_user, {}).update(by_key)
                keys["signatures"] = sigs
                if display_name is not None:
                    keys["unsigned"] = {"device_display_name": display_name}
                user_devices[device_id] = keys
            result["device_keys"][user_id] = user_devices
            for usage, out_key in (("master", "master_keys"), ("self_signing", "self_signing_keys")):
                key = cross.get(usage)
                if key is None:
                    continue
                key = dict(key)
                public = _single_ed25519(key)
                sigs = {u: dict(s) for u, s in (key.get("signatures") or {}).items()}
                for signer_user, by_key in extra.get(public, {}).items():
                    if usage == "master" and signer_user not in (user_id, requester.user_id):
                        continue  # other users' user-signing signatures are private to them
                    sigs.setdefault(signer_user, {}).update(by_key)
                key["signatures"] = sigs
                result[out_key][user_id] = key
            if user_id == requester.user_id and "user_signing" in cross:
                user_signing[user_id] = cross["user_signing"]
        if user_signing:
            result["user_signing_keys"] = user_signing
        return result

    async def claim(self, requester: Requester, body: dict[str, Any]) -> dict[str, Any]:
        wanted = body.get("one_time_keys")
        if not isinstance(wanted, dict):
            raise BadJson("'one_time_keys' must map user IDs to devices")
        requests: list[tuple[str, str, str]] = []
        failures: dict[str, Any] = {}
        for user_id, devices in wanted.items():
            if not isinstance(devices, dict) or not all(isinstance(a, str) for a in devices.values()):
                raise BadJson("each user maps device IDs to an algorithm")
            if not is_valid_user_id(user_id):
                raise InvalidParam(f"{user_id!r} is not a user ID")
            if server_of(user_id) != self.server_name:
                failures[server_of(user_id)] = {"errcode": "M_UNRECOGNIZED", "error": "This server does not federate"}
                continue
            requests += [(user_id, device_id, algorithm) for device_id, algorithm in devices.items()]
        if len(requests) > 10_000:
            raise InvalidParam("Too many keys requested")

        def txn_fn(txn: Txn) -> dict[str, Any]:
            out: dict[str, Any] = {}
            for user_id, device_id, algorithm in requests:
                claimed = e2e_store.claim_one_time_key(txn, user_id, device_id, algorithm)
                if claimed is not None:
                    out.setdefault(user_id, {}).setdefault(device_id, {})[claimed[0]] = orjson.Fragment(claimed[1])
            return out

        keys = await self._db.write(txn_fn)
        for user_id, device_id, _ in requests:
            self.forget_counts((user_id, device_id))
        return {"one_time_keys": keys, "failures": failures}

    # -- cross-signing --------------------------------------------------------------------------------

    async def cross_signing_upload_needs_auth(self, user_id: str, body: Any) -> bool:
        """spec: no UIA when there is no master key yet, or when the request holds no new key."""
        existing = await self._db.read(e2e_store.get_cross_signing_keys, user_id)
        if "master" not in existing:
            return False
        if not isinstance(body, dict) or not isinstance(body.get("master_key"), dict):
            return True
        for field_name, usage in (("master_key", "master"), ("self_signing_key", "self_signing"), ("user_signing_key", "user_signing")):
            given = body.get(field_name)
            if given is None:
                continue
            stored = existing.get(usage)
            if not isinstance(given, dict) or stored is None:
                return True
            if given.get("keys") != stored.get("keys") or given.get("usage") != stored.get("usage"):
                return True
        return False

    async def upload_cross_signing(self, requester: Requester, body: dict[str, Any]) -> None:
        user = requester.user_id
        existing = await self._db.read(e2e_store.get_cross_signing_keys, user)
        given: dict[str, dict[str, Any]] = {}
        for field_name, usage in (("master_key", "master"), ("self_signing_key", "self_signing"), ("user_signing_key", "user_signing")):
            key = body.get(field_name)
            if key is None:
                continue
            if not isinstance(key, dict):
                raise BadJson(f"'{field_name}' must be an object")
            if key.get("user_id") != user:
                raise InvalidParam(f"'{field_name}' must be for the uploading user")
            usages = key.get("usage")
            if not isinstance(usages, list) or usage not in usages:
                raise InvalidParam(f"'{field_name}' must have usage {usage!r}")
            check_event_values(key, field_name)
            _single_ed25519(key)
            given[usage] = key
        if not given:
            raise MissingParam("No cross-signing keys given")
        if all(usage in existing and existing[usage].get("keys") == key.get("keys") for usage, key in given.items()):
            return  # a retried upload of the keys already stored: nothing changes
        master = given.get("master") or existing.get("master")
        if master is None:
            raise MissingParam("No master signing key is available")
        master_pub = _single_ed25519(master)
        for usage in ("self_signing", "user_signing"):
            key = given.get(usage)
            if key is not None and not verify_signed(key, user, f"ed25519:{master_pub}", master_pub):
                raise InvalidSignature(f"The {usage.replace('_', '-')} key is not signed by the master key")
        if "master" not in given:
            master_changed = False
        elif "master" in existing:
            master_changed = _single_ed25519(existing["master"]) != master_pub
        else:
            master_changed = True

        def write(txn: Txn) -> None:
            for usage, key in given.items():
                e2e_store.set_cross_signing_key(txn, user, usage, _single_ed25519(key), key)
            if master_changed and "master" in existing:
                # Keys signed by the old master are no longer trustworthy.
                for usage in ("self_signing", "user_signing"):
                    if usage not in given and usage in existing:
                        txn.execute("DELETE FROM e2e_cross_signing_keys WHERE user_id = ? AND usage = ?", (user, usage))

        await self._device_lists_changed([user], write)

    async def upload_signatures(self, requester: Requester, body: dict[str, Any]) -> dict[str, Any]:
        me = requester.user_id
        failures: dict[str, dict[str, Any]] = {}
        to_store: list[tuple[str, str, str, str, str]] = []
        changed_users: set[str] = set()
        mine = await self._db.read(e2e_store.get_cross_signing_keys, me)
        for target_user, objects in body.items():
            if not isinstance(objects, dict) or not is_valid_user_id(target_user):
                raise BadJson("the body maps user IDs to signed keys")
            theirs = mine if target_user == me else await self._db.read(e2e_store.get_cross_signing_keys, target_user)
            for target_key, signed in objects.items():
                try:
                    to_store += await self._check_signature(me, mine, target_user, theirs, target_key, signed)
                    changed_users.add(target_user)
                except MatrixError as exc:
                    failures.setdefault(target_user, {})[target_key] = {"errcode": exc.errcode, "error": exc.message}
        if to_store:

            def write(txn: Txn) -> None:
                for row in to_store:
                    e2e_store.add_signature(txn, *row)

            await self._device_lists_changed(changed_users, write)
        return {"failures": failures}

    async def _check_signature(
        self, me: str, mine: dict[str, Any], target_user: str, theirs: dict[str, Any], target_key: str, signed: Any
    ) -> list[tuple[str, str, str, str, str]]:
        if not isinstance(signed, dict):
            raise InvalidSignature("signed objects must be objects")
        signatures = signed.get("signatures")
        sigs = signatures.get(me) if isinstance(signatures, dict) else None
        if not isinstance(sigs, dict) or not sigs:
            raise InvalidSignature("no signature by the uploading user")
        master = theirs.get("master")
        if master is not None and target_key == _single_ed25519(master):
            stored = master
            if target_user == me:
                # My master key, signed by one of my devices.
                allowed = {}
                for key_id in sigs:
                    if key_id.startswith("ed25519:"):
                        device_keys = await self._db.read(e2e_store.get_device_keys, me, key_id[8:])
                        if device_keys is not None:
                            allowed[key_id] = device_keys["keys"].get(key_id)
            else:
                user_signing = mine.get("user_signing")
                if user_signing is None:
                    raise InvalidSignature("you have no user-signing key")
                pub = _single_ed25519(user_signing)
                allowed = {f"ed25519:{pub}": pub}
        else:
            if target_user != me:
                raise InvalidSignature("you may only sign other users' master keys")
            device_keys = await self._db.read(e2e_store.get_device_keys, me, target_key)
            if device_keys is None:
                raise MatrixError("Unknown device", errcode="M_NOT_FOUND", status=404)
            stored = device_keys
            self_signing = mine.get("self_signing")
            if self_signing is None:
                raise InvalidSignature("you have no self-signing key")
            pub = _single_ed25519(self_signing)
            allowed = {f"ed25519:{pub}": pub}
        if _strip(stored) != _strip(signed):
            raise InvalidSignature("the signed object does not match the stored key")
        rows = []
        for key_id, pub_key in allowed.items():
            if key_id in sigs and isinstance(pub_key, str) and verify_signed(signed, me, key_id, pub_key):
                rows.append((target_user, target_key, me, key_id, sigs[key_id]))
        if not rows:
            raise InvalidSignature("no valid signature")
        return rows

    # -- device-list changes for /sync and /keys/changes --------------------------------------------------

    async def changes(self, user_id: str, after_lists: int, upto_lists: int) -> set[str]:
        """Users sharing a room with ``user_id`` (or the user) whose devices changed in the range."""
        if after_lists >= upto_lists:
            return set()
        changed = await self._db.read(e2e_store.device_list_changes, after_lists, upto_lists)
        if not changed:
            return set()
        mine = {r for r, m in (await self._memberships.rooms_for(user_id)).items() if m.membership == "join"}
        out = set()
        for other in changed:
            if other == user_id:
                out.add(other)
                continue
            theirs = await self._memberships.rooms_for(other)
            if any(r in mine and theirs[r].membership == "join" for r in theirs):
                out.add(other)
        return out

    async def shares_a_room(self, user_id: str, other: str) -> bool:
        mine = {r for r, m in (await self._memberships.rooms_for(user_id)).items() if m.membership == "join"}
        theirs = await self._memberships.rooms_for(other)
        return any(r in mine and theirs[r].membership == "join" for r in theirs)

    # -- to-device ---------------------------------------------------------------------------------------

    async def send_to_device(self, requester: Requester, event_type: str, txn_id: str, body: dict[str, Any]) -> None:
        messages = body.get("messages")
        if not isinstance(messages, dict):
            raise BadJson("'messages' must map user IDs to devices")
        if requester.device_id is None:
            raise InvalidParam("This access token has no device")
        if len(event_type.encode()) > 255 or "\x00" in event_type:
            raise InvalidParam("Invalid event type")
        targets: list[tuple[str, str, bytes]] = []
        for user_id, devices in messages.items():
            if not is_valid_user_id(user_id) or not isinstance(devices, dict):
                raise BadJson("'messages' must map user IDs to devices")
            for device_id, content in devices.items():
                if len(device_id) > MAX_DEVICE_ID_LENGTH or "\x00" in device_id:
                    raise InvalidParam("A device ID is longer than 255 characters or holds a NUL character")
                if not isinstance(content, dict):
                    raise BadJson("to-device message content must be an object")
                check_event_values(content, "to-device content")
                message = orjson.dumps({"type": event_type, "sender": requester.user_id, "content": content})
                if len(message) > MAX_TO_DEVICE_CONTENT:
                    raise TooLarge("A to-device message is larger than 64 KiB")
                if server_of(user_id) != self.server_name:
                    continue  # this server does not federate
                targets.append((user_id, device_id, message))
        sender_device = requester.device_id

        def txn_fn(txn: Txn) -> tuple[int, list[tuple[int, str, str, bytes]]]:
            if e2e_store.to_device_txn_seen(txn, requester.user_id, sender_device, f"{event_type}:{txn_id}", now_ms()):
                return 0, []
            addressed: list[tuple[str, str, bytes]] = []
            device_cache: dict[str, list[str]] = {}
            for user_id, device_id, message in targets:
                if device_id == "*":
                    if user_id not in device_cache:
                        device_cache[user_id] = e2e_store.device_ids_for(txn, user_id)
                    devices = device_cache[user_id]
                else:
                    devices = [device_id]
                addressed.extend((user_id, target, message) for target in devices)
            if not addressed:
                return 0, []
            first = streams_store.allocate(txn, "to_device", len(addressed))
            rows = [(first + i, u, d, m) for i, (u, d, m) in enumerate(addressed)]
            e2e_store.add_to_device(txn, rows)
            return first, rows

        first, rows = await self._db.write(txn_fn)
        if rows:
            async with self._replicator.lock("to_device"):
                await self._replicator.before_local_apply("to_device", first)
                for stream_id, user_id, device_id, _ in rows:
                    if self._pending.get((user_id, device_id), 0) < stream_id:
                        self._pending[(user_id, device_id)] = stream_id
                self._replicator.after_local_apply("to_device", rows[-1][0])
                self._notifier.advance(replace(self._notifier.current, to_device=self._replicator.applied["to_device"]))
            self._notifier.notify_users({u for _, u, _, _ in rows})

    async def to_device_for(self, user_id: str, device_id: str, since: int | None, upto: int) -> tuple[list[Any], int]:
        """Messages for a device, and the stream position the next token should carry.

        Messages at or below ``since`` were delivered before and are deleted now.
        """
        key = (user_id, device_id)
        pending = self._pending.get(key)
        if pending is None:
            pending = await self._db.read(e2e_store.max_to_device_for, user_id, device_id)
            self._pending.setdefault(key, pending)
        if not pending:
            return [], upto  # nothing queued: no database work on this hot path

        def txn_fn(txn: Txn) -> list[tuple[int, bytes]]:
            if since:
                e2e_store.delete_to_device_upto(txn, user_id, device_id, since)
            return e2e_store.to_device_for(txn, user_id, device_id, upto, TO_DEVICE_BATCH)

        rows = await self._db.write(txn_fn) if since else await self._db.read(txn_fn)
        if since and since >= pending and self._pending.get(key) == pending:
            self._pending[key] = 0  # everything queued has been delivered and acknowledged
        events = [orjson.Fragment(message) for _, message in rows]
        position = rows[-1][0] if len(rows) == TO_DEVICE_BATCH else upto
        return events, position
