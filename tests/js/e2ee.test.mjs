// End-to-end encryption through matrix-js-sdk's Rust crypto (matrix-sdk-crypto-wasm)
// against a running Bastion.
//
// Every client here calls `initRustCrypto({ useIndexedDB: false })` before its sync
// loop starts, so the SDK itself uploads device, one-time and fallback keys, tracks
// device lists from /sync, queries and claims keys, shares Megolm sessions over
// Olm-encrypted to-device messages, and decrypts what arrives. The tests assert
// both what the SDK made of it (decrypted events) and what went over the wire (the
// server only ever saw ciphertext; /sync carried to_device, device_lists and key
// counts).
//
// Accounts: alice = USER1, bob = USER2, carol = EXTRA_USERS[0] (cross-signing),
// dave = EXTRA_USERS[1] (key backup), erin = EXTRA_USERS[2] (idempotent key upload).
// Each test makes its own room.

import assert from "node:assert/strict";
import { after, before, describe, it } from "node:test";

import {
    EXTRA_USERS,
    USER1,
    USER2,
    clientFor,
    describeRoom,
    passwordLogin,
    rawRequest,
    rawSyncTimeline,
    sdk,
    startSyncing,
    stopAll,
    unique,
    waitFor,
    withTimeout,
} from "./helpers.mjs";

const { CrossSigningKey } = sdk.Crypto;

/** Crypto round trips (key query/claim, to-device, backup upload) take a few sync cycles. */
const E2EE_WAIT_MS = 30_000;
const E2EE_TEST_MS = 120_000;
const MEGOLM = "m.megolm.v1.aes-sha2";
const OLM = "m.olm.v1.curve25519-aes-sha2";
const BACKUP_ALGORITHM = "m.megolm_backup.v1.curve25519-aes-sha2";

const started = [];

after(() => stopAll(...started));

/** Log in a new device, initialise Rust crypto (in memory) and start syncing. */
async function cryptoClient(user, deviceName = "js-sdk e2ee test", clientOpts = {}) {
    const login = await passwordLogin(user, { deviceName });
    const client = clientFor(login, clientOpts);
    await withTimeout(client.initRustCrypto({ useIndexedDB: false }), `initRustCrypto for ${user.userId}`);
    started.push(client);
    await startSyncing(client);
    return client;
}

const encryptionState = { type: "m.room.encryption", state_key: "", content: { algorithm: MEGOLM } };

function waitForMembership(client, roomId, membership) {
    return waitFor(
        () => client.getRoom(roomId)?.getMyMembership() === membership,
        `${client.getUserId()} to see membership '${membership}' in ${roomId}`,
        { timeout: E2EE_WAIT_MS, describe: () => describeRoom(client, roomId) },
    );
}

/** `owner` creates an encrypted room and every guest joins it; all see everyone joined. */
async function encryptedRoom(owner, ...guests) {
    const { room_id: roomId } = await withTimeout(
        owner.createRoom({ name: unique("Secret"), initial_state: [encryptionState] }),
        "createRoom (encrypted)",
    );
    await waitForMembership(owner, roomId, "join");
    for (const guest of guests) {
        await withTimeout(owner.invite(roomId, guest.getUserId()), "invite");
        await waitForMembership(guest, roomId, "invite");
        await withTimeout(guest.joinRoom(roomId), "joinRoom");
        await waitForMembership(guest, roomId, "join");
    }
    for (const client of [owner, ...guests]) {
        for (const other of [owner, ...guests]) {
            await waitFor(
                () => client.getRoom(roomId)?.getMember(other.getUserId())?.membership === "join",
                `${client.getUserId()} to see ${other.getUserId()} joined`,
                { timeout: E2EE_WAIT_MS, describe: () => describeRoom(client, roomId) },
            );
        }
        assert.equal(
            await client.getCrypto().isEncryptionEnabledInRoom(roomId),
            true,
            `${client.getUserId()}'s crypto should treat ${roomId} as encrypted`,
        );
    }
    return roomId;
}

/** What a failing decryption wait should print. */
function describeEvent(client, roomId, eventId) {
    const ev = client.getRoom(roomId)?.findEventById(eventId);
    if (!ev) return { user: client.getUserId(), eventId, found: false, room: describeRoom(client, roomId) };
    return {
        user: client.getUserId(),
        device: client.getDeviceId(),
        eventId,
        wireType: ev.getWireType(),
        type: ev.getType(),
        isEncrypted: ev.isEncrypted(),
        beingDecrypted: ev.isBeingDecrypted(),
        decryptionFailure: ev.isDecryptionFailure(),
        failureReason: ev.decryptionFailureReason,
        clear: ev.getClearContent(),
    };
}

/**
 * Wait until `client` has decrypted `eventId` (a Megolm m.room.encrypted event)
 * into an m.room.message with `body`; returns the event. A decryption failure
 * renders as an m.room.message too ("** Unable to decrypt **"), so failures are
 * checked explicitly.
 */
async function waitForDecrypted(client, roomId, eventId, body) {
    const ev = await waitFor(
        () => {
            const e = client.getRoom(roomId)?.findEventById(eventId);
            return e && !e.isBeingDecrypted() && !e.isDecryptionFailure() && e.getClearContent() ? e : null;
        },
        `${client.getUserId()} (${client.getDeviceId()}) to decrypt ${eventId}`,
        { timeout: E2EE_WAIT_MS, describe: () => describeEvent(client, roomId, eventId) },
    );
    assert.equal(ev.isEncrypted(), true, `${eventId} should have arrived encrypted`);
    assert.equal(ev.getWireType(), "m.room.encrypted");
    assert.equal(ev.getWireContent().algorithm, MEGOLM);
    assert.equal(ev.getType(), "m.room.message", JSON.stringify(describeEvent(client, roomId, eventId)));
    assert.equal(ev.getClearContent().body, body, JSON.stringify(describeEvent(client, roomId, eventId)));
    assert.equal(ev.getContent().body, body);
    return ev;
}

/** Send a text message (the SDK encrypts it) and return its event ID. */
async function sendText(client, roomId, body) {
    const { event_id: eventId } = await withTimeout(
        client.sendMessage(roomId, { msgtype: "m.text", body }),
        `${client.getUserId()} sending "${body}"`,
        E2EE_WAIT_MS,
    );
    return eventId;
}

/** Device IDs `observer`'s crypto currently knows for `userId` (optionally forcing a download). */
async function knownDevices(observer, userId, download = false) {
    const map = await observer.getCrypto().getUserDeviceInfo([userId], download);
    return [...(map.get(userId)?.keys() ?? [])].sort();
}

/** The recorded /sync responses of `client`, from index `from` on. */
const syncsSince = (client, from = 0) => client.wire.syncs.slice(from);

/** Run a device_signing upload callback that records what the server said at each step. */
function uiaRecorder(user, { wrongPasswordFirst = false } = {}) {
    const steps = [];
    const callback = async (makeRequest) => {
        let session;
        try {
            await makeRequest(null);
            steps.push({ auth: "none", ok: true });
            return;
        } catch (err) {
            steps.push({ auth: "none", ok: false, status: err.httpStatus, errcode: err.errcode, data: err.data });
            if (err.httpStatus !== 401 || !err.data?.flows) throw err;
            session = err.data.session;
        }
        const password = (pw) => ({
            type: "m.login.password",
            identifier: { type: "m.id.user", user: user.userId },
            password: pw,
            session,
        });
        if (wrongPasswordFirst) {
            try {
                await makeRequest(password(user.password + " but wrong"));
                steps.push({ auth: "wrong password", ok: true });
                return;
            } catch (err) {
                steps.push({ auth: "wrong password", ok: false, status: err.httpStatus, errcode: err.errcode, data: err.data });
                if (err.httpStatus !== 401) throw err;
            }
        }
        await makeRequest(password(user.password));
        steps.push({ auth: "password", ok: true });
    };
    return { steps, callback };
}

let alice;
let bob;

before(async () => {
    alice = await cryptoClient(USER1);
    bob = await cryptoClient(USER2);
});

describe("end-to-end encryption with the Rust crypto stack", { timeout: E2EE_TEST_MS }, () => {
    it("two clients in an encrypted room decrypt each other's messages; the server sees only ciphertext", async () => {
        const aliceSyncsFrom = alice.wire.syncs.length;
        const bobSyncsFrom = bob.wire.syncs.length;
        const roomId = await encryptedRoom(alice, bob);

        // Both devices published keys the other can download.
        assert.deepEqual(await knownDevices(alice, bob.getUserId(), true), [bob.getDeviceId()]);
        assert.deepEqual(await knownDevices(bob, alice.getUserId(), true), [alice.getDeviceId()]);

        const script = [
            [alice, "alice: the eagle has landed"],
            [bob, "bob: copy that"],
            [alice, "alice: second message, same session"],
            [bob, "bob: ünïcödé ✓ and a longer line " + "x".repeat(300)],
        ];
        const sent = [];
        for (const [sender, body] of script) {
            const eventId = await sendText(sender, roomId, body);
            sent.push({ eventId, body, sender: sender.getUserId() });
            // The other side decrypts it, and the sender reads its own message back in clear.
            for (const reader of [alice, bob]) {
                const ev = await waitForDecrypted(reader, roomId, eventId, body);
                assert.equal(ev.getSender(), sender.getUserId());
            }
        }

        // Both timelines hold the four messages, decrypted, in order.
        for (const client of [alice, bob]) {
            const timeline = client
                .getRoom(roomId)
                .getLiveTimeline()
                .getEvents()
                .filter((e) => e.isEncrypted());
            assert.deepEqual(
                timeline.map((e) => [e.getId(), e.getType(), e.getContent().body]),
                sent.map((s) => [s.eventId, "m.room.message", s.body]),
                JSON.stringify(describeRoom(client, roomId), null, 2),
            );
        }

        // On the wire: every message was PUT as m.room.encrypted, and /sync delivered
        // Megolm ciphertext without a plaintext body.
        for (const client of [alice, bob]) {
            const sends = client.wire.sends.filter((s) => s.roomId === roomId);
            assert.ok(sends.length >= 2, `${client.getUserId()} sent through PUT /send`);
            assert.deepEqual(
                [...new Set(sends.map((s) => s.eventType))],
                ["m.room.encrypted"],
                `${client.getUserId()} sent only ciphertext: ${JSON.stringify(sends)}`,
            );
            const wire = rawSyncTimeline(client.wire, roomId).filter((e) => sent.some((s) => s.eventId === e.event_id));
            assert.equal(new Set(wire.map((e) => e.event_id)).size, sent.length, `${client.getUserId()} got all via /sync`);
            for (const ev of wire) {
                assert.equal(ev.type, "m.room.encrypted");
                assert.equal(ev.content.algorithm, MEGOLM);
                assert.equal(typeof ev.content.ciphertext, "string");
                assert.equal(typeof ev.content.session_id, "string");
                assert.equal(ev.content.body, undefined);
            }
        }

        // The Megolm sessions travelled as Olm-encrypted to-device messages in /sync.
        const toDevice = (client, from) =>
            syncsSince(client, from).flatMap((body) => body?.to_device?.events ?? []);
        const bobGot = toDevice(bob, bobSyncsFrom).filter((e) => e.type === "m.room.encrypted" && e.sender === alice.getUserId());
        const aliceGot = toDevice(alice, aliceSyncsFrom).filter((e) => e.type === "m.room.encrypted" && e.sender === bob.getUserId());
        for (const [who, events] of [["bob", bobGot], ["alice", aliceGot]]) {
            assert.ok(events.length >= 1, `${who} received an Olm to-device message`);
            for (const ev of events) {
                assert.equal(ev.content.algorithm, OLM, JSON.stringify(ev));
                assert.equal(typeof ev.content.sender_key, "string");
                assert.equal(typeof ev.content.ciphertext, "object");
            }
        }

        // Key counts for the device in /sync: one-time keys and the unused fallback key.
        for (const client of [alice, bob]) {
            const syncs = client.wire.syncs;
            const counts = syncs.map((s) => s.device_one_time_keys_count).filter(Boolean);
            assert.ok(
                counts.some((c) => Number.isInteger(c.signed_curve25519) && c.signed_curve25519 > 0),
                `${client.getUserId()}: device_one_time_keys_count.signed_curve25519 in /sync: ${JSON.stringify(counts.slice(-3))}`,
            );
            const fallback = syncs.map((s) => s.device_unused_fallback_key_types).filter(Boolean);
            assert.ok(
                fallback.some((types) => types.includes("signed_curve25519")),
                `${client.getUserId()}: device_unused_fallback_key_types in /sync: ${JSON.stringify(fallback.slice(-3))}`,
            );
        }
    });

    it("a device logged in later is learnt through device_lists and can read what is sent after; its logout is learnt too", async () => {
        const roomId = await encryptedRoom(alice, bob);
        const before = await sendText(alice, roomId, "before bob's second device");
        await waitForDecrypted(bob, roomId, before, "before bob's second device");

        const aliceSyncsFrom = alice.wire.syncs.length;
        const bob2 = await cryptoClient(USER2, "bob's second device");
        assert.notEqual(bob2.getDeviceId(), bob.getDeviceId());
        await waitForMembership(bob2, roomId, "join");

        // alice's sync loop tells her crypto that bob's devices changed; without any
        // forced download her crypto ends up knowing both devices.
        await waitFor(
            async () => (await knownDevices(alice, bob.getUserId())).includes(bob2.getDeviceId()),
            `alice to learn bob's second device ${bob2.getDeviceId()} from device_lists`,
            {
                timeout: E2EE_WAIT_MS,
                describe: () => ({
                    device_lists: syncsSince(alice, aliceSyncsFrom).map((s) => s.device_lists).filter(Boolean),
                }),
            },
        );
        const changed = syncsSince(alice, aliceSyncsFrom).flatMap((s) => s.device_lists?.changed ?? []);
        assert.ok(changed.includes(bob.getUserId()), `device_lists.changed names bob: ${JSON.stringify(changed)}`);
        // GET /keys/changes over the same span of sync tokens says the same.
        const fromToken = alice.wire.syncs[aliceSyncsFrom - 1].next_batch;
        const toToken = alice.wire.syncs.at(-1).next_batch;
        const keyChanges = await rawRequest(alice, "GET", "/keys/changes", { query: { from: fromToken, to: toToken } });
        assert.ok(keyChanges.changed?.includes(bob.getUserId()), `/keys/changes: ${JSON.stringify(keyChanges)}`);
        assert.ok(!keyChanges.left?.includes(bob.getUserId()), `/keys/changes: ${JSON.stringify(keyChanges)}`);

        const body = "after bob's second device";
        const eventId = await sendText(alice, roomId, body);
        await waitForDecrypted(bob2, roomId, eventId, body);
        await waitForDecrypted(bob, roomId, eventId, body);
        const fromBob2 = await sendText(bob2, roomId, "hello from bob's second device");
        await waitForDecrypted(alice, roomId, fromBob2, "hello from bob's second device");
        await waitForDecrypted(bob, roomId, fromBob2, "hello from bob's second device");

        // Logging the device out is a device-list change as well.
        const beforeLogout = alice.wire.syncs.length;
        const gone = bob2.getDeviceId();
        bob2.stopClient();
        await withTimeout(bob2.logout(true), "logout of bob's second device");
        await waitFor(
            async () => !(await knownDevices(alice, bob.getUserId())).includes(gone),
            `alice to learn that bob's device ${gone} is gone`,
            {
                timeout: E2EE_WAIT_MS,
                describe: () => ({
                    device_lists: syncsSince(alice, beforeLogout).map((s) => s.device_lists).filter(Boolean),
                }),
            },
        );
        assert.deepEqual(await knownDevices(alice, bob.getUserId()), [bob.getDeviceId()]);
        const after = await sendText(alice, roomId, "after the logout");
        await waitForDecrypted(bob, roomId, after, "after the logout");
    });

    it("bootstraps cross-signing (first upload without UIA), signs the device, and resets keys behind m.login.password", async () => {
        const carolUser = EXTRA_USERS[0];
        const carol = await cryptoClient(carolUser);
        const crypto = carol.getCrypto();
        const carolId = carol.getUserId();
        // A shared encrypted room, so that alice is told about carol's key changes.
        const roomId = await encryptedRoom(carol, alice);

        assert.equal(await crypto.userHasCrossSigningKeys(carolId, true), false, "no cross-signing keys yet");
        assert.equal(await crypto.isCrossSigningReady(), false);

        // First upload: no master key exists, so the spec lets it through without UIA.
        const first = uiaRecorder(carolUser);
        await withTimeout(
            crypto.bootstrapCrossSigning({ authUploadDeviceSigningKeys: first.callback }),
            "bootstrapCrossSigning",
            E2EE_WAIT_MS,
        );
        assert.deepEqual(first.steps, [{ auth: "none", ok: true }], "first upload needs no UIA");

        const status = await crypto.getCrossSigningStatus();
        assert.deepEqual(status, {
            publicKeysOnDevice: true,
            privateKeysInSecretStorage: false,
            privateKeysCachedLocally: { masterKey: true, selfSigningKey: true, userSigningKey: true },
        });
        assert.equal(await crypto.isCrossSigningReady(), true);
        assert.equal(await crypto.userHasCrossSigningKeys(carolId, true), true);

        // The server hands the keys back as uploaded.
        const masterId = await crypto.getCrossSigningKeyId(CrossSigningKey.Master);
        const selfId = await crypto.getCrossSigningKeyId(CrossSigningKey.SelfSigning);
        const userSigningId = await crypto.getCrossSigningKeyId(CrossSigningKey.UserSigning);
        assert.ok(masterId && selfId && userSigningId, "all three key IDs known");
        const own = await rawRequest(carol, "POST", "/keys/query", { body: { device_keys: { [carolId]: [] } } });
        const keyOf = (section) => Object.values(own[section]?.[carolId]?.keys ?? {})[0];
        assert.equal(keyOf("master_keys"), masterId, JSON.stringify(own));
        assert.equal(keyOf("self_signing_keys"), selfId, JSON.stringify(own));
        assert.equal(keyOf("user_signing_keys"), userSigningId, JSON.stringify(own));
        assert.deepEqual(own.master_keys[carolId].usage, ["master"]);
        assert.deepEqual(own.self_signing_keys[carolId].usage, ["self_signing"]);
        assert.deepEqual(own.user_signing_keys[carolId].usage, ["user_signing"]);

        // bootstrapCrossSigning signed carol's device with the self-signing key
        // (POST /keys/signatures/upload); the signature is merged into her device keys.
        const device = own.device_keys[carolId][carol.getDeviceId()];
        assert.ok(device?.signatures?.[carolId]?.[`ed25519:${selfId}`], `device signed by self-signing key: ${JSON.stringify(device)}`);
        assert.ok(device.signatures[carolId][`ed25519:${carol.getDeviceId()}`], "the device's own signature is kept");

        // Another user gets master and self-signing keys but not carol's user-signing key,
        // and her crypto accepts carol's device as signed by its owner.
        const seen = await rawRequest(alice, "POST", "/keys/query", { body: { device_keys: { [carolId]: [] } } });
        assert.equal(Object.values(seen.master_keys?.[carolId]?.keys ?? {})[0], masterId);
        assert.equal(Object.values(seen.self_signing_keys?.[carolId]?.keys ?? {})[0], selfId);
        assert.equal(seen.user_signing_keys?.[carolId], undefined, "user-signing keys go to their owner only");
        assert.equal(await alice.getCrypto().userHasCrossSigningKeys(carolId, true), true);
        const verification = await waitFor(
            async () => {
                const v = await alice.getCrypto().getDeviceVerificationStatus(carolId, carol.getDeviceId());
                return v?.signedByOwner ? v : null;
            },
            "alice to see carol's device signed by carol's self-signing key",
            { timeout: E2EE_WAIT_MS },
        );
        assert.equal(verification.signedByOwner, true);

        // Replacing the keys requires UIA: a 401 with the password flow, then a wrong
        // password is refused (401 M_FORBIDDEN), then the right one succeeds.
        const aliceSyncsFrom = alice.wire.syncs.length;
        const reset = uiaRecorder(carolUser, { wrongPasswordFirst: true });
        await withTimeout(
            crypto.bootstrapCrossSigning({ setupNewCrossSigning: true, authUploadDeviceSigningKeys: reset.callback }),
            "bootstrapCrossSigning (reset)",
            E2EE_WAIT_MS,
        );
        assert.equal(reset.steps.length, 3, JSON.stringify(reset.steps, null, 2));
        const [challenge, wrong, right] = reset.steps;
        assert.equal(challenge.status, 401, JSON.stringify(challenge));
        assert.ok(
            challenge.data.flows.some((f) => f.stages.length === 1 && f.stages[0] === "m.login.password"),
            `a password-only flow is offered: ${JSON.stringify(challenge.data)}`,
        );
        assert.equal(typeof challenge.data.session, "string");
        assert.equal(wrong.status, 401, JSON.stringify(wrong));
        assert.equal(wrong.errcode, "M_FORBIDDEN", JSON.stringify(wrong));
        assert.deepEqual(right, { auth: "password", ok: true });

        const newMasterId = await crypto.getCrossSigningKeyId(CrossSigningKey.Master);
        assert.ok(newMasterId && newMasterId !== masterId, "a new master key");
        const after = await rawRequest(carol, "POST", "/keys/query", { body: { device_keys: { [carolId]: [] } } });
        assert.equal(Object.values(after.master_keys[carolId].keys)[0], newMasterId);
        assert.equal(await crypto.isCrossSigningReady(), true);
        const resigned = after.device_keys[carolId][carol.getDeviceId()];
        const newSelfId = await crypto.getCrossSigningKeyId(CrossSigningKey.SelfSigning);
        assert.ok(resigned.signatures[carolId][`ed25519:${newSelfId}`], `device re-signed: ${JSON.stringify(resigned)}`);

        // alice shares a room with carol, so her /sync reports carol's changed keys.
        await waitFor(
            () => syncsSince(alice, aliceSyncsFrom).some((s) => s.device_lists?.changed?.includes(carolId)),
            "alice's /sync to list carol in device_lists.changed after the cross-signing reset",
            {
                timeout: E2EE_WAIT_MS,
                describe: () => syncsSince(alice, aliceSyncsFrom).map((s) => s.device_lists).filter(Boolean),
            },
        );

        // Messages still flow both ways after the reset.
        const fromCarol = await sendText(carol, roomId, "carol after the reset");
        await waitForDecrypted(alice, roomId, fromCarol, "carol after the reset");
        const fromAlice = await sendText(alice, roomId, "alice to carol");
        await waitForDecrypted(carol, roomId, fromAlice, "alice to carol");
    });

    it("re-uploading the cross-signing keys already on the server is idempotent and needs no UIA (spec v1.11)", async () => {
        // The spec: "User-Interactive Authentication MUST be performed for regular clients,
        // except in these cases: [...] there is an existing master signing key and it
        // exactly matches the master signing key provided in the request body [...]
        // Allowing clients to upload the same set of keys more than once makes this
        // endpoint idempotent in the case where the response is lost over the network,
        // which would otherwise cause a UIA challenge upon retry."
        // So: record the SDK's own first upload and send exactly the same body again.
        const erinUser = EXTRA_USERS[2];
        const uploads = [];
        const capture = async (resource, init) => {
            const url = new URL(typeof resource === "string" ? resource : resource.url ?? String(resource));
            if (url.pathname.endsWith("/keys/device_signing/upload") && init?.body) uploads.push(JSON.parse(init.body));
            return fetch(resource, init);
        };
        const erin = await cryptoClient(erinUser, "erin", { fetchFn: capture });
        const first = uiaRecorder(erinUser);
        await withTimeout(
            erin.getCrypto().bootstrapCrossSigning({ authUploadDeviceSigningKeys: first.callback }),
            "bootstrapCrossSigning",
            E2EE_WAIT_MS,
        );
        assert.deepEqual(first.steps, [{ auth: "none", ok: true }], "first upload needs no UIA");
        assert.equal(uploads.length, 1, "one upload by the SDK");
        const masterId = await erin.getCrypto().getCrossSigningKeyId(CrossSigningKey.Master);

        const token = erin.getAccessToken();
        const retry = await withTimeout(
            fetch(`${erin.baseUrl}/_matrix/client/v3/keys/device_signing/upload`, {
                method: "POST",
                headers: { Authorization: `Bearer ${token}`, "Content-Type": "application/json" },
                body: JSON.stringify(uploads[0]),
            }),
            "re-upload of identical cross-signing keys",
        );
        const retryBody = await retry.text();
        assert.equal(
            retry.status,
            200,
            `POST /keys/device_signing/upload with exactly the keys already stored (no auth) ` +
                `should succeed without UIA; got ${retry.status} ${retryBody}`,
        );
        const after = await rawRequest(erin, "POST", "/keys/query", { body: { device_keys: { [erin.getUserId()]: [] } } });
        assert.equal(Object.values(after.master_keys[erin.getUserId()].keys)[0], masterId, "keys unchanged");
    });

    it("backs room keys up to the server; a new device restores the backup and decrypts the history", async () => {
        const daveUser = EXTRA_USERS[1];
        const dave1 = await cryptoClient(daveUser, "dave's first device");
        const crypto1 = dave1.getCrypto();

        assert.equal(await crypto1.getKeyBackupInfo(), null, "no backup version yet");
        await withTimeout(crypto1.resetKeyBackup(), "resetKeyBackup");
        const version = await waitFor(() => crypto1.getActiveSessionBackupVersion(), "backup to become active", {
            timeout: E2EE_WAIT_MS,
        });
        const info = await crypto1.getKeyBackupInfo();
        assert.equal(info.version, version);
        assert.equal(info.algorithm, BACKUP_ALGORITHM);
        assert.equal(typeof info.auth_data.public_key, "string");
        assert.deepEqual(await crypto1.isKeyBackupTrusted(info), { matchesDecryptionKey: true, trusted: true });
        const fresh = await rawRequest(dave1, "GET", "/room_keys/version");
        assert.equal(fresh.version, version);
        assert.equal(fresh.count, 0);
        assert.equal(typeof fresh.etag, "string");

        // History: one Megolm session from dave, one from alice (received over Olm).
        const roomId = await encryptedRoom(dave1, alice);
        const history = [
            [dave1, "dave: written before the new device"],
            [alice, "alice: also before the new device"],
        ];
        const sent = [];
        for (const [sender, body] of history) {
            const eventId = await sendText(sender, roomId, body);
            const ev = await waitForDecrypted(dave1, roomId, eventId, body);
            sent.push({ eventId, body, sessionId: ev.getWireContent().session_id });
        }
        const sessionIds = [...new Set(sent.map((s) => s.sessionId))].sort();
        assert.equal(sessionIds.length, 2, "two Megolm sessions");

        // dave's device uploads both sessions to the backup on its own.
        const backedUp = await waitFor(
            async () => {
                const keys = await rawRequest(dave1, "GET", "/room_keys/keys", { query: { version } });
                const sessions = Object.keys(keys.rooms?.[roomId]?.sessions ?? {}).sort();
                return sessionIds.every((id) => sessions.includes(id)) ? keys : null;
            },
            "both sessions in the server-side backup",
            { timeout: E2EE_WAIT_MS },
        );
        for (const id of sessionIds) {
            const data = backedUp.rooms[roomId].sessions[id];
            assert.equal(typeof data.first_message_index, "number");
            assert.equal(typeof data.forwarded_count, "number");
            assert.equal(typeof data.is_verified, "boolean");
            for (const field of ["ciphertext", "ephemeral", "mac"]) {
                assert.equal(typeof data.session_data[field], "string", `session_data.${field}`);
            }
            const one = await rawRequest(dave1, "GET", `/room_keys/keys/${encodeURIComponent(roomId)}/${encodeURIComponent(id)}`, {
                query: { version },
            });
            assert.deepEqual(one, data, "GET /room_keys/keys/{roomId}/{sessionId}");
        }
        const roomKeys = await rawRequest(dave1, "GET", `/room_keys/keys/${encodeURIComponent(roomId)}`, { query: { version } });
        assert.deepEqual(roomKeys, backedUp.rooms[roomId], "GET /room_keys/keys/{roomId}");
        const counted = await rawRequest(dave1, "GET", "/room_keys/version");
        assert.equal(counted.count, Object.keys(backedUp.rooms).reduce((n, r) => n + Object.keys(backedUp.rooms[r].sessions).length, 0));
        assert.ok(counted.count >= 2);
        assert.notEqual(counted.etag, fresh.etag, "the etag changes when keys are added");

        const privateKey = await crypto1.getSessionBackupPrivateKey();
        assert.ok(privateKey instanceof Uint8Array && privateKey.length === 32, "the backup decryption key is cached");
        // The first device goes quiet: from here on, only the backup can help the new one.
        dave1.stopClient();

        const dave2 = await cryptoClient(daveUser, "dave's new device");
        const crypto2 = dave2.getCrypto();
        await waitForMembership(dave2, roomId, "join");
        for (const { eventId } of sent) {
            await waitFor(
                () => dave2.getRoom(roomId)?.findEventById(eventId)?.isDecryptionFailure(),
                `the new device to fail decrypting ${eventId} before restoring the backup`,
                { timeout: E2EE_WAIT_MS, describe: () => describeEvent(dave2, roomId, eventId) },
            );
        }
        const serverInfo = await crypto2.getKeyBackupInfo();
        assert.equal(serverInfo.version, version);
        assert.equal(serverInfo.auth_data.public_key, info.auth_data.public_key);

        await crypto2.storeSessionBackupPrivateKey(privateKey, version);
        const restored = await withTimeout(crypto2.restoreKeyBackup(), "restoreKeyBackup", E2EE_WAIT_MS);
        assert.equal(restored.total, counted.count, JSON.stringify(restored));
        for (const { eventId, body } of sent) {
            await waitForDecrypted(dave2, roomId, eventId, body);
        }
        const check = await crypto2.checkKeyBackupAndEnable();
        assert.equal(check?.backupInfo?.version, version);
    });
});
