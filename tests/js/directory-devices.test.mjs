// Directories, devices, deactivation and room upgrades through matrix-js-sdk
// against a running Bastion: room aliases, the published room directory
// (publishing needs a server admin by default: BASTION_ADMIN_ID), the user
// directory, device listing / renaming / deletion behind user-interactive auth,
// account deactivation, and room upgrades followed by the other member.
//
// alice (USER1) and bob (USER2) run started MatrixClients; EXTRA_USERS[0] is a
// stranger for the directories, EXTRA_USERS[4] is deactivated. Devices and UIA
// go through the SDK's own InteractiveAuth driver with m.login.password.

import assert from "node:assert/strict";
import { after, before, describe, it } from "node:test";

import {
    ADMIN,
    EXTRA_USERS,
    TEST_MS,
    USER1,
    USER2,
    clientFor,
    describeRoom,
    expectMatrixError,
    loggedInSyncingClient,
    passwordLogin,
    sdk,
    sharedRoom,
    startSyncing,
    stopAll,
    unique,
    waitFor,
    waitForEvent,
    waitForMemberOf,
    waitForMembership,
    withPasswordAuth,
    withTimeout,
} from "./helpers.mjs";

const { EventType, HttpApiEvent, Preset, Visibility } = sdk;

let alice;
let bob;
const extraClients = [];

before(async () => {
    alice = await loggedInSyncingClient(USER1);
    bob = await loggedInSyncingClient(USER2);
});

after(() => stopAll(alice, bob, ...extraClients));

const aliasLocalpart = (prefix) => unique(prefix).replace(/\W+/g, "-").toLowerCase();

/** A promise that resolves when `client` reports its session as logged out. */
function loggedOut(client) {
    return new Promise((resolve) => client.once(HttpApiEvent.SessionLoggedOut, resolve));
}

describe("room aliases and the room directory", { timeout: TEST_MS }, () => {
    it("createAlias / getRoomIdForAlias / getLocalAliases / deleteAlias", async () => {
        const roomId = await sharedRoom(alice, bob);
        const alias = `#${aliasLocalpart("team")}:${alice.getDomain()}`;
        await withTimeout(alice.createAlias(alias, roomId), "PUT /directory/room/{alias}");
        const resolved = await withTimeout(bob.getRoomIdForAlias(alias), "GET /directory/room/{alias}");
        assert.equal(resolved.room_id, roomId);
        assert.ok(resolved.servers.includes(alice.getDomain()), `servers: ${JSON.stringify(resolved.servers)}`);
        assert.deepEqual((await withTimeout(alice.getLocalAliases(roomId), "GET /rooms/{id}/aliases")).aliases, [alias]);

        const { room_id: otherRoom } = await withTimeout(alice.createRoom({ name: unique("Other") }), "createRoom");
        // directory.yaml: 409 "A room alias with that name already exists." (its example errcode is M_UNKNOWN)
        await expectMatrixError(alice.createAlias(alias, otherRoom), "M_UNKNOWN", 409, "an alias that is taken");
        await expectMatrixError(
            bob.createAlias(`#${aliasLocalpart("x")}:not-this-server.example`, roomId),
            "M_INVALID_PARAM",
            400,
            "an alias on another server",
        );
        // bob (power 0, not the alias's creator) may not delete it.
        await expectMatrixError(bob.deleteAlias(alias), "M_FORBIDDEN", 403, "bob's DELETE of alice's alias");

        await withTimeout(alice.deleteAlias(alias), "DELETE /directory/room/{alias}");
        await expectMatrixError(bob.getRoomIdForAlias(alias), "M_NOT_FOUND", 404, "resolving a deleted alias");
        assert.deepEqual((await withTimeout(alice.getLocalAliases(roomId), "GET aliases")).aliases, []);
        await expectMatrixError(alice.deleteAlias(alias), "M_NOT_FOUND", 404, "deleting it twice");
    });

    it("publishing needs an admin; publicRooms lists, searches and pages; unpublishing removes", async () => {
        assert.ok(ADMIN, "BASTION_ADMIN_ID / BASTION_ADMIN_PASSWORD must name a server admin (test_js_sdk.py sets them)");
        const admin = await loggedInSyncingClient(ADMIN);
        extraClients.push(admin);

        // An ordinary user may not publish, not even their own room.
        const { room_id: mine } = await withTimeout(alice.createRoom({ name: unique("Mine"), preset: Preset.PublicChat }), "createRoom");
        await expectMatrixError(
            alice.setRoomDirectoryVisibility(mine, Visibility.Public),
            "M_FORBIDDEN",
            403,
            "a non-admin publishing a room",
        );
        assert.equal((await withTimeout(alice.getRoomDirectoryVisibility(mine), "GET /directory/list/room")).visibility, "private");

        const topicWord = `wombat${Math.random().toString(36).slice(2, 7).replace(/\d/g, "w")}`;
        const aliasLocal = aliasLocalpart("lobby");
        const lobbyName = unique("Lobby");
        const { room_id: lobby } = await withTimeout(
            admin.createRoom({
                name: lobbyName,
                topic: `Everyone welcome, ${topicWord}`,
                preset: Preset.PublicChat,
                room_alias_name: aliasLocal,
            }),
            "admin createRoom",
        );
        await withTimeout(admin.setRoomDirectoryVisibility(lobby, Visibility.Public), "admin publishes the lobby");
        assert.equal((await withTimeout(bob.getRoomDirectoryVisibility(lobby), "GET visibility")).visibility, "public");
        await withTimeout(bob.joinRoom(lobby), "bob joins the public lobby");
        await waitForMembership(bob, lobby, "join");

        // Published at creation time too.
        const { room_id: second } = await withTimeout(
            admin.createRoom({ name: unique("Second"), visibility: Visibility.Public, preset: Preset.PublicChat }),
            "admin createRoom visibility=public",
        );

        const listing = await withTimeout(alice.publicRooms(), "GET /publicRooms");
        // (On a fresh server these are the only published rooms; filtering keeps
        // the test meaningful against a server that has others.)
        const ours = listing.chunk.filter((c) => c.room_id === lobby || c.room_id === second);
        assert.deepEqual(ours.map((c) => c.room_id), [lobby, second], "most members first");
        const entry = ours[0];
        assert.equal(entry.name, lobbyName);
        assert.equal(entry.topic, `Everyone welcome, ${topicWord}`);
        assert.equal(entry.num_joined_members, 2);
        assert.equal(entry.canonical_alias, `#${aliasLocal}:${admin.getDomain()}`);
        assert.equal(entry.join_rule, "public");
        assert.equal(entry.world_readable, false);
        assert.equal(entry.guest_can_join, false);
        assert.equal(listing.total_room_count_estimate, listing.chunk.length);

        const searched = await withTimeout(alice.publicRooms({ filter: { generic_search_term: topicWord.toUpperCase() } }), "POST /publicRooms search");
        assert.deepEqual(searched.chunk.map((c) => c.room_id), [lobby]);

        // Paging one room at a time walks the same list.
        const paged = [];
        let since;
        for (let i = 0; ; i++) {
            assert.ok(i <= listing.chunk.length, "paging did not end");
            const page = await withTimeout(alice.publicRooms({ limit: 1, since }), "GET /publicRooms?limit=1");
            assert.ok(page.chunk.length <= 1, `page size: ${JSON.stringify(page)}`);
            paged.push(...page.chunk.map((c) => c.room_id));
            if (!page.next_batch) break;
            since = page.next_batch;
        }
        assert.deepEqual(paged, listing.chunk.map((c) => c.room_id));

        // A room's moderator may take it out of the directory; it is gone from the list.
        await withTimeout(admin.setRoomDirectoryVisibility(second, Visibility.Private), "unpublish");
        const afterUnpublish = (await withTimeout(alice.publicRooms(), "GET /publicRooms")).chunk.map((c) => c.room_id);
        assert.ok(afterUnpublish.includes(lobby) && !afterUnpublish.includes(second), JSON.stringify(afterUnpublish));
        // bob (joined, power 0) may not unpublish the lobby.
        await expectMatrixError(bob.setRoomDirectoryVisibility(lobby, Visibility.Private), "M_FORBIDDEN", 403, "bob unpublishing");
    });
});

describe("user directory", { timeout: TEST_MS }, () => {
    const tag = Math.random().toString(36).slice(2, 8).replace(/\d/g, "k");

    it("searchUserDirectory finds room-mates by name and ID, not strangers; limit sets limited", async () => {
        const roomId = await sharedRoom(alice, bob);
        const mate = clientFor(await passwordLogin(EXTRA_USERS[1]));
        await withTimeout(alice.invite(roomId, mate.getUserId()), "invite a second room-mate");
        await withTimeout(mate.joinRoom(roomId), "the second room-mate joins");
        await withTimeout(bob.setDisplayName(`Bobby ${tag} Tables`), "bob's display name");
        await withTimeout(mate.setDisplayName(`Bobby ${tag} Mate`), "the room-mate's display name");
        const stranger = clientFor(await passwordLogin(EXTRA_USERS[0]));
        await withTimeout(stranger.setDisplayName(`Bobby ${tag} Stranger`), "the stranger's display name");

        const found = await withTimeout(alice.searchUserDirectory({ term: `bobby ${tag}` }), "POST /user_directory/search");
        assert.deepEqual(
            found.results.map((r) => r.user_id).sort(),
            [bob.getUserId(), mate.getUserId()].sort(),
            "room-mates only: the stranger shares no room with alice",
        );
        assert.equal(found.results.find((r) => r.user_id === bob.getUserId()).display_name, `Bobby ${tag} Tables`);
        assert.equal(found.limited, false);
        const byId = await withTimeout(alice.searchUserDirectory({ term: bob.getUserId().slice(1, 8) }), "search by user ID");
        assert.ok(byId.results.some((r) => r.user_id === bob.getUserId()), JSON.stringify(byId));
        const limited = await withTimeout(alice.searchUserDirectory({ term: `bobby ${tag}`, limit: 1 }), "search, limit 1");
        assert.equal(limited.results.length, 1);
        assert.equal(limited.limited, true);
    });

    it("searchUserDirectory finds users joined to a room with a public join rule", async () => {
        // users.yaml: the server MUST at a minimum consider "users who are joined to
        // rooms known to the homeserver that have a `public` join rule" (published
        // in the room directory or not).
        const outsider = clientFor(await passwordLogin(EXTRA_USERS[2]));
        await withTimeout(outsider.setDisplayName(`Zed ${tag} Outsider`), "display name");
        const { room_id: open } = await withTimeout(
            outsider.createRoom({ preset: Preset.PublicChat, name: unique("Open door") }),
            "a room with join_rule public",
        );
        const rules = await withTimeout(outsider.getStateEvent(open, EventType.RoomJoinRules, ""), "GET join_rules");
        assert.equal(rules.join_rule, "public");
        const found = await withTimeout(alice.searchUserDirectory({ term: `zed ${tag}` }), "POST /user_directory/search");
        assert.deepEqual(found.results.map((r) => r.user_id), [outsider.getUserId()], JSON.stringify(found));
    });
});

describe("devices", { timeout: TEST_MS }, () => {
    it("getDevices, setDeviceDetails, and deleteDevice behind UIA logs the other session out", async () => {
        const login = await passwordLogin(USER1, { deviceName: "laptop" });
        const second = clientFor(login);
        extraClients.push(second);
        await startSyncing(second);
        const otherDevice = login.device_id;
        assert.notEqual(otherDevice, alice.getDeviceId());

        const { devices } = await withTimeout(alice.getDevices(), "GET /devices");
        const byId = Object.fromEntries(devices.map((d) => [d.device_id, d]));
        assert.ok(byId[alice.getDeviceId()], "this session's device");
        assert.equal(byId[otherDevice]?.display_name, "laptop");
        assert.equal(typeof byId[otherDevice].last_seen_ts, "number", JSON.stringify(byId[otherDevice]));

        await withTimeout(alice.setDeviceDetails(otherDevice, { display_name: "work laptop" }), "PUT /devices/{id}");
        assert.equal((await withTimeout(alice.getDevice(otherDevice), "GET /devices/{id}")).display_name, "work laptop");
        await expectMatrixError(alice.getDevice("NOSUCHDEVICE"), "M_NOT_FOUND", 404, "GET an unknown device");
        // bob cannot see or rename alice's devices.
        await expectMatrixError(bob.getDevice(otherDevice), "M_NOT_FOUND", 404, "bob GETs alice's device");

        // Deleting it: 401 with flows, then a wrong password (M_FORBIDDEN), then the right one.
        const gone = loggedOut(second);
        const { stages } = await withPasswordAuth(
            alice,
            (auth) => alice.deleteDevice(otherDevice, auth),
            ["not the password", USER1.password],
            "DELETE /devices/{id} with user-interactive auth",
        );
        assert.deepEqual(
            stages.map((s) => [s.stage, s.errcode ?? null]),
            [["m.login.password", null], ["m.login.password", "M_FORBIDDEN"]],
            "InteractiveAuth asked for the password, then again after the wrong one",
        );
        await expectMatrixError(second.whoami(), "M_UNKNOWN_TOKEN", 401, "the deleted session's token");
        await withTimeout(gone, "the deleted session to emit Session.logged_out");
        const after = (await withTimeout(alice.getDevices(), "GET /devices")).devices.map((d) => d.device_id);
        assert.ok(!after.includes(otherDevice), `deleted device still listed: ${JSON.stringify(after)}`);
        assert.ok(after.includes(alice.getDeviceId()), "this session survives");
        // alice's own sync loop is unaffected.
        assert.notEqual(alice.getSyncState(), sdk.SyncState.Error);
    });

    it("deleteMultipleDevices behind UIA", async () => {
        const logins = [await passwordLogin(USER2, { deviceName: "phone" }), await passwordLogin(USER2, { deviceName: "tablet" })];
        const ids = logins.map((l) => l.device_id);
        const { result } = await withPasswordAuth(
            bob,
            (auth) => bob.deleteMultipleDevices(ids, auth),
            [USER2.password],
            "POST /delete_devices with user-interactive auth",
        );
        assert.deepEqual(result, {});
        for (const login of logins) {
            await expectMatrixError(clientFor(login).whoami(), "M_UNKNOWN_TOKEN", 401, `deleted device ${login.device_id}`);
        }
        const left = (await withTimeout(bob.getDevices(), "GET /devices")).devices.map((d) => d.device_id);
        assert.ok(ids.every((id) => !left.includes(id)), JSON.stringify(left));
        assert.ok(left.includes(bob.getDeviceId()));
    });
});

describe("account deactivation", { timeout: TEST_MS }, () => {
    it("deactivateAccount with password auth logs out, leaves rooms, and blocks login", async () => {
        const throwaway = EXTRA_USERS[4];
        const victim = await loggedInSyncingClient(throwaway);
        extraClients.push(victim);
        const { room_id: roomId } = await withTimeout(alice.createRoom({ name: unique("Farewell"), invite: [throwaway.userId] }), "createRoom");
        await waitForMembership(victim, roomId, "invite");
        await withTimeout(victim.joinRoom(roomId), "join");
        await waitForMemberOf(alice, roomId, throwaway.userId, "join");
        const { event_id: words } = await withTimeout(victim.sendTextMessage(roomId, "my words stay"), "send");
        await waitForEvent(alice, roomId, words);

        const gone = loggedOut(victim);
        const { result, stages } = await withPasswordAuth(
            victim,
            (auth) => victim.deactivateAccount(auth, false),
            [throwaway.password],
            "POST /account/deactivate with user-interactive auth",
        );
        assert.deepEqual(stages.map((s) => s.stage), ["m.login.password"]);
        assert.ok(
            ["success", "no-support"].includes(result.id_server_unbind_result),
            `id_server_unbind_result: ${JSON.stringify(result)}`,
        );
        await expectMatrixError(victim.whoami(), "M_UNKNOWN_TOKEN", 401, "the deactivated account's token");
        await withTimeout(gone, "Session.logged_out on the deactivated client");
        await waitForMemberOf(alice, roomId, throwaway.userId, "leave");
        assert.ok(alice.getRoom(roomId).findEventById(words), "the message stays");

        let err;
        try {
            await passwordLogin(throwaway);
        } catch (e) {
            err = e;
        }
        assert.ok(err instanceof sdk.MatrixError, `login after deactivation should fail: ${err}`);
        assert.equal(err.httpStatus, 403);
        assert.ok(["M_FORBIDDEN", "M_USER_DEACTIVATED"].includes(err.errcode), err.errcode);
    });
});

describe("room upgrades", { timeout: TEST_MS }, () => {
    it("upgradeRoom: both clients see the tombstone, the other member joins the replacement", async () => {
        const name = unique("Old room");
        const aliasLocal = aliasLocalpart("upgrade");
        const roomId = await sharedRoom(alice, bob, { name, topic: "to be upgraded", room_alias_name: aliasLocal });
        const alias = `#${aliasLocal}:${alice.getDomain()}`;
        await expectMatrixError(bob.upgradeRoom(roomId, "11"), "M_FORBIDDEN", 403, "bob (power 0) upgrading");
        await expectMatrixError(alice.upgradeRoom(roomId, "3"), "M_UNSUPPORTED_ROOM_VERSION", 400, "upgrade to an unsupported version");

        const { replacement_room: newRoomId } = await withTimeout(alice.upgradeRoom(roomId, "11"), "POST /upgrade");
        assert.match(newRoomId, /^!/);
        for (const client of [alice, bob]) {
            await waitFor(
                () =>
                    client.getRoom(roomId)?.currentState.getStateEvents(EventType.RoomTombstone, "")?.getContent()
                        .replacement_room === newRoomId,
                `${client.getUserId()} to see the tombstone`,
                { describe: () => describeRoom(client, roomId) },
            );
        }
        await waitForMembership(alice, newRoomId, "join");
        const newRoom = alice.getRoom(newRoomId);
        assert.equal(newRoom.getVersion(), "11");
        assert.equal(newRoom.findPredecessor()?.roomId, roomId);
        await waitFor(() => newRoom.name === name, "the name carried over", { describe: () => describeRoom(alice, newRoomId) });
        assert.deepEqual(alice.getRoomUpgradeHistory(newRoomId, true).map((r) => r.roomId), [roomId, newRoomId]);
        assert.equal((await withTimeout(bob.getRoomIdForAlias(alias), "resolve the alias")).room_id, newRoomId, "the alias moved");

        // bob follows: the room was invite-only, so he is invited to the replacement.
        await waitForMembership(bob, newRoomId, "invite");
        await withTimeout(bob.joinRoom(newRoomId), "bob joins the replacement");
        await waitForMembership(bob, newRoomId, "join");
        assert.equal(bob.getRoom(newRoomId).findPredecessor()?.roomId, roomId);
        await expectMatrixError(
            bob.sendTextMessage(roomId, "anyone still here?"),
            "M_FORBIDDEN",
            403,
            "talking in the old room",
        );
        const { event_id: hello } = await withTimeout(bob.sendTextMessage(newRoomId, "hello new room"), "send in the new room");
        await waitForEvent(alice, newRoomId, hello);
    });
});
