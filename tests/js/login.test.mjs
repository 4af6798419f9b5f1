// Login, whoami and logout through matrix-js-sdk against a running Bastion.

import assert from "node:assert/strict";
import { after, describe, it } from "node:test";

import {
    HS_URL,
    TEST_MS,
    USER1,
    USER2,
    clientFor,
    expectMatrixError,
    localpart,
    passwordLogin,
    sdk,
    startSyncing,
    stopAll,
    waitFor,
    withTimeout,
} from "./helpers.mjs";

const started = [];
after(() => stopAll(...started));

describe("login and whoami", { timeout: TEST_MS }, () => {
    it("advertises m.login.password in GET /login", async () => {
        const anon = sdk.createClient({ baseUrl: HS_URL });
        const { flows } = await withTimeout(anon.loginFlows(), "GET /login");
        assert.ok(Array.isArray(flows), `flows should be an array: ${JSON.stringify(flows)}`);
        assert.ok(flows.some((f) => f.type === "m.login.password"), `flows: ${JSON.stringify(flows)}`);
    });

    it("logs in with a full user ID and whoami names the same user and device", async () => {
        const login = await passwordLogin(USER1, { deviceName: "js-sdk test" });
        assert.equal(login.user_id, USER1.userId);
        assert.equal(typeof login.access_token, "string");
        assert.ok(login.access_token.length > 0);
        assert.equal(typeof login.device_id, "string");
        assert.ok(login.device_id.length > 0);

        const client = clientFor(login);
        const me = await withTimeout(client.whoami(), "whoami");
        assert.equal(me.user_id, USER1.userId);
        assert.equal(me.device_id, login.device_id);
    });

    it("logs in with a bare localpart identifier", async () => {
        const login = await passwordLogin(USER2, { identifierUser: localpart(USER2.userId) });
        assert.equal(login.user_id, USER2.userId);
        const me = await withTimeout(clientFor(login).whoami(), "whoami");
        assert.equal(me.user_id, USER2.userId);
    });

    it("logs in with loginWithPassword (legacy top-level `user` field)", async () => {
        // matrix-js-sdk's loginWithPassword() still sends {"user": ..., "password": ...}
        // without an identifier; the spec keeps `user` as a deprecated alternative.
        const anon = sdk.createClient({ baseUrl: HS_URL });
        const login = await withTimeout(anon.loginWithPassword(USER1.userId, USER1.password), "loginWithPassword");
        assert.equal(login.user_id, USER1.userId);
        const me = await withTimeout(clientFor(login).whoami(), "whoami");
        assert.equal(me.user_id, USER1.userId);
        assert.equal(me.device_id, login.device_id);
    });

    it("rejects a wrong password with M_FORBIDDEN", async () => {
        const anon = sdk.createClient({ baseUrl: HS_URL });
        await expectMatrixError(
            anon.login("m.login.password", {
                identifier: { type: "m.id.user", user: USER1.userId },
                password: USER1.password + "-wrong",
            }),
            "M_FORBIDDEN",
            403,
            "login with a wrong password",
        );
    });
});

describe("logout", { timeout: TEST_MS }, () => {
    it("logout(stopClient) stops the sync loop and invalidates only that session's token", async () => {
        const keep = clientFor(await passwordLogin(USER1));
        const login = await passwordLogin(USER1);
        const client = clientFor(login);
        started.push(client);
        await startSyncing(client);
        assert.ok(
            [sdk.SyncState.Prepared, sdk.SyncState.Syncing].includes(client.getSyncState()),
            `sync state before logout: ${client.getSyncState()}`,
        );

        await withTimeout(client.logout(true), "logout");
        assert.equal(client.clientRunning, false, "logout(true) should stop the client");

        // The same token no longer works: 401 M_UNKNOWN_TOKEN.
        const stale = clientFor(login);
        await expectMatrixError(stale.whoami(), "M_UNKNOWN_TOKEN", 401, "whoami with a logged-out token");

        // Another session of the same user is unaffected.
        const me = await withTimeout(keep.whoami(), "whoami on the other session");
        assert.equal(me.user_id, USER1.userId);
    });

    it("a client still syncing with a logged-out token is told its session ended", async () => {
        const login = await passwordLogin(USER2);
        // Short long-poll so the next /sync (which must fail) comes quickly.
        const syncing = clientFor(login);
        started.push(syncing);
        await startSyncing(syncing, { pollTimeout: 1000 });

        let loggedOut = null;
        syncing.on(sdk.HttpApiEvent.SessionLoggedOut, (err) => {
            loggedOut = err;
        });

        // Log the session out from a second client object holding the same token,
        // as if another tab had pressed "log out".
        await withTimeout(clientFor(login).logout(), "logout from another client object");

        const err = await waitFor(() => loggedOut, "HttpApiEvent.SessionLoggedOut on the syncing client");
        assert.equal(err.errcode, "M_UNKNOWN_TOKEN");
        assert.equal(err.httpStatus, 401);
        syncing.stopClient();
    });
});
