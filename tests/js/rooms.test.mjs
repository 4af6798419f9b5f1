// Rooms, messages, sync, pagination, state and power levels through
// matrix-js-sdk's real sync loop against a running Bastion.
//
// Two users (alice = USER1, bob = USER2) each run a started MatrixClient (no
// E2EE, in-memory store, "detached" pending events so local echoes are
// observable). Every test creates its own room, so one failure does not
// cascade into the others.

import assert from "node:assert/strict";
import { after, before, describe, it } from "node:test";

import {
    EXTRA_USERS,
    TEST_MS,
    USER1,
    USER2,
    clientFor,
    describeRoom,
    expectMatrixError,
    liveEvents,
    loggedInSyncingClient,
    messageBodies,
    passwordLogin,
    rawSyncTimeline,
    sdk,
    startSyncing,
    stopAll,
    unique,
    waitFor,
    waitForMemberOf,
    waitForMembership,
    withTimeout,
} from "./helpers.mjs";

const { Direction, EventStatus, EventType, KnownMembership } = sdk;

let alice;
let bob;
const extraClients = [];

before(async () => {
    alice = await loggedInSyncingClient(USER1);
    bob = await loggedInSyncingClient(USER2);
});

after(() => stopAll(alice, bob, ...extraClients));

const both = () => [alice, bob];

/**
 * Wait until each client's live timeline for `roomId` holds as many messages as
 * `bodies`, then require exactly `bodies` (so duplicates or reordering that
 * have arrived by then fail the test).
 */
async function waitForBodies(clients, roomId, bodies) {
    for (const client of clients) {
        await waitFor(
            () => {
                const room = client.getRoom(roomId);
                if (!room) return false;
                const got = messageBodies(room);
                return got.length >= bodies.length;
            },
            `${client.getUserId()} to receive ${bodies.length} messages in ${roomId}`,
            { describe: () => describeRoom(client, roomId) },
        );
    }
    for (const client of clients) {
        assert.deepEqual(
            messageBodies(client.getRoom(roomId)),
            bodies,
            `${client.getUserId()}'s timeline for ${roomId}: ${JSON.stringify(describeRoom(client, roomId), null, 2)}`,
        );
    }
}

/** alice creates a room (name/topic), invites bob, bob joins; both see it via sync. */
async function sharedRoom(name = unique("Room"), topic = unique("Topic")) {
    const { room_id: roomId } = await withTimeout(alice.createRoom({ name, topic }), "createRoom");
    await waitForMembership(alice, roomId, KnownMembership.Join);
    await withTimeout(alice.invite(roomId, bob.getUserId()), "invite");
    await waitForMembership(bob, roomId, KnownMembership.Invite);
    await withTimeout(bob.joinRoom(roomId), "joinRoom");
    await waitForMembership(bob, roomId, KnownMembership.Join);
    await waitForMemberOf(alice, roomId, bob.getUserId(), KnownMembership.Join);
    return { roomId, name, topic };
}

describe("rooms through the sync loop", { timeout: TEST_MS }, () => {
    it("creates a room with name and topic; the invitee sees the invite via sync and joins", async () => {
        const name = unique("Ops");
        const topic = unique("On call");
        const { room_id: roomId } = await withTimeout(alice.createRoom({ name, topic }), "createRoom");
        assert.match(roomId, /^!.+:.+$/);

        // The creator's client learns about the room from /sync.
        await waitForMembership(alice, roomId, KnownMembership.Join);
        await waitFor(() => alice.getRoom(roomId).name === name, "alice's room name from sync", {
            describe: () => describeRoom(alice, roomId),
        });
        const aliceRoom = alice.getRoom(roomId);
        const create = aliceRoom.currentState.getStateEvents(EventType.RoomCreate, "");
        assert.ok(create, "m.room.create in current state");
        assert.equal(create.getSender(), alice.getUserId());
        assert.equal(aliceRoom.currentState.getStateEvents(EventType.RoomTopic, "")?.getContent().topic, topic);
        assert.equal(aliceRoom.getCreator(), alice.getUserId());

        // Invite bob; his own client sees the invite arrive through /sync.
        const invited = new Promise((resolve) => {
            const onMembership = (event, member) => {
                if (member.roomId === roomId && member.userId === bob.getUserId() && member.membership === "invite") {
                    bob.off(sdk.RoomMemberEvent.Membership, onMembership);
                    resolve(event);
                }
            };
            bob.on(sdk.RoomMemberEvent.Membership, onMembership);
        });
        await withTimeout(alice.invite(roomId, bob.getUserId()), "invite");
        const inviteEvent = await withTimeout(invited, "RoomMember.membership=invite on bob's client");
        assert.equal(inviteEvent.getSender(), alice.getUserId(), "invite is from alice");
        assert.equal(bob.getRoom(roomId).getMyMembership(), KnownMembership.Invite);
        // invite_state (stripped state) lets the invitee's client show what it is invited to.
        assert.equal(bob.getRoom(roomId).name, name, "room name from invite_state");

        await withTimeout(bob.joinRoom(roomId), "joinRoom");
        await waitForMembership(bob, roomId, KnownMembership.Join);
        await waitForMemberOf(alice, roomId, bob.getUserId(), KnownMembership.Join);
        assert.deepEqual(
            alice.getRoom(roomId).getJoinedMembers().map((m) => m.userId).sort(),
            [alice.getUserId(), bob.getUserId()].sort(),
        );
        assert.equal(bob.getRoom(roomId).getJoinedMemberCount(), 2);
    });

    it("room name and topic are visible to both clients and follow state changes", async () => {
        const { roomId, name, topic } = await sharedRoom();
        for (const client of both()) {
            const room = client.getRoom(roomId);
            assert.equal(room.name, name, `${client.getUserId()}: room.name`);
            assert.equal(
                room.currentState.getStateEvents(EventType.RoomName, "")?.getContent().name,
                name,
                `${client.getUserId()}: m.room.name in currentState`,
            );
            assert.equal(
                room.currentState.getStateEvents(EventType.RoomTopic, "")?.getContent().topic,
                topic,
                `${client.getUserId()}: m.room.topic in currentState`,
            );
        }

        const newName = unique("Renamed");
        const newTopic = unique("New topic");
        await withTimeout(alice.setRoomName(roomId, newName), "setRoomName");
        await withTimeout(alice.setRoomTopic(roomId, newTopic), "setRoomTopic");
        for (const client of both()) {
            await waitFor(
                () => {
                    const room = client.getRoom(roomId);
                    return (
                        room.name === newName &&
                        room.currentState.getStateEvents(EventType.RoomTopic, "")?.getContent().topic === newTopic
                    );
                },
                `${client.getUserId()} to see the new name and topic`,
                { describe: () => describeRoom(client, roomId) },
            );
        }

        // The state the SDK assembled from sync agrees with GET /state.
        const state = await withTimeout(bob.roomState(roomId), "GET /rooms/{roomId}/state");
        const byKey = new Map(state.map((e) => [`${e.type}|${e.state_key}`, e]));
        assert.equal(byKey.get("m.room.name|")?.content.name, newName);
        assert.equal(byKey.get("m.room.topic|")?.content.topic, newTopic);
        assert.equal(byKey.get(`m.room.member|${bob.getUserId()}`)?.content.membership, "join");
    });

    it("both users' messages reach both clients in the same order", async () => {
        const { roomId } = await sharedRoom();
        const tag = unique("m");
        const sent = [];
        // Alternate senders, each send completing before the next starts.
        for (let i = 0; i < 3; i++) {
            for (const [who, client] of [["alice", alice], ["bob", bob]]) {
                const body = `${tag} ${who} ${i}`;
                await withTimeout(client.sendTextMessage(roomId, body), `send '${body}'`);
                sent.push(body);
            }
        }
        await waitForBodies(both(), roomId, sent);

        // A burst from one user without waiting for each send: the SDK queues
        // them per room, and everyone must see them in that order.
        const burst = Array.from({ length: 5 }, (_, i) => `${tag} burst ${i}`);
        await withTimeout(Promise.all(burst.map((b) => alice.sendTextMessage(roomId, b))), "burst of sends");
        await waitForBodies(both(), roomId, [...sent, ...burst]);

        // Both users sending at once: whatever order the server picks, both
        // clients must agree on it.
        await withTimeout(
            Promise.all(
                [0, 1, 2, 3, 4].flatMap((i) => [
                    alice.sendTextMessage(roomId, `${tag} race alice ${i}`),
                    bob.sendTextMessage(roomId, `${tag} race bob ${i}`),
                ]),
            ),
            "concurrent sends",
        );
        for (const client of both()) {
            await waitFor(
                () => messageBodies(client.getRoom(roomId)).filter((b) => b.includes(" race ")).length === 10,
                `${client.getUserId()} to receive the racing messages`,
                { describe: () => describeRoom(client, roomId) },
            );
        }
        const raced = (client) => messageBodies(client.getRoom(roomId)).filter((b) => b.includes(" race "));
        assert.deepEqual(raced(alice), raced(bob), "both clients see the same interleaving");
        for (const who of ["alice", "bob"]) {
            assert.deepEqual(
                raced(alice).filter((b) => b.includes(` ${who} `)),
                [0, 1, 2, 3, 4].map((i) => `${tag} race ${who} ${i}`),
                `${who}'s own messages stay in send order`,
            );
        }

        // Same event IDs in the same order on both sides.
        const ids = (client) =>
            liveEvents(client.getRoom(roomId))
                .filter((e) => e.getType() === "m.room.message")
                .map((e) => e.getId());
        assert.deepEqual(ids(alice), ids(bob));
        for (const id of ids(alice)) assert.match(id, /^\$/, "every message has a server event ID");
    });

    it("local echo is resolved by the remote echo carrying the transaction ID", async () => {
        const { roomId } = await sharedRoom();
        const body = unique("echo");
        const echoes = [];
        // (event, room, oldEventId?, oldStatus?): the last two only on status changes.
        const onEcho = (event, room, oldEventId, oldStatus) => {
            if (room.roomId !== roomId) return;
            echoes.push({
                id: event.getId(),
                oldEventId: typeof oldEventId === "string" ? oldEventId : undefined,
                oldStatus: typeof oldStatus === "string" || oldStatus === null ? oldStatus : undefined,
                status: event.status,
            });
        };
        alice.on(sdk.RoomEvent.LocalEchoUpdated, onEcho);
        try {
            const { event_id: eventId } = await withTimeout(alice.sendTextMessage(roomId, body), "send");
            assert.match(eventId, /^\$/);

            const aliceRoom = alice.getRoom(roomId);
            // The pending local echo becomes a normal event (status null) once the
            // remote echo has been matched to it.
            await waitFor(
                () => {
                    const ev = aliceRoom.findEventById(eventId);
                    return ev && ev.status === null && aliceRoom.getPendingEvents().length === 0;
                },
                "alice's local echo to be replaced by the remote echo",
                { describe: () => ({ room: describeRoom(alice, roomId), echoes }) },
            );
            // Wait for bob too, then check for duplicates on both sides.
            await waitFor(() => bob.getRoom(roomId)?.findEventById(eventId), "bob to receive the message", {
                describe: () => describeRoom(bob, roomId),
            });
            for (const client of both()) {
                const matching = liveEvents(client.getRoom(roomId)).filter((e) => e.getContent().body === body);
                assert.equal(
                    matching.length,
                    1,
                    `${client.getUserId()} should have exactly one copy: ${JSON.stringify(describeRoom(client, roomId), null, 2)}`,
                );
                assert.equal(matching[0].getId(), eventId);
                assert.equal(matching[0].status, null);
            }
            assert.ok(
                echoes.some((e) => e.id === eventId && e.status === null),
                `RoomEvent.LocalEchoUpdated to status null for ${eventId}: ${JSON.stringify(echoes)}`,
            );

            // On the wire: the SDK's PUT /send used some txnId; the sender's /sync
            // must carry it back in unsigned.transaction_id, the other user's must not.
            const send = alice.wire.sends.find((s) => s.eventId === eventId);
            assert.ok(send, `recorded PUT /send for ${eventId}: ${JSON.stringify(alice.wire.sends)}`);
            assert.equal(send.status, 200);
            const mine = rawSyncTimeline(alice.wire, roomId).filter((e) => e.event_id === eventId);
            assert.equal(mine.length, 1, `alice's /sync should deliver ${eventId} exactly once`);
            assert.equal(
                mine[0].unsigned?.transaction_id,
                send.txnId,
                `unsigned of the sender's copy: ${JSON.stringify(mine[0].unsigned)}`,
            );
            const theirs = rawSyncTimeline(bob.wire, roomId).filter((e) => e.event_id === eventId);
            assert.equal(theirs.length, 1, `bob's /sync should deliver ${eventId} exactly once`);
            assert.equal(theirs[0].unsigned?.transaction_id, undefined, "transaction_id must not leak to other users");
        } finally {
            alice.off(sdk.RoomEvent.LocalEchoUpdated, onEcho);
        }
    });

    it("back-pagination with scrollback reaches m.room.create", async () => {
        const { roomId, name } = await sharedRoom();
        const tag = unique("p");
        const bodies = Array.from({ length: 25 }, (_, i) => `${tag} ${i}`);
        for (const body of bodies) await withTimeout(alice.sendTextMessage(roomId, body), `send ${body}`);
        await waitForBodies([bob], roomId, bodies);

        // A fresh session for bob that only gets the last few events in its
        // initial sync, so the rest must come from /messages.
        const fresh = await loggedInSyncingClient(USER2, { startOpts: { initialSyncLimit: 3 } });
        extraClients.push(fresh);
        const room = fresh.getRoom(roomId);
        assert.ok(room, "room present after initial sync");
        assert.equal(room.name, name);
        assert.ok(liveEvents(room).length <= 3, `initial sync should be limited: ${liveEvents(room).length} events`);
        assert.notEqual(room.oldState.paginationToken, null, "a limited timeline needs a prev_batch token");

        let requests = 0;
        while (liveEvents(room)[0]?.getType() !== EventType.RoomCreate) {
            assert.ok(room.oldState.paginationToken !== null, "ran out of history before reaching m.room.create");
            assert.ok(++requests <= 20, "too many scrollback requests");
            await withTimeout(fresh.scrollback(room, 7), "scrollback");
        }
        const events = liveEvents(room);
        assert.equal(events[0].getType(), EventType.RoomCreate);
        assert.ok(requests >= 4, `25+ events in pages of 7 should take several requests, took ${requests}`);
        const ids = events.map((e) => e.getId());
        assert.equal(new Set(ids).size, ids.length, "no duplicate events after scrollback");
        assert.deepEqual(messageBodies(room), bodies, "every message, in order");
        // The stitched timeline matches the long-running client's view event for event.
        const bobIds = liveEvents(bob.getRoom(roomId)).map((e) => e.getId());
        assert.deepEqual(ids.slice(-bobIds.length), bobIds);
        // Once m.room.create is reached, a further scrollback finds nothing more.
        await withTimeout(fresh.scrollback(room, 7), "scrollback past the start");
        assert.equal(liveEvents(room)[0].getType(), EventType.RoomCreate);
        assert.equal(room.oldState.paginationToken, null, "start of the room: no more pagination");
        fresh.stopClient();
    });

    it("createMessagesRequest pages backwards to m.room.create and forwards again", async () => {
        const { roomId } = await sharedRoom();
        const tag = unique("q");
        const bodies = Array.from({ length: 12 }, (_, i) => `${tag} ${i}`);
        for (const body of bodies) await withTimeout(bob.sendTextMessage(roomId, body), `send ${body}`);
        await waitForBodies([alice], roomId, bodies);

        // Backwards from the live end: the spec lets /messages start from a
        // /sync next_batch token.
        const liveToken = alice.getSyncStateData()?.nextSyncToken ?? alice.store.getSyncToken();
        assert.ok(liveToken, "client has a /sync next_batch token");
        const backwards = [];
        let from = liveToken;
        let lastEnd;
        for (let page = 0; ; page++) {
            assert.ok(page < 30, "too many pages");
            const res = await withTimeout(alice.createMessagesRequest(roomId, from, 5, Direction.Backward), "/messages dir=b");
            assert.ok(Array.isArray(res.chunk));
            assert.ok(res.chunk.length <= 5, `limit=5 but got ${res.chunk.length} events`);
            assert.equal(typeof res.start, "string");
            backwards.push(...res.chunk);
            if (!res.end) break;
            from = res.end;
            lastEnd = res.end;
        }
        assert.equal(backwards.at(-1).type, "m.room.create", "paging back ends at m.room.create");
        const ids = backwards.map((e) => e.event_id);
        assert.equal(new Set(ids).size, ids.length, "no event twice across pages");
        assert.deepEqual(
            backwards.filter((e) => e.type === "m.room.message").map((e) => e.content.body).reverse(),
            bodies,
        );

        // Without `from` (Matrix 1.3+), dir=b starts at the newest event.
        const newest = await withTimeout(alice.createMessagesRequest(roomId, null, 3, Direction.Backward), "/messages without from");
        assert.deepEqual(newest.chunk.map((e) => e.event_id), ids.slice(0, 3));

        // Forwards from the token of the last non-final page returns the same
        // events in chronological order.
        assert.ok(lastEnd, "more than one page");
        const forward = await withTimeout(
            alice.createMessagesRequest(roomId, lastEnd, 100, Direction.Forward),
            "/messages dir=f",
        );
        const forwardIds = forward.chunk.map((e) => e.event_id);
        const chronological = ids.slice().reverse();
        assert.ok(forwardIds.length >= bodies.length, "forward page covers every message");
        assert.deepEqual(forwardIds, chronological.slice(chronological.length - forwardIds.length));
    });

    it("after a gap, the limited incremental sync is stitched back together by back-pagination", async () => {
        const { roomId } = await sharedRoom();
        await withTimeout(alice.sendTextMessage(roomId, "before the gap"), "send");

        // A client whose store survives a restart (as IndexedDB-backed clients
        // do) so that startClient resumes with an incremental /sync from the
        // saved token, with a small timeline limit so the catch-up is limited.
        const store = new sdk.MemoryStore();
        store.getSavedSyncToken = async () => store.getSyncToken();
        const login = await passwordLogin(USER2);
        const offline = clientFor(login, { store });
        extraClients.push(offline);
        const filter = () => {
            const f = new sdk.Filter(offline.getUserId());
            f.setTimelineLimit(4);
            return f;
        };
        await startSyncing(offline, { filter: filter() });
        await waitFor(
            () => offline.getRoom(roomId) && messageBodies(offline.getRoom(roomId)).includes("before the gap"),
            "the to-be-offline client to see 'before the gap'",
            { describe: () => describeRoom(offline, roomId) },
        );
        offline.stopClient();
        const syncsBefore = offline.wire.syncs.length;

        // While it is away the room is renamed and re-topiced, then more than
        // `limit` messages bury those state changes outside the timeline window.
        const newName = unique("Renamed in the gap");
        const newTopic = unique("Topic from the gap");
        await withTimeout(alice.setRoomName(roomId, newName), "setRoomName");
        await withTimeout(alice.setRoomTopic(roomId, newTopic), "setRoomTopic");
        const tag = unique("gap");
        const missed = Array.from({ length: 10 }, (_, i) => `${tag} ${i}`);
        for (const body of missed) await withTimeout(alice.sendTextMessage(roomId, body), `send ${body}`);
        await waitForBodies([bob], roomId, ["before the gap", ...missed]);

        await startSyncing(offline, { filter: filter() });
        const room = offline.getRoom(roomId);
        await waitFor(() => messageBodies(room).includes(missed.at(-1)), "the restarted client to catch up", {
            describe: () => describeRoom(offline, roomId),
        });

        // On the wire: one incremental sync with the last 4 events, limited, and a prev_batch.
        const catchUp = offline.wire.syncs.slice(syncsBefore).map((b) => b?.rooms?.join?.[roomId]).filter(Boolean);
        assert.ok(catchUp.length >= 1, "the room appears in a sync after the restart");
        const timeline = catchUp[0].timeline;
        assert.equal(timeline.limited, true, `catch-up timeline should be limited: ${JSON.stringify(timeline)}`);
        assert.equal(typeof timeline.prev_batch, "string", "a limited timeline carries prev_batch");
        assert.deepEqual(
            timeline.events.map((e) => e.content.body),
            missed.slice(-4),
            "the catch-up timeline is the newest `limit` events",
        );

        // State changed inside the gap arrives in the `state` block (it is not in
        // the timeline window), so the client shows the current name and topic.
        const stateTypes = (catchUp[0].state?.events ?? []).map((e) => e.type);
        assert.ok(stateTypes.includes("m.room.name"), `state block should carry the new name: ${JSON.stringify(stateTypes)}`);
        assert.equal(room.name, newName, "room name after the gappy sync");
        assert.equal(room.currentState.getStateEvents(EventType.RoomTopic, "")?.getContent().topic, newTopic);

        // The SDK reset the live timeline rather than silently joining across the gap.
        const stitched = () => messageBodies(room).filter((b) => b === "before the gap" || b.startsWith(tag));
        assert.deepEqual(stitched(), missed.slice(-4), "no silent gap after the limited sync");

        // Back-paginate until the missing events are back, in order.
        for (let i = 0; !missed.every((b) => stitched().includes(b)); i++) {
            assert.ok(i < 10, `scrollback never recovered the gap: ${JSON.stringify(stitched())}`);
            assert.notEqual(room.oldState.paginationToken, null, "pagination ended inside the gap");
            await withTimeout(offline.scrollback(room, 3), "scrollback into the gap");
        }
        const recovered = stitched();
        const start = recovered.indexOf(missed[0]);
        assert.deepEqual(recovered.slice(start), missed, "the gap is filled in order, without duplicates");
        offline.stopClient();
    });

    it("a rejected invite is seen by the inviter and leaves the invitee's room list", async () => {
        const { room_id: roomId } = await withTimeout(alice.createRoom({ name: unique("Declined") }), "createRoom");
        await withTimeout(alice.invite(roomId, bob.getUserId()), "invite");
        await waitForMembership(bob, roomId, KnownMembership.Invite);
        await withTimeout(bob.leave(roomId), "reject the invite");
        await waitForMembership(bob, roomId, KnownMembership.Leave);
        await waitForMemberOf(alice, roomId, bob.getUserId(), KnownMembership.Leave);
        // He can be invited again and join this time.
        await withTimeout(alice.invite(roomId, bob.getUserId()), "second invite");
        await waitForMembership(bob, roomId, KnownMembership.Invite);
        await withTimeout(bob.joinRoom(roomId), "join");
        await waitForMembership(bob, roomId, KnownMembership.Join);
        await waitForMemberOf(alice, roomId, bob.getUserId(), KnownMembership.Join);
    });

    it("leaving a room is seen by both clients and ends the right to send", async () => {
        const { roomId } = await sharedRoom();
        await withTimeout(bob.leave(roomId), "leave");
        await waitForMembership(bob, roomId, KnownMembership.Leave);
        await waitForMemberOf(alice, roomId, bob.getUserId(), KnownMembership.Leave);
        assert.deepEqual(alice.getRoom(roomId).getJoinedMembers().map((m) => m.userId), [alice.getUserId()]);
        await expectMatrixError(
            bob.sendEvent(roomId, EventType.RoomMessage, { msgtype: "m.text", body: "ghost" }, "ghost-txn-" + Date.now()),
            "M_FORBIDDEN",
            403,
            "sending after leaving",
        );
    });

    it("lazy-loaded members: the summary counts everyone and loadMembersIfNeeded fetches the rest", async () => {
        // Five other members join first so they fill the m.heroes slots; bob
        // joins last, sends nothing, and so is neither a hero nor a sender.
        const { room_id: roomId } = await withTimeout(alice.createRoom({ name: unique("Lazy") }), "createRoom");
        for (const extra of EXTRA_USERS.slice(0, 5)) {
            await withTimeout(alice.invite(roomId, extra.userId), `invite ${extra.userId}`);
            const other = clientFor(await passwordLogin(extra));
            await withTimeout(other.joinRoom(roomId), `${extra.userId} joins`);
        }
        await withTimeout(alice.invite(roomId, bob.getUserId()), "invite bob");
        await waitForMembership(bob, roomId, KnownMembership.Invite);
        await withTimeout(bob.joinRoom(roomId), "bob joins");
        await waitForMemberOf(alice, roomId, bob.getUserId(), KnownMembership.Join);
        const tag = unique("ll");
        const bodies = [0, 1, 2].map((i) => `${tag} ${i}`);
        for (const body of bodies) await withTimeout(alice.sendTextMessage(roomId, body), "send");
        await waitForBodies([bob], roomId, bodies);

        const lazy = await loggedInSyncingClient(USER1, {
            clientOpts: { lazyLoadMembers: true },
            startOpts: { lazyLoadMembers: true, initialSyncLimit: 3 },
        });
        extraClients.push(lazy);
        const room = lazy.getRoom(roomId);
        assert.ok(room, "room present");
        const initial = lazy.wire.syncs[0]?.rooms?.join?.[roomId];
        assert.deepEqual(initial.timeline.events.map((e) => e.content.body), bodies, "timeline limited to 3");
        assert.equal(initial.summary?.["m.joined_member_count"], 7, `summary: ${JSON.stringify(initial.summary)}`);
        assert.equal(room.getJoinedMemberCount(), 7, "joined count from the summary");
        const syncedMembers = (initial.state?.events ?? [])
            .concat(initial.timeline.events)
            .filter((e) => e.type === "m.room.member")
            .map((e) => e.state_key);
        assert.ok(syncedMembers.includes(alice.getUserId()), "own membership and the senders' are included");
        assert.ok(
            !syncedMembers.includes(bob.getUserId()),
            `lazy_load_members: bob (not a hero, no events in the window) is left out: ${JSON.stringify(syncedMembers)}`,
        );
        assert.equal(room.getMember(bob.getUserId()), null, "bob not yet known to the lazy client");

        await withTimeout(room.loadMembersIfNeeded(), "loadMembersIfNeeded (GET /members?at=...&not_membership=leave)");
        assert.ok(room.membersLoaded());
        assert.deepEqual(
            room.getJoinedMembers().map((m) => m.userId).sort(),
            [alice.getUserId(), bob.getUserId(), ...EXTRA_USERS.slice(0, 5).map((u) => u.userId)].sort(),
        );
        lazy.stopClient();
    });

    it("a redaction is echoed back and applied on both clients", async () => {
        const { roomId } = await sharedRoom();
        const body = unique("oops");
        const { event_id: eventId } = await withTimeout(bob.sendTextMessage(roomId, body), "send");
        await waitFor(() => alice.getRoom(roomId).findEventById(eventId), "alice to receive the message");
        const { event_id: redactionId } = await withTimeout(bob.redactEvent(roomId, eventId, undefined, { reason: "typo" }), "redactEvent");
        assert.match(redactionId, /^\$/);
        for (const client of both()) {
            const room = client.getRoom(roomId);
            await waitFor(
                () => room.findEventById(eventId)?.isRedacted() && room.getPendingEvents().length === 0,
                `${client.getUserId()} to see ${eventId} redacted`,
                { describe: () => describeRoom(client, roomId) },
            );
            const ev = room.findEventById(eventId);
            assert.deepEqual(ev.getContent(), {}, "redacted content is stripped");
            assert.equal(ev.getUnsigned().redacted_because?.event_id ?? ev.getRedactionEvent()?.event_id, redactionId);
            const copies = liveEvents(room).filter((e) => e.getId() === redactionId || e.getId() === eventId);
            assert.equal(copies.length, 2, `one message and one redaction: ${JSON.stringify(describeRoom(client, roomId))}`);
        }
        // The server returns the redacted form too.
        const fetched = await withTimeout(alice.fetchRoomEvent(roomId, eventId), "GET /event");
        assert.deepEqual(fetched.content, {});
        assert.equal(fetched.unsigned?.redacted_because?.event_id, redactionId);
    });

    it("getEventTimeline loads a permalink's surroundings through /context", async () => {
        const { roomId } = await sharedRoom();
        const tag = unique("ctx");
        const ids = [];
        for (let i = 0; i < 9; i++) ids.push((await withTimeout(alice.sendTextMessage(roomId, `${tag} ${i}`), "send")).event_id);
        await waitForBodies([bob], roomId, [...Array(9).keys()].map((i) => `${tag} ${i}`));

        const viewer = await loggedInSyncingClient(USER2, {
            clientOpts: { timelineSupport: true },
            startOpts: { initialSyncLimit: 2 },
        });
        extraClients.push(viewer);
        const room = viewer.getRoom(roomId);
        const target = ids[3];
        assert.equal(room.getTimelineForEvent(target), null, "target is outside the initial sync window");
        const timeline = await withTimeout(viewer.getEventTimeline(room.getUnfilteredTimelineSet(), target), "getEventTimeline");
        assert.ok(timeline, "a timeline for the event");
        const bodies = timeline.getEvents().map((e) => e.getContent().body);
        const at = bodies.indexOf(`${tag} 3`);
        assert.ok(at >= 0, `the target is in its timeline: ${JSON.stringify(bodies)}`);
        assert.equal(bodies[at - 1], `${tag} 2`, "the event before it");
        assert.equal(bodies[at + 1], `${tag} 4`, "the event after it");
        // Paginating forwards from the context timeline reaches the live end.
        for (let i = 0; !timeline.getEvents().some((e) => e.getId() === ids.at(-1)); i++) {
            assert.ok(i < 10, "forward pagination never reached the newest message");
            const more = await withTimeout(
                viewer.paginateEventTimeline(timeline, { backwards: false, limit: 3 }),
                "paginateEventTimeline forwards",
            );
            if (!more) break;
        }
        const forwardBodies = timeline.getEvents().map((e) => e.getContent().body).filter((b) => b?.startsWith(tag));
        assert.deepEqual(forwardBodies.slice(forwardBodies.indexOf(`${tag} 3`)), [...Array(9).keys()].slice(3).map((i) => `${tag} ${i}`));
        viewer.stopClient();
    });

    it("a room alias resolves and can be joined by alias", async () => {
        const aliasLocal = unique("alias").replace(/\W+/g, "-").toLowerCase();
        const { room_id: roomId } = await withTimeout(
            alice.createRoom({ name: "Aliased", room_alias_name: aliasLocal, preset: sdk.Preset.PublicChat }),
            "createRoom with alias",
        );
        const alias = `#${aliasLocal}:${alice.getDomain()}`;
        const resolved = await withTimeout(bob.getRoomIdForAlias(alias), "GET /directory/room/{alias}");
        assert.equal(resolved.room_id, roomId);
        assert.ok(Array.isArray(resolved.servers) && resolved.servers.length > 0, `servers: ${JSON.stringify(resolved)}`);
        const joined = await withTimeout(bob.joinRoom(alias), "join by alias");
        assert.equal(joined.roomId, roomId);
        await waitForMembership(bob, roomId, KnownMembership.Join);
        await waitFor(
            () => bob.getRoom(roomId).getCanonicalAlias() === alias,
            "bob to see the canonical alias",
            { describe: () => describeRoom(bob, roomId) },
        );
    });

    it("a display name change reaches room members as a membership update", async () => {
        const { roomId } = await sharedRoom();
        const displayName = unique("Alice");
        await withTimeout(alice.setDisplayName(displayName), "setDisplayName");
        await waitFor(
            () => bob.getRoom(roomId).getMember(alice.getUserId())?.name === displayName,
            "bob to see alice's new display name in the room",
            { describe: () => describeRoom(bob, roomId) },
        );
        const member = bob.getRoom(roomId).getMember(alice.getUserId());
        assert.equal(member.membership, KnownMembership.Join, "still joined after the profile update");
        const profile = await withTimeout(bob.getProfileInfo(alice.getUserId()), "GET /profile");
        assert.equal(profile.displayname, displayName);
    });

    it("account data (global and per room) round-trips through sync", async () => {
        const { roomId } = await sharedRoom();
        const marker = unique("ad");
        await withTimeout(alice.setAccountData("org.bastion.test", { marker }), "PUT account_data");
        await withTimeout(alice.setRoomAccountData(roomId, "org.bastion.test.room", { marker }), "PUT room account_data");
        await waitFor(
            () =>
                alice.getAccountData("org.bastion.test")?.getContent().marker === marker &&
                alice.getRoom(roomId).getAccountData("org.bastion.test.room")?.getContent().marker === marker,
            "account data to come back through /sync",
        );
        // Private to alice.
        assert.equal(bob.getAccountData("org.bastion.test"), undefined);
        assert.equal(bob.getRoom(roomId).getAccountData("org.bastion.test.room"), undefined);
    });

    it("a user without power cannot set the room name: M_FORBIDDEN", async () => {
        const { roomId, name } = await sharedRoom();
        const powerLevels = bob.getRoom(roomId).currentState.getStateEvents(EventType.RoomPowerLevels, "");
        assert.ok(powerLevels, "power levels in state");
        assert.ok(
            !bob.getRoom(roomId).currentState.maySendStateEvent(EventType.RoomName, bob.getUserId()),
            "js-sdk agrees bob may not set the name",
        );

        await expectMatrixError(bob.setRoomName(roomId, "hijacked"), "M_FORBIDDEN", 403, "bob's setRoomName");
        await expectMatrixError(
            bob.sendStateEvent(roomId, EventType.RoomPowerLevels, {
                ...powerLevels.getContent(),
                users: { ...powerLevels.getContent().users, [bob.getUserId()]: 100 },
            }),
            "M_FORBIDDEN",
            403,
            "bob raising his own power level",
        );

        // Nothing changed for anyone, and bob can still talk.
        const body = unique("still here");
        await withTimeout(bob.sendTextMessage(roomId, body), "bob's message after the denial");
        for (const client of both()) {
            await waitFor(
                () => messageBodies(client.getRoom(roomId)).includes(body),
                `${client.getUserId()} to get bob's message`,
                { describe: () => describeRoom(client, roomId) },
            );
            assert.equal(client.getRoom(roomId).name, name, `${client.getUserId()}: name unchanged`);
        }
        const state = await withTimeout(alice.getStateEvent(roomId, EventType.RoomName, ""), "GET m.room.name");
        assert.equal(state.name, name);
    });
});
