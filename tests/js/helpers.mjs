// Shared helpers for the matrix-js-sdk integration tests.
//
// The homeserver and two pre-registered accounts come from the environment
// (tests/integration/test_js_sdk.py sets these):
//
//   BASTION_HS_URL            e.g. http://127.0.0.1:8008
//   BASTION_USER1_ID          full MXID, e.g. @alice:localhost
//   BASTION_USER1_PASSWORD
//   BASTION_USER2_ID
//   BASTION_USER2_PASSWORD
//   BASTION_EXTRA_USERS       JSON list of five more accounts,
//                             [{"userId": "@x:localhost", "password": "..."}, ...]
//                             (room members used to fill the m.heroes slots)
//   BASTION_JS_SDK_LOG        optional js-sdk log level (default "silent";
//                             use "debug" to see every HTTP request)
//
// Everything is bounded by timeouts so that a server that never answers (or a
// sync loop that never delivers) fails the test instead of hanging it.

import assert from "node:assert/strict";

import * as sdk from "matrix-js-sdk";

// matrix-js-sdk logs through loglevel loggers that look up the console methods
// at call time, and its per-component child loggers are pinned to DEBUG, so the
// only reliable switch is the console itself. These tests never log through
// console, so muting it only mutes the SDK. BASTION_JS_SDK_LOG=debug (or info,
// warn, error) turns SDK logging back on from that level up.
const LOG_LEVELS = ["trace", "debug", "info", "log", "warn", "error"];
const wanted = process.env.BASTION_JS_SDK_LOG || "silent";
const threshold = LOG_LEVELS.indexOf(wanted);
for (const [i, method] of LOG_LEVELS.entries()) {
    if (threshold < 0 || i < threshold) console[method] = () => {};
}

function requireEnv(name) {
    const value = process.env[name];
    if (!value) {
        throw new Error(`environment variable ${name} is required (run via tests/integration/test_js_sdk.py)`);
    }
    return value;
}

export const HS_URL = requireEnv("BASTION_HS_URL");
export const USER1 = { userId: requireEnv("BASTION_USER1_ID"), password: requireEnv("BASTION_USER1_PASSWORD") };
export const USER2 = { userId: requireEnv("BASTION_USER2_ID"), password: requireEnv("BASTION_USER2_PASSWORD") };

export const EXTRA_USERS = JSON.parse(requireEnv("BASTION_EXTRA_USERS"));
if (!Array.isArray(EXTRA_USERS) || EXTRA_USERS.length < 5 || !EXTRA_USERS.every((u) => u.userId && u.password)) {
    throw new Error("BASTION_EXTRA_USERS must be a JSON list of at least five {userId, password} objects");
}

export const localpart = (userId) => userId.slice(1, userId.indexOf(":"));

/** Default bound for anything that waits on the server or the sync loop. */
export const WAIT_MS = 15_000;
/** Per-test bound passed to node:test. */
export const TEST_MS = 60_000;

export const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

/** Reject after `ms` with a message naming what we were waiting for. */
export function withTimeout(promise, what, ms = WAIT_MS) {
    let timer;
    const timeout = new Promise((_, reject) => {
        timer = setTimeout(() => reject(new Error(`timed out after ${ms} ms waiting for ${what}`)), ms);
    });
    return Promise.race([promise, timeout]).finally(() => clearTimeout(timer));
}

/**
 * Poll `predicate` until it returns a truthy value (which is returned).
 * On timeout, fails with `what` and, if given, `describe()` for context.
 */
export async function waitFor(predicate, what, { timeout = WAIT_MS, describe } = {}) {
    const deadline = Date.now() + timeout;
    let lastError;
    for (;;) {
        try {
            const value = await predicate();
            if (value) return value;
        } catch (err) {
            lastError = err;
        }
        if (Date.now() > deadline) {
            let detail = "";
            if (describe) {
                try {
                    detail = "\n  state: " + JSON.stringify(describe(), null, 2);
                } catch (err) {
                    detail = `\n  (describe failed: ${err})`;
                }
            }
            if (lastError) detail += `\n  last error: ${lastError.stack || lastError}`;
            throw new Error(`timed out after ${timeout} ms waiting for ${what}${detail}`);
        }
        await sleep(25);
    }
}

/**
 * A fetch wrapper that records what went over the wire, so tests can check
 * the server's raw responses (e.g. unsigned.transaction_id in /sync) and not
 * only what the SDK made of them.
 */
export function recordingFetch() {
    const record = { syncs: [], sends: [] };
    const fetchFn = async (resource, init) => {
        const url = new URL(typeof resource === "string" ? resource : resource.url ?? String(resource));
        const method = (init?.method || "GET").toUpperCase();
        const response = await fetch(resource, init);
        try {
            if (method === "GET" && url.pathname.endsWith("/sync") && response.ok) {
                record.syncs.push(await response.clone().json());
            }
            const send = url.pathname.match(/\/rooms\/([^/]+)\/send\/([^/]+)\/([^/]+)$/);
            if (method === "PUT" && send) {
                const body = await response.clone().json();
                record.sends.push({
                    roomId: decodeURIComponent(send[1]),
                    eventType: decodeURIComponent(send[2]),
                    txnId: decodeURIComponent(send[3]),
                    status: response.status,
                    eventId: body.event_id,
                });
            }
        } catch (err) {
            record.errors = [...(record.errors || []), String(err)];
        }
        return response;
    };
    return { fetchFn, record };
}

/** All timeline events the server sent for `roomId` in the recorded /sync responses. */
export function rawSyncTimeline(record, roomId) {
    const out = [];
    for (const body of record.syncs) {
        const room = body?.rooms?.join?.[roomId];
        for (const ev of room?.timeline?.events ?? []) out.push(ev);
    }
    return out;
}

/** Log in with m.login.password (identifier m.id.user) using a throwaway client. */
export async function passwordLogin(user, { identifierUser = user.userId, deviceName } = {}) {
    const anon = sdk.createClient({ baseUrl: HS_URL });
    const body = {
        identifier: { type: "m.id.user", user: identifierUser },
        password: user.password,
    };
    if (deviceName) body.initial_device_display_name = deviceName;
    return withTimeout(anon.login("m.login.password", body), `login of ${user.userId}`);
}

/** A js-sdk client bound to a login response (no crypto, in-memory store). */
export function clientFor(login, extra = {}) {
    const { fetchFn, record } = recordingFetch();
    const client = sdk.createClient({
        baseUrl: HS_URL,
        accessToken: login.access_token,
        userId: login.user_id,
        deviceId: login.device_id,
        fetchFn,
        ...extra,
    });
    client.wire = record;
    return client;
}

/** Start the real /sync loop and wait until the first sync has been processed. */
export async function startSyncing(client, opts = {}) {
    const prepared = new Promise((resolve, reject) => {
        const onSync = (state, _prev, data) => {
            if (state === sdk.SyncState.Prepared) {
                client.off(sdk.ClientEvent.Sync, onSync);
                resolve();
            } else if (state === sdk.SyncState.Error) {
                client.off(sdk.ClientEvent.Sync, onSync);
                reject(new Error(`sync error before PREPARED: ${data?.error?.stack || data?.error}`));
            }
        };
        client.on(sdk.ClientEvent.Sync, onSync);
    });
    await client.startClient({ initialSyncLimit: 20, pendingEventOrdering: sdk.PendingEventOrdering.Detached, ...opts });
    await withTimeout(prepared, `initial sync of ${client.getUserId()}`);
    return client;
}

/** Log in and start syncing. */
export async function loggedInSyncingClient(user, { clientOpts = {}, startOpts = {} } = {}) {
    const login = await passwordLogin(user);
    const client = clientFor(login, clientOpts);
    await startSyncing(client, startOpts);
    return client;
}

/** Events of the room's live timeline (what a UI would render). */
export const liveEvents = (room) => room.getLiveTimeline().getEvents();

/** Bodies of m.room.message events in the room's live timeline. */
export const messageBodies = (room) =>
    liveEvents(room)
        .filter((e) => e.getType() === "m.room.message")
        .map((e) => e.getContent().body);

/** Summarise a room's live timeline for failure messages. */
export function describeRoom(client, roomId) {
    const room = client.getRoom(roomId);
    if (!room) return { user: client.getUserId(), roomId, room: null };
    return {
        user: client.getUserId(),
        roomId,
        membership: room.getMyMembership(),
        name: room.name,
        pending: room.getPendingEvents().map((e) => ({ id: e.getId(), status: e.status })),
        timeline: liveEvents(room).map((e) => ({
            id: e.getId(),
            type: e.getType(),
            sender: e.getSender(),
            status: e.status,
            body: e.getContent().body,
            membership: e.getContent().membership,
        })),
    };
}

/**
 * Assert that `promise` rejects with a Matrix error of the given errcode and
 * HTTP status; returns the error.
 */
export async function expectMatrixError(promise, errcode, httpStatus, what) {
    let err;
    try {
        await withTimeout(promise, what);
    } catch (e) {
        err = e;
    }
    assert.ok(err, `${what}: expected ${errcode} (${httpStatus}) but the request succeeded`);
    assert.ok(err instanceof sdk.MatrixError, `${what}: expected a MatrixError, got ${err?.stack || err}`);
    assert.equal(err.errcode, errcode, `${what}: errcode (body: ${JSON.stringify(err.data)})`);
    assert.equal(err.httpStatus, httpStatus, `${what}: HTTP status (body: ${JSON.stringify(err.data)})`);
    return err;
}

/** Stop clients quietly (used in after hooks). */
export function stopAll(...clients) {
    for (const client of clients) {
        try {
            client?.stopClient();
        } catch {
            // already stopped
        }
    }
}

export { sdk };

// ---------------------------------------------------------------------------
// Shared by the messaging / directory / devices tests.

/**
 * A server administrator (created with `bastion user add --admin`), or null when
 * BASTION_ADMIN_ID / BASTION_ADMIN_PASSWORD are not set. Only the tests that need
 * admin rights (publishing to the room directory) require it.
 */
export const ADMIN = process.env.BASTION_ADMIN_ID && process.env.BASTION_ADMIN_PASSWORD
    ? { userId: process.env.BASTION_ADMIN_ID, password: process.env.BASTION_ADMIN_PASSWORD }
    : null;

/** A label unique to this run, e.g. for room names, aliases and search terms. */
export function unique(prefix) {
    return `${prefix} ${Date.now().toString(36)}${Math.random().toString(36).slice(2, 6)}`;
}

/** Wait until `client` has `roomId` with the given membership (via sync). */
export function waitForMembership(client, roomId, membership) {
    return waitFor(
        () => client.getRoom(roomId)?.getMyMembership() === membership,
        `${client.getUserId()} to see membership '${membership}' in ${roomId} via sync`,
        { describe: () => describeRoom(client, roomId) },
    );
}

/** Wait until `client` sees `userId`'s membership in `roomId` as `membership`. */
export function waitForMemberOf(client, roomId, userId, membership) {
    return waitFor(
        () => client.getRoom(roomId)?.getMember(userId)?.membership === membership,
        `${client.getUserId()} to see ${userId} as '${membership}' in ${roomId}`,
        { describe: () => describeRoom(client, roomId) },
    );
}

/**
 * `owner` creates a room (extra createRoom options allowed), invites `guest`,
 * `guest` joins; both clients see the joined room through their sync loops.
 */
export async function sharedRoom(owner, guest, options = {}) {
    const { room_id: roomId } = await withTimeout(owner.createRoom({ name: unique("Room"), ...options }), "createRoom");
    await waitForMembership(owner, roomId, "join");
    await withTimeout(owner.invite(roomId, guest.getUserId()), "invite");
    await waitForMembership(guest, roomId, "invite");
    await withTimeout(guest.joinRoom(roomId), "joinRoom");
    await waitForMembership(guest, roomId, "join");
    await waitForMemberOf(owner, roomId, guest.getUserId(), "join");
    return roomId;
}

/** Wait until `client` has the event `eventId` in `roomId` (main timeline or a thread). */
export function waitForEvent(client, roomId, eventId) {
    return waitFor(
        () => client.getRoom(roomId)?.findEventById(eventId),
        `${client.getUserId()} to receive ${eventId} in ${roomId}`,
        { describe: () => describeRoom(client, roomId) },
    );
}

/** The joined-room sections the server sent for `roomId`, in the order they arrived. */
export function rawJoinedRoom(client, roomId) {
    return client.wire.syncs.map((body) => body?.rooms?.join?.[roomId]).filter(Boolean);
}

/** All ephemeral events the server sent for `roomId` over the recorded /sync responses. */
export function rawEphemeral(client, roomId, type) {
    return rawJoinedRoom(client, roomId)
        .flatMap((room) => room.ephemeral?.events ?? [])
        .filter((e) => !type || e.type === type);
}

/** The latest `unread_notifications` the server sent for `roomId`. */
export function rawUnread(client, roomId) {
    const withCounts = rawJoinedRoom(client, roomId).filter((room) => room.unread_notifications);
    return withCounts.at(-1)?.unread_notifications;
}

/** The `unread_notifications` the server sent in the /sync response that delivered `eventId`. */
export function rawUnreadWithEvent(client, roomId, eventId) {
    const room = rawJoinedRoom(client, roomId).find((r) => (r.timeline?.events ?? []).some((e) => e.event_id === eventId));
    return room?.unread_notifications;
}

/** A raw call to a Client-Server endpoint (for endpoints the SDK has no wrapper for). */
export function rawRequest(client, method, path, { query, body, prefix = sdk.ClientPrefix.V3 } = {}) {
    return withTimeout(client.http.authedRequest(method, path, query, body, { prefix }), `${method} ${prefix}${path}`);
}

/**
 * Drive a request behind user-interactive auth with the SDK's InteractiveAuth,
 * answering each m.login.password stage from `passwords` in turn (so a wrong
 * password can be tried first). Returns the request's result and the stages
 * InteractiveAuth reported (with the server's error, if any, for each).
 */
export async function withPasswordAuth(client, doRequest, passwords, what) {
    const stages = [];
    const answers = [...passwords];
    let ia;
    ia = new sdk.InteractiveAuth({
        matrixClient: client,
        doRequest: (auth) => doRequest(auth ?? undefined),
        stateUpdated: (stage, status) => {
            stages.push({ stage, errcode: status?.errcode, error: status?.error });
            if (stage !== sdk.AuthType.Password || answers.length === 0) return;
            const password = answers.shift();
            ia.submitAuthDict({
                type: sdk.AuthType.Password,
                identifier: { type: "m.id.user", user: client.getUserId() },
                password,
            }).catch(() => {});
        },
        requestEmailToken: () => Promise.reject(new Error("no e-mail stage expected")),
    });
    const result = await withTimeout(ia.attemptAuth(), what);
    return { result, stages };
}
