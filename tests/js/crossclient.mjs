// The matrix-js-sdk half of the cross-client E2EE test
// (tests/integration/test_cross_client_e2ee.py drives it; the other half is a
// matrix-nio client with vodozemac). Not a *.test.mjs file, so the generic
// js-sdk runner does not pick it up.
//
// On start it logs in with Rust crypto (in memory), starts the sync loop and prints
//   {"event": "ready", "userId": ..., "deviceId": ..., "ed25519": ..., "curve25519": ...}
// Then it reads one JSON command per line on stdin and answers each with one JSON
// line on stdout carrying the same "id" and "ok": true, or "ok": false and "error":
//
//   {"id": 1, "cmd": "join", "roomId": ...}           wait for the invite, join, wait until joined
//   {"id": 2, "cmd": "devices", "userId": ...}       device IDs the crypto knows (downloads them)
//   {"id": 3, "cmd": "send", "roomId": ..., "body": ...}      send an m.text (encrypted by the SDK)
//   {"id": 4, "cmd": "expect", "roomId": ..., "eventId": ..., "body": ...}
//                                                    wait until the event decrypts; report it
//   {"id": 5, "cmd": "quit"}
//
// Environment: BASTION_HS_URL, BASTION_JS_USER_ID, BASTION_JS_PASSWORD; optional
// BASTION_JS_SDK_LOG (e.g. "debug") sends the SDK's log to stderr. stdout carries
// only the protocol.

import { createInterface } from "node:readline";

import * as sdk from "matrix-js-sdk";

const LOG_LEVELS = ["trace", "debug", "info", "log", "warn", "error"];
const threshold = LOG_LEVELS.indexOf(process.env.BASTION_JS_SDK_LOG || "silent");
for (const [i, method] of LOG_LEVELS.entries()) {
    // Everything the SDK logs goes to stderr (or nowhere): stdout is the protocol.
    console[method] = threshold < 0 || i < threshold ? () => {} : (...args) => process.stderr.write(args.join(" ") + "\n");
}

const WAIT_MS = 30_000;
const MEGOLM = "m.megolm.v1.aes-sha2";

function requireEnv(name) {
    const value = process.env[name];
    if (!value) throw new Error(`environment variable ${name} is required`);
    return value;
}

const HS_URL = requireEnv("BASTION_HS_URL");
const USER_ID = requireEnv("BASTION_JS_USER_ID");
const PASSWORD = requireEnv("BASTION_JS_PASSWORD");

const emit = (obj) => process.stdout.write(JSON.stringify(obj) + "\n");
const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

function withTimeout(promise, what, ms = WAIT_MS) {
    let timer;
    const timeout = new Promise((_, reject) => {
        timer = setTimeout(() => reject(new Error(`timed out after ${ms} ms waiting for ${what}`)), ms);
    });
    return Promise.race([promise, timeout]).finally(() => clearTimeout(timer));
}

async function waitFor(predicate, what, describe, ms = WAIT_MS) {
    const deadline = Date.now() + ms;
    for (;;) {
        const value = await predicate();
        if (value) return value;
        if (Date.now() > deadline) {
            const detail = describe ? `; state: ${JSON.stringify(describe())}` : "";
            throw new Error(`timed out after ${ms} ms waiting for ${what}${detail}`);
        }
        await sleep(25);
    }
}

// What went over the wire for PUT /send: the event type the server was given.
const sends = [];
async function recordingFetch(resource, init) {
    const response = await fetch(resource, init);
    const url = new URL(typeof resource === "string" ? resource : resource.url ?? String(resource));
    const send = url.pathname.match(/\/rooms\/([^/]+)\/send\/([^/]+)\/([^/]+)$/);
    if ((init?.method || "GET").toUpperCase() === "PUT" && send) {
        let eventId;
        try {
            eventId = (await response.clone().json()).event_id;
        } catch {
            // not JSON; leave it undefined
        }
        sends.push({
            roomId: decodeURIComponent(send[1]),
            eventType: decodeURIComponent(send[2]),
            eventId,
            content: init?.body ? JSON.parse(init.body) : undefined,
        });
    }
    return response;
}

function describeEvent(client, roomId, eventId) {
    const room = client.getRoom(roomId);
    const ev = room?.findEventById(eventId);
    if (!ev) {
        return {
            eventId,
            found: false,
            timeline: room?.getLiveTimeline().getEvents().map((e) => [e.getId(), e.getWireType(), e.getSender()]),
        };
    }
    return {
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

async function main() {
    const anon = sdk.createClient({ baseUrl: HS_URL });
    const login = await withTimeout(
        anon.login("m.login.password", {
            identifier: { type: "m.id.user", user: USER_ID },
            password: PASSWORD,
            initial_device_display_name: "js-sdk cross-client",
        }),
        "login",
    );
    const client = sdk.createClient({
        baseUrl: HS_URL,
        accessToken: login.access_token,
        userId: login.user_id,
        deviceId: login.device_id,
        fetchFn: recordingFetch,
    });
    await withTimeout(client.initRustCrypto({ useIndexedDB: false }), "initRustCrypto");
    const prepared = new Promise((resolve, reject) => {
        client.on(sdk.ClientEvent.Sync, (state, _prev, data) => {
            if (state === sdk.SyncState.Prepared) resolve();
            if (state === sdk.SyncState.Error) reject(new Error(`sync error: ${data?.error}`));
        });
    });
    await client.startClient({ initialSyncLimit: 20 });
    await withTimeout(prepared, "initial sync");
    const crypto = client.getCrypto();
    const own = await crypto.getOwnDeviceKeys();
    emit({ event: "ready", userId: client.getUserId(), deviceId: client.getDeviceId(), ...own });

    const handlers = {
        async join({ roomId }) {
            await waitFor(
                () => client.getRoom(roomId)?.getMyMembership() === "invite" || client.getRoom(roomId)?.getMyMembership() === "join",
                `the invite to ${roomId}`,
            );
            await withTimeout(client.joinRoom(roomId), "joinRoom");
            await waitFor(() => client.getRoom(roomId)?.getMyMembership() === "join", `joined ${roomId} via sync`);
            return { encrypted: await crypto.isEncryptionEnabledInRoom(roomId) };
        },
        async devices({ userId }) {
            const map = await withTimeout(crypto.getUserDeviceInfo([userId], true), "getUserDeviceInfo");
            return { devices: [...(map.get(userId)?.keys() ?? [])].sort() };
        },
        async send({ roomId, body }) {
            const { event_id: eventId } = await withTimeout(
                client.sendMessage(roomId, { msgtype: "m.text", body }),
                `sending "${body}"`,
            );
            const wire = sends.find((s) => s.eventId === eventId);
            return {
                eventId,
                wireType: wire?.eventType,
                wireAlgorithm: wire?.content?.algorithm,
                wireHasBody: wire?.content?.body !== undefined,
            };
        },
        async expect({ roomId, eventId, body }) {
            const ev = await waitFor(
                () => {
                    const e = client.getRoom(roomId)?.findEventById(eventId);
                    return e && !e.isBeingDecrypted() && !e.isDecryptionFailure() && e.getClearContent() ? e : null;
                },
                `decryption of ${eventId}`,
                () => describeEvent(client, roomId, eventId),
            );
            return {
                sender: ev.getSender(),
                type: ev.getType(),
                isEncrypted: ev.isEncrypted(),
                wireType: ev.getWireType(),
                algorithm: ev.getWireContent().algorithm,
                body: ev.getClearContent()?.body,
                msgtype: ev.getClearContent()?.msgtype,
                expectedBody: body,
                decryptionFailure: ev.isDecryptionFailure(),
                // The sending device's identity keys, as the crypto learnt them with the session.
                senderCurve25519: ev.getSenderKey(),
                claimedEd25519: ev.getClaimedEd25519Key(),
            };
        },
        async quit() {
            client.stopClient();
            setTimeout(() => process.exit(0), 50);
            return {};
        },
    };

    const lines = createInterface({ input: process.stdin, crlfDelay: Infinity });
    for await (const line of lines) {
        if (!line.trim()) continue;
        let request;
        try {
            request = JSON.parse(line);
        } catch (err) {
            emit({ ok: false, error: `bad JSON on stdin: ${err}` });
            continue;
        }
        const handler = handlers[request.cmd];
        if (!handler) {
            emit({ id: request.id, ok: false, error: `unknown command ${request.cmd}` });
            continue;
        }
        try {
            emit({ id: request.id, ok: true, ...(await handler(request)) });
        } catch (err) {
            emit({ id: request.id, ok: false, error: String(err?.stack || err) });
        }
    }
    // stdin closed without "quit": stop anyway.
    client.stopClient();
    process.exit(0);
}

main().catch((err) => {
    emit({ event: "fatal", ok: false, error: String(err?.stack || err) });
    process.exit(1);
});
