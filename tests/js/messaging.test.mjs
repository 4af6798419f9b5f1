// Everyday messaging through matrix-js-sdk's real sync loop against a running
// Bastion: read receipts (public, private, threaded) and unread counts, read
// markers, typing, presence, profiles, account data and tags, edits, reactions,
// threads, server-side search and push rules.
//
// alice (USER1) and bob (USER2) each run a started MatrixClient with thread
// support on (as Element does: receipts then carry a thread_id, thread replies
// live in Thread objects), no E2EE. Every test makes its own room. What the SDK
// shows is checked, and where the SDK would paper over a server bug (local
// echoes, client-side bookkeeping) the raw /sync bodies are checked too.

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
    passwordLogin,
    rawEphemeral,
    rawJoinedRoom,
    rawRequest,
    rawUnread,
    rawUnreadWithEvent,
    sdk,
    sharedRoom,
    stopAll,
    unique,
    waitFor,
    waitForEvent,
    withTimeout,
} from "./helpers.mjs";

const {
    ClientPrefix,
    EventType,
    Method,
    NotificationCountType,
    PushRuleKind,
    ReceiptType,
    RelationType,
    RoomMemberEvent,
    SetPresence,
    THREAD_RELATION_TYPE,
    UserEvent,
} = sdk;

let alice;
let bob;
// Second sessions of alice and bob that do not sync, used to post thread replies.
// matrix-js-sdk 36 cannot cope with the remote echo of a reply in an existing
// thread arriving through /sync before the /send response (Room.updatePendingEvent
// throws "called on an event which is not a local echo" and the scheduler resends
// forever), and against a local server /sync routinely wins that race.
let alicePoster;
let bobPoster;
const extraClients = [];

before(async () => {
    const threads = { startOpts: { threadSupport: true } };
    alice = await loggedInSyncingClient(USER1, threads);
    bob = await loggedInSyncingClient(USER2, threads);
    alicePoster = clientFor(await passwordLogin(USER1, { deviceName: "thread poster" }));
    bobPoster = clientFor(await passwordLogin(USER2, { deviceName: "thread poster" }));
});

after(() => stopAll(alice, bob, ...extraClients));

const total = (room) => room.getUnreadNotificationCount(NotificationCountType.Total);
const highlights = (room) => room.getUnreadNotificationCount(NotificationCountType.Highlight);

/** Failure context: what the SDK and the server said about a room's unread counts. */
function describeCounts(client, roomId) {
    const room = client.getRoom(roomId);
    return {
        user: client.getUserId(),
        sdk: room && { total: total(room), highlight: highlights(room) },
        server: rawJoinedRoom(client, roomId).map((r) => ({
            unread_notifications: r.unread_notifications,
            unread_thread_notifications: r.unread_thread_notifications,
            timeline: (r.timeline?.events ?? []).map((e) => `${e.type} ${e.event_id}`),
            ephemeral: (r.ephemeral?.events ?? []).map((e) => e.type),
        })),
    };
}

/** Wait until the SDK and the latest server-sent counts both show `count` unread. */
async function waitForUnread(client, roomId, count, what) {
    await waitFor(
        () => total(client.getRoom(roomId)) === count && rawUnread(client, roomId)?.notification_count === count,
        `${client.getUserId()}: ${count} unread in ${roomId} (${what})`,
        { describe: () => describeCounts(client, roomId) },
    );
}

/** Users that have a given receipt type on `eventId` in what `client` holds. */
function receiptUsers(client, roomId, eventId, type = ReceiptType.Read) {
    const room = client.getRoom(roomId);
    const event = room?.findEventById(eventId);
    if (!event) return [];
    return room.getReceiptsForEvent(event).filter((r) => r.type === type).map((r) => r.userId);
}

/** The raw m.receipt content the server sent to `client` for `eventId` / `type` / `userId`. */
function rawReceipt(client, roomId, eventId, type, userId) {
    for (const ev of rawEphemeral(client, roomId, "m.receipt").reverse()) {
        const found = ev.content?.[eventId]?.[type]?.[userId];
        if (found) return found;
    }
    return undefined;
}

const textMessage = (body) => ({ msgtype: "m.text", body });

describe("read receipts, read markers and unread counts", { timeout: TEST_MS }, () => {
    it("a public read receipt reaches the other client and lowers the reader's unread count", async () => {
        const roomId = await sharedRoom(alice, bob);
        const tag = unique("rr");
        const ids = [];
        for (let i = 0; i < 3; i++) {
            ids.push((await withTimeout(alice.sendTextMessage(roomId, `${tag} ${i}`), "send")).event_id);
        }
        for (const id of ids) await waitForEvent(bob, roomId, id);
        await waitForUnread(bob, roomId, 3, "three messages from alice");
        assert.equal(highlights(bob.getRoom(roomId)), 0, "plain messages do not highlight");
        assert.equal(total(alice.getRoom(roomId)), 0, "alice's own messages do not count for her");

        // bob reads up to the second message (a threaded receipt on the main timeline).
        await withTimeout(bob.sendReadReceipt(bob.getRoom(roomId).findEventById(ids[1])), "POST /receipt/m.read");
        await waitFor(
            () => receiptUsers(alice, roomId, ids[1]).includes(bob.getUserId()),
            "alice to see bob's read receipt",
            { describe: () => rawEphemeral(alice, roomId) },
        );
        const aliceRoom = alice.getRoom(roomId);
        assert.ok(aliceRoom.getUsersReadUpTo(aliceRoom.findEventById(ids[1])).includes(bob.getUserId()));
        assert.equal(aliceRoom.getEventReadUpTo(bob.getUserId(), true), ids[1], "bob's read-up-to event for alice");
        const wire = rawReceipt(alice, roomId, ids[1], "m.read", bob.getUserId());
        assert.equal(typeof wire?.ts, "number", `receipt ts: ${JSON.stringify(wire)}`);
        assert.equal(wire.thread_id, "main", "the SDK sent thread_id 'main' and the server echoes it");
        await waitForUnread(bob, roomId, 1, "after reading two of three");

        // An unthreaded receipt on the last message clears the count.
        await withTimeout(bob.sendReadReceipt(bob.getRoom(roomId).findEventById(ids[2]), ReceiptType.Read, true), "unthreaded receipt");
        await waitFor(() => receiptUsers(alice, roomId, ids[2]).includes(bob.getUserId()), "alice to see the unthreaded receipt");
        const unthreaded = rawReceipt(alice, roomId, ids[2], "m.read", bob.getUserId());
        assert.equal(unthreaded.thread_id, undefined, `an unthreaded receipt has no thread_id: ${JSON.stringify(unthreaded)}`);
        await waitForUnread(bob, roomId, 0, "after reading everything");

        // New messages count again.
        const { event_id: more } = await withTimeout(alice.sendTextMessage(roomId, `${tag} more`), "send");
        await waitForEvent(bob, roomId, more);
        await waitForUnread(bob, roomId, 1, "a new message after the receipt");
    });

    it("a private read receipt lowers the count but is not shown to others", async () => {
        const roomId = await sharedRoom(alice, bob);
        const tag = unique("private");
        const ids = [];
        for (let i = 0; i < 2; i++) {
            ids.push((await withTimeout(alice.sendTextMessage(roomId, `${tag} ${i}`), "send")).event_id);
        }
        for (const id of ids) await waitForEvent(bob, roomId, id);
        await waitForUnread(bob, roomId, 2, "two messages");

        await withTimeout(
            bob.sendReadReceipt(bob.getRoom(roomId).findEventById(ids[1]), ReceiptType.ReadPrivate),
            "POST /receipt/m.read.private",
        );
        await waitForUnread(bob, roomId, 0, "after a private receipt");
        // bob's own sync carries it back to him.
        await waitFor(
            () => rawReceipt(bob, roomId, ids[1], "m.read.private", bob.getUserId()),
            "bob's private receipt in his own /sync",
            { describe: () => rawEphemeral(bob, roomId) },
        );
        const own = bob.getRoom(roomId).getReadReceiptForUserId(bob.getUserId(), true, ReceiptType.ReadPrivate);
        assert.equal(own?.eventId, ids[1], "bob's client holds his private receipt");

        // Anything bob does afterwards (typing, here) reaches alice after the
        // receipt would have: by then it must not have been sent to her.
        await withTimeout(bob.sendTyping(roomId, true, 10_000), "typing as a marker");
        await waitFor(() => alice.getRoom(roomId).getMember(bob.getUserId())?.typing, "alice to see bob typing");
        await withTimeout(bob.sendTyping(roomId, false), "stop typing");
        const leaked = rawEphemeral(alice, roomId, "m.receipt").filter((e) => JSON.stringify(e.content).includes("m.read.private"));
        assert.deepEqual(leaked, [], "alice's /sync must not carry bob's private receipt");
        assert.ok(!receiptUsers(alice, roomId, ids[1], ReceiptType.ReadPrivate).includes(bob.getUserId()));
        assert.ok(!receiptUsers(alice, roomId, ids[1]).includes(bob.getUserId()), "and no public receipt either");
    });

    it("setRoomReadMarkers stores m.fully_read (arriving as room account data) and sends the receipts", async () => {
        const roomId = await sharedRoom(alice, bob);
        const tag = unique("marker");
        const ids = [];
        for (let i = 0; i < 3; i++) {
            ids.push((await withTimeout(alice.sendTextMessage(roomId, `${tag} ${i}`), "send")).event_id);
        }
        for (const id of ids) await waitForEvent(bob, roomId, id);
        const bobRoom = bob.getRoom(roomId);
        const fullyRead = () => bobRoom.getAccountData(EventType.FullyRead)?.getContent().event_id;

        await withTimeout(
            bob.setRoomReadMarkers(roomId, ids[0], bobRoom.findEventById(ids[1])),
            "POST /read_markers (m.fully_read + m.read)",
        );
        await waitFor(() => fullyRead() === ids[0], "m.fully_read room account data via sync", {
            describe: () => rawJoinedRoom(bob, roomId).map((r) => r.account_data),
        });
        await waitFor(() => receiptUsers(alice, roomId, ids[1]).includes(bob.getUserId()), "alice to see the m.read from read_markers");
        await waitForUnread(bob, roomId, 1, "read markers also move the read receipt");
        const stored = await rawRequest(bob, Method.Get, `/user/${encodeURIComponent(bob.getUserId())}/rooms/${encodeURIComponent(roomId)}/account_data/m.fully_read`);
        assert.deepEqual(stored, { event_id: ids[0] });

        // Moving the marker with a private receipt: the marker moves, the count clears, alice sees nothing new.
        await withTimeout(
            bob.setRoomReadMarkers(roomId, ids[2], undefined, bobRoom.findEventById(ids[2])),
            "POST /read_markers (m.fully_read + m.read.private)",
        );
        await waitFor(() => fullyRead() === ids[2], "the moved m.fully_read via sync");
        await waitForUnread(bob, roomId, 0, "after the private receipt from read_markers");
        await withTimeout(bob.sendTyping(roomId, true, 10_000), "typing as a marker");
        await waitFor(() => alice.getRoom(roomId).getMember(bob.getUserId())?.typing, "alice to see bob typing");
        await withTimeout(bob.sendTyping(roomId, false), "stop typing");
        assert.ok(!receiptUsers(alice, roomId, ids[2]).includes(bob.getUserId()), "no public receipt for ids[2]");
        assert.equal(rawReceipt(alice, roomId, ids[2], "m.read.private", bob.getUserId()), undefined);
        // The marker is bob's alone.
        assert.equal(alice.getRoom(roomId).getAccountData(EventType.FullyRead), undefined);
    });
});

describe("typing and presence", { timeout: TEST_MS }, () => {
    it("typing starts, stops, and expires after its timeout", async () => {
        const roomId = await sharedRoom(alice, bob);
        const seen = [];
        const onTyping = (_event, member) => {
            if (member.roomId === roomId && member.userId === bob.getUserId()) seen.push(member.typing);
        };
        alice.on(RoomMemberEvent.Typing, onTyping);
        try {
            const bobTyping = () => alice.getRoom(roomId).getMember(bob.getUserId())?.typing;
            await withTimeout(bob.sendTyping(roomId, true, 30_000), "PUT /typing (true)");
            await waitFor(() => bobTyping() === true, "alice to see bob typing", {
                describe: () => rawEphemeral(alice, roomId, "m.typing"),
            });
            assert.deepEqual(rawEphemeral(alice, roomId, "m.typing").at(-1).content, { user_ids: [bob.getUserId()] });
            await withTimeout(bob.sendTyping(roomId, false), "PUT /typing (false)");
            await waitFor(() => bobTyping() === false, "alice to see bob stop typing");
            assert.deepEqual(rawEphemeral(alice, roomId, "m.typing").at(-1).content, { user_ids: [] });

            // Left alone, a typing notification ends by itself after its timeout.
            const started = Date.now();
            await withTimeout(bob.sendTyping(roomId, true, 2_000), "PUT /typing (2 s)");
            await waitFor(() => bobTyping() === true, "alice to see bob typing again");
            await waitFor(() => bobTyping() === false, "bob's typing to expire", { timeout: 12_000 });
            const elapsed = Date.now() - started;
            assert.ok(elapsed >= 1_500, `typing expired after ${elapsed} ms, before its 2 s timeout`);
            assert.deepEqual(seen, [true, false, true, false], "RoomMember.typing events on alice's client");
        } finally {
            alice.off(RoomMemberEvent.Typing, onTyping);
        }
    });

    it("presence with a status message reaches a room-mate; getPresence reads it; strangers may not", async () => {
        await sharedRoom(alice, bob);
        const status = unique("in a meeting");
        const user = () => alice.getUser(bob.getUserId());
        const presenceEvents = [];
        const onPresence = (_event, u) => {
            if (u.userId === bob.getUserId()) presenceEvents.push({ presence: u.presence, status: u.presenceStatusMsg });
        };
        alice.on(UserEvent.Presence, onPresence);
        try {
            // Without set_presence a syncing client is marked online by every /sync
            // (as the spec says), so bob's own sync loop reports "unavailable" too.
            await bob.setSyncPresence(SetPresence.Unavailable);
            await withTimeout(bob.setPresence({ presence: "unavailable", status_msg: status }), "PUT /presence");
            await waitFor(
                () => user()?.presence === "unavailable" && user()?.presenceStatusMsg === status,
                "alice to see bob unavailable with his status message",
                { describe: () => ({ user: user() && { presence: user().presence, msg: user().presenceStatusMsg }, presenceEvents }) },
            );
            const got = await withTimeout(alice.getPresence(bob.getUserId()), "GET /presence");
            assert.equal(got.presence, "unavailable");
            assert.equal(got.status_msg, status);
            assert.equal(typeof got.last_active_ago, "number", `last_active_ago: ${JSON.stringify(got)}`);
            const own = await withTimeout(bob.getPresence(bob.getUserId()), "GET own presence");
            assert.equal(own.presence, "unavailable");

            await bob.setSyncPresence(undefined);
            await withTimeout(bob.setPresence({ presence: "online", status_msg: "back" }), "PUT /presence online");
            await waitFor(
                () => user()?.presence === "online" && user()?.presenceStatusMsg === "back",
                "alice to see bob back online",
                { describe: () => presenceEvents },
            );
        } finally {
            alice.off(UserEvent.Presence, onPresence);
        }

        // Someone who shares no room with bob cannot read his presence.
        const stranger = clientFor(await passwordLogin(EXTRA_USERS[0]));
        await expectMatrixError(stranger.getPresence(bob.getUserId()), "M_FORBIDDEN", 403, "a stranger's GET /presence");
    });
});

describe("profiles, account data and tags", { timeout: TEST_MS }, () => {
    it("display name and avatar changes reach the other client's room members; getProfileInfo", async () => {
        const roomId = await sharedRoom(alice, bob);
        const name = unique("Alice");
        const avatar = `mxc://${alice.getDomain()}/${unique("avatar").replace(/\W+/g, "")}`;
        await withTimeout(alice.setDisplayName(name), "PUT displayname");
        await withTimeout(alice.setAvatarUrl(avatar), "PUT avatar_url");
        const member = () => bob.getRoom(roomId).getMember(alice.getUserId());
        await waitFor(
            () => member()?.name === name && member()?.getMxcAvatarUrl() === avatar,
            "bob to see alice's new name and avatar on her room member",
            { describe: () => describeRoom(bob, roomId) },
        );
        assert.equal(member().membership, "join", "still joined after the profile updates");
        const state = bob.getRoom(roomId).currentState.getStateEvents(EventType.RoomMember, alice.getUserId()).getContent();
        assert.equal(state.displayname, name);
        assert.equal(state.avatar_url, avatar);

        assert.deepEqual(
            await withTimeout(bob.getProfileInfo(alice.getUserId()), "GET /profile"),
            { displayname: name, avatar_url: avatar },
        );
        assert.deepEqual(await withTimeout(bob.getProfileInfo(alice.getUserId(), "displayname"), "GET displayname"), { displayname: name });
        assert.deepEqual(await withTimeout(bob.getProfileInfo(alice.getUserId(), "avatar_url"), "GET avatar_url"), { avatar_url: avatar });
        await expectMatrixError(
            bob.getProfileInfo(`@nobody-${Date.now()}:${alice.getDomain()}`),
            "M_NOT_FOUND",
            404,
            "profile of an unknown user",
        );
    });

    it("global account data (m.direct) arrives through sync, privately", async () => {
        const roomId = await sharedRoom(alice, bob, { is_direct: true });
        const content = { [bob.getUserId()]: [roomId] };
        await withTimeout(alice.setAccountData(EventType.Direct, content), "PUT account_data/m.direct");
        await waitFor(
            () => alice.getAccountData(EventType.Direct)?.getContent()?.[bob.getUserId()]?.[0] === roomId,
            "m.direct via sync",
        );
        const synced = alice.wire.syncs.flatMap((s) => s.account_data?.events ?? []).filter((e) => e.type === "m.direct");
        assert.deepEqual(synced.at(-1)?.content, content, "the server sent m.direct in /sync account_data");
        assert.deepEqual(await withTimeout(alice.getAccountDataFromServer(EventType.Direct), "GET account_data"), content);
        assert.equal(bob.getAccountData(EventType.Direct)?.getContent()?.[bob.getUserId()], undefined, "bob does not get alice's m.direct");
        await expectMatrixError(
            rawRequest(bob, Method.Get, `/user/${encodeURIComponent(alice.getUserId())}/account_data/m.direct`),
            "M_FORBIDDEN",
            403,
            "reading another user's account data",
        );
    });

    it("room tags: setRoomTag / deleteRoomTag arrive through sync", async () => {
        const roomId = await sharedRoom(alice, bob);
        const room = alice.getRoom(roomId);
        await withTimeout(alice.setRoomTag(roomId, "m.favourite", { order: 0.25 }), "PUT tag m.favourite");
        await withTimeout(alice.setRoomTag(roomId, "u.work", {}), "PUT tag u.work");
        await waitFor(() => room.tags["m.favourite"] && room.tags["u.work"], "tags via sync", {
            describe: () => ({ tags: room.tags, raw: rawJoinedRoom(alice, roomId).map((r) => r.account_data) }),
        });
        assert.deepEqual(room.tags, { "m.favourite": { order: 0.25 }, "u.work": {} });
        assert.deepEqual(await withTimeout(alice.getRoomTags(roomId), "GET tags"), {
            tags: { "m.favourite": { order: 0.25 }, "u.work": {} },
        });
        await withTimeout(alice.deleteRoomTag(roomId, "u.work"), "DELETE tag u.work");
        await waitFor(() => !room.tags["u.work"], "tag removal via sync", { describe: () => room.tags });
        assert.deepEqual(room.tags, { "m.favourite": { order: 0.25 } });
        assert.deepEqual(bob.getRoom(roomId).tags, {}, "tags are private to alice");
    });
});

describe("relations: edits, reactions, threads", { timeout: TEST_MS }, () => {
    it("an edit replaces the content on the other client; a reaction is aggregated; /relations returns both", async () => {
        const roomId = await sharedRoom(alice, bob);
        const { event_id: original } = await withTimeout(alice.sendTextMessage(roomId, "I like cake"), "send");
        await waitForEvent(bob, roomId, original);
        const { event_id: reaction } = await withTimeout(
            bob.sendEvent(roomId, EventType.Reaction, {
                "m.relates_to": { rel_type: RelationType.Annotation, event_id: original, key: "👍" },
            }),
            "send m.reaction",
        );
        const { event_id: edit } = await withTimeout(
            alice.sendMessage(roomId, {
                ...textMessage("* I like lemon cake"),
                "m.new_content": textMessage("I like lemon cake"),
                "m.relates_to": { rel_type: RelationType.Replace, event_id: original },
            }),
            "send m.replace",
        );

        // bob's client shows the edited text and the reaction.
        const bobRoom = bob.getRoom(roomId);
        await waitFor(
            () => bobRoom.findEventById(original)?.getContent().body === "I like lemon cake",
            "bob's client to apply the edit",
            { describe: () => describeRoom(bob, roomId) },
        );
        assert.equal(bobRoom.findEventById(original).replacingEventId(), edit);
        await waitFor(
            () => {
                const rel = bobRoom.relations.getChildEventsForEvent(original, RelationType.Annotation, EventType.Reaction);
                return rel?.getSortedAnnotationsByKey()?.[0]?.[0] === "👍";
            },
            "bob's client to aggregate the reaction",
        );

        // The server's /relations endpoints.
        const reactions = await withTimeout(
            alice.relations(roomId, original, RelationType.Annotation, EventType.Reaction),
            "GET /relations/{id}/m.annotation/m.reaction",
        );
        assert.equal(reactions.originalEvent?.getId(), original);
        assert.deepEqual(reactions.events.map((e) => e.getId()), [reaction]);
        const edits = await withTimeout(alice.relations(roomId, original, RelationType.Replace), "GET /relations/{id}/m.replace");
        assert.deepEqual(edits.events.map((e) => e.getId()), [edit]);
        const all = await withTimeout(alice.fetchRelations(roomId, original, null), "GET /relations/{id}");
        assert.deepEqual(new Set(all.chunk.map((e) => e.event_id)), new Set([reaction, edit]));
        // Paging through them one at a time.
        const first = await withTimeout(alice.fetchRelations(roomId, original, null, null, { limit: 1 }), "GET /relations?limit=1");
        assert.equal(first.chunk.length, 1);
        assert.ok(first.next_batch, `next_batch with more to come: ${JSON.stringify(first)}`);
        const second = await withTimeout(
            alice.fetchRelations(roomId, original, null, null, { limit: 1, from: first.next_batch }),
            "GET /relations?from=",
        );
        assert.deepEqual(new Set([...first.chunk, ...second.chunk].map((e) => e.event_id)), new Set([reaction, edit]));

        // The edit is bundled with the original (its content left intact).
        const fetched = await withTimeout(alice.fetchRoomEvent(roomId, original), "GET /event");
        assert.equal(fetched.content.body, "I like cake");
        assert.equal(fetched.unsigned?.["m.relations"]?.["m.replace"]?.event_id, edit, JSON.stringify(fetched.unsigned));
    });

    it("thread replies land in the root's Thread on the other client; /relations and /threads list them", async () => {
        const roomId = await sharedRoom(alice, bob);
        const { event_id: root } = await withTimeout(alice.sendTextMessage(roomId, "thread root"), "send root");
        await waitForEvent(bob, roomId, root);
        const replies = [];
        for (const body of ["reply one", "reply two"]) {
            replies.push((await withTimeout(bobPoster.sendMessage(roomId, root, textMessage(body)), "send thread reply")).event_id);
        }
        const aliceRoom = alice.getRoom(roomId);
        const replyBodies = (thread) =>
            thread.liveTimeline.getEvents().filter((e) => e.getId() !== root).map((e) => e.getContent().body);
        await waitFor(
            () => {
                const thread = aliceRoom.getThread(root);
                return thread && thread.length === 2 && replyBodies(thread).length === 2;
            },
            "alice's Thread for the root to hold both replies",
            {
                describe: () => {
                    const thread = aliceRoom.getThread(root);
                    return thread && { length: thread.length, events: thread.liveTimeline.getEvents().map((e) => [e.getId(), e.getContent().body]) };
                },
            },
        );
        const thread = aliceRoom.getThread(root);
        assert.equal(thread.rootEvent?.getId(), root);
        assert.deepEqual(replyBodies(thread), ["reply one", "reply two"]);
        assert.equal(thread.replyToEvent?.getId(), replies[1], "the latest reply");
        assert.ok(!liveEvents(aliceRoom).some((e) => replies.includes(e.getId())), "replies stay out of the main timeline");

        // /relations with rel_type m.thread
        const rel = await withTimeout(alice.relations(roomId, root, THREAD_RELATION_TYPE.name), "GET /relations/{root}/m.thread");
        assert.deepEqual(rel.events.map((e) => e.getId()).sort(), [...replies].sort());

        // /threads, raw: the root with its thread summary.
        const path = `/rooms/${encodeURIComponent(roomId)}/threads`;
        const listed = await rawRequest(alice, Method.Get, path, { query: { include: "all" }, prefix: ClientPrefix.V1 });
        assert.deepEqual(listed.chunk.map((e) => e.event_id), [root], JSON.stringify(listed));
        const summary = listed.chunk[0].unsigned?.["m.relations"]?.["m.thread"];
        assert.equal(summary?.count, 2, JSON.stringify(listed.chunk[0].unsigned));
        assert.equal(summary.latest_event?.event_id, replies[1]);
        const mine = await rawRequest(bob, Method.Get, path, { query: { include: "participated" }, prefix: ClientPrefix.V1 });
        assert.deepEqual(mine.chunk.map((e) => e.event_id), [root], "bob participated by replying");
        assert.equal(mine.chunk[0].unsigned["m.relations"]["m.thread"].current_user_participated, true);

        // And through the SDK's thread list (which pages /threads itself).
        await withTimeout(aliceRoom.createThreadsTimelineSets(), "createThreadsTimelineSets");
        await withTimeout(aliceRoom.fetchRoomThreads(), "fetchRoomThreads (GET /threads)");
        const listedBySdk = aliceRoom.threadsTimelineSets[0].getLiveTimeline().getEvents().map((e) => e.getId());
        assert.ok(listedBySdk.includes(root), `the SDK's thread list: ${JSON.stringify(listedBySdk)}`);
    });

    /** bob's root, alice's reply in its thread (posted without local echo); bob's client has it. */
    async function threadWithReplyToBob() {
        const roomId = await sharedRoom(alice, bob);
        const { event_id: root } = await withTimeout(bob.sendTextMessage(roomId, "bob's root"), "send root");
        await waitForEvent(alice, roomId, root);
        const { event_id: reply } = await withTimeout(alicePoster.sendMessage(roomId, root, textMessage("alice answers")), "thread reply");
        await waitFor(() => bob.getRoom(roomId).getThread(root)?.findEventById(reply), "bob's Thread to get alice's reply", {
            describe: () => describeRoom(bob, roomId),
        });
        return { roomId, root, reply };
    }

    const receiptPath = (roomId, eventId, type = "m.read") =>
        `/rooms/${encodeURIComponent(roomId)}/receipt/${type}/${encodeURIComponent(eventId)}`;

    it("a threaded read receipt (thread_id = the root) is accepted and relayed with its thread_id", async () => {
        const { roomId, root, reply } = await threadWithReplyToBob();
        const bobRoom = bob.getRoom(roomId);
        await withTimeout(bob.sendReadReceipt(bobRoom.getThread(root).findEventById(reply)), "threaded receipt");
        await waitFor(() => rawReceipt(alice, roomId, reply, "m.read", bob.getUserId()), "alice to get bob's threaded receipt", {
            describe: () => rawEphemeral(alice, roomId),
        });
        assert.equal(rawReceipt(alice, roomId, reply, "m.read", bob.getUserId()).thread_id, root);
        await waitFor(
            () => alice.getRoom(roomId).getThread(root)?.getEventReadUpTo(bob.getUserId(), true) === reply,
            "alice's Thread to hold bob's receipt",
        );
        await expectMatrixError(
            rawRequest(bob, Method.Post, receiptPath(roomId, reply), { body: { thread_id: "not-an-event-id" } }),
            "M_INVALID_PARAM",
            400,
            "receipt with a malformed thread_id",
        );
    });

    it("per-thread unread counts: with unread_thread_notifications the thread reply is counted under its root", async () => {
        // The SDK's sync filter sets room.timeline.unread_thread_notifications: true.
        const { roomId, root, reply } = await threadWithReplyToBob();
        const bobRoom = bob.getRoom(roomId);
        const rawThreadCounts = () =>
            rawJoinedRoom(bob, roomId).filter((r) => r.unread_thread_notifications).at(-1)?.unread_thread_notifications;
        await waitFor(
            () => rawThreadCounts()?.[root]?.notification_count === 1,
            "the server to report one unread notification in the thread (unread_thread_notifications)",
            { describe: () => describeCounts(bob, roomId) },
        );
        assert.equal(
            rawUnreadWithEvent(bob, roomId, reply)?.notification_count ?? 0,
            0,
            "unread_notifications covers the main timeline only when unread_thread_notifications is on",
        );
        await withTimeout(bob.sendReadReceipt(bobRoom.getThread(root).findEventById(reply)), "threaded receipt");
        await waitFor(
            () => (bobRoom.getThreadUnreadNotificationCount(root, NotificationCountType.Total) === 0) && !rawThreadCounts()?.[root]?.notification_count,
            "the thread's count to clear after the threaded receipt",
            { describe: () => describeCounts(bob, roomId) },
        );
    });

    it("reading a thread (a threaded receipt on its last reply) clears the room's unread badge", async () => {
        const { roomId, root, reply } = await threadWithReplyToBob();
        const bobRoom = bob.getRoom(roomId);
        // However the server splits the counts, the client shows room + thread counts.
        await waitFor(() => total(bobRoom) === 1, "bob: one unread (alice's thread reply)", {
            describe: () => describeCounts(bob, roomId),
        });
        await withTimeout(bob.sendReadReceipt(bobRoom.getThread(root).findEventById(reply)), "threaded receipt on the reply");
        await waitFor(() => rawReceipt(bob, roomId, reply, "m.read", bob.getUserId()), "bob's own receipt back through sync");
        await waitFor(() => total(bobRoom) === 0, "bob's unread badge to clear after reading the thread", {
            describe: () => describeCounts(bob, roomId),
        });
    });

    it("a receipt whose event is not in the named thread is refused", async () => {
        const { roomId, root, reply } = await threadWithReplyToBob();
        const { event_id: mainEvent } = await withTimeout(alice.sendTextMessage(roomId, "main timeline"), "send");
        await waitForEvent(bob, roomId, mainEvent);
        // receipts.yaml, 400: "The event_id is not related to the thread_id."
        await expectMatrixError(
            rawRequest(bob, Method.Post, receiptPath(roomId, mainEvent), { body: { thread_id: root } }),
            "M_INVALID_PARAM",
            400,
            "a main-timeline event with thread_id = a thread root",
        );
        await expectMatrixError(
            rawRequest(bob, Method.Post, receiptPath(roomId, reply), { body: { thread_id: "main" } }),
            "M_INVALID_PARAM",
            400,
            "a thread reply with thread_id = main",
        );
    });
});

describe("search", { timeout: TEST_MS }, () => {
    it("searchRoomEvents finds messages by a term, with context, and pages", async () => {
        const roomId = await sharedRoom(alice, bob);
        const word = `quokka${Math.random().toString(36).slice(2, 8).replace(/\d/g, "x")}`;
        const bodies = [`the ${word} hops`, "unrelated chatter", `a ${word} sleeps`, `${word} again`];
        const ids = [];
        for (const body of bodies) ids.push((await withTimeout(alice.sendTextMessage(roomId, body), "send")).event_id);
        await waitForEvent(bob, roomId, ids.at(-1));

        const found = await withTimeout(bob.searchRoomEvents({ term: word }), "POST /search");
        const hits = found.results.map((r) => r.context.getEvent().getContent().body);
        assert.deepEqual(hits, [`${word} again`, `a ${word} sleeps`, `the ${word} hops`], "newest first (order_by recent)");
        assert.equal(found.count, 3);
        assert.ok(found.highlights.some((h) => h.toLowerCase().includes(word)), `highlights: ${JSON.stringify(found.highlights)}`);
        const ctx = found.results[1].context; // "a … sleeps": one event either side
        assert.equal(ctx.getEvent().getId(), ids[2]);
        assert.equal(ctx.getTimeline().find((e) => e.getId() === ids[1])?.getContent().body, "unrelated chatter", "context before");

        // Page size 2, then back-paginate for the rest.
        const page = await withTimeout(bob.searchRoomEvents({ term: word, filter: { limit: 2 } }), "POST /search limit 2");
        assert.equal(page.results.length, 2);
        assert.ok(page.next_batch, "next_batch with a third result to come");
        const more = await withTimeout(bob.backPaginateRoomEventsSearch(page), "POST /search next_batch");
        assert.deepEqual(more.results.map((r) => r.context.getEvent().getId()), [ids[3], ids[2], ids[0]]);

        // Rooms the searcher is not in stay out of the results.
        const stranger = clientFor(await passwordLogin(EXTRA_USERS[1]));
        const none = await withTimeout(stranger.searchRoomEvents({ term: word }), "a stranger's POST /search");
        assert.deepEqual(none.results, []);
    });
});

describe("push rules", { timeout: TEST_MS }, () => {
    it("getPushRules, add / disable / delete a rule: the client's pushRules follow via sync and the counts obey", async () => {
        const roomId = await sharedRoom(alice, bob);
        const rules = await withTimeout(bob.getPushRules(), "GET /pushrules/");
        assert.equal(rules.global.override[0].rule_id, ".m.rule.master");
        assert.ok(rules.global.underride.some((r) => r.rule_id === ".m.rule.message"), "default underride rules");
        assert.ok(bob.pushRules?.global?.override?.length, "the client fetched the rules at start-up");

        const word = `deploy${Math.random().toString(36).slice(2, 7).replace(/\d/g, "q")}`;
        const ruleId = `bastion-${word}`;
        const bobRule = () => bob.pushRules?.global?.content?.find((r) => r.rule_id === ruleId);
        await withTimeout(
            bob.addPushRule("global", PushRuleKind.ContentSpecific, ruleId, {
                pattern: word,
                actions: ["notify", { set_tweak: "highlight" }],
            }),
            "PUT /pushrules/global/content/{id}",
        );
        await waitFor(() => bobRule()?.enabled === true, "the new rule in bob's client via m.push_rules in sync", {
            describe: () => bob.pushRules?.global?.content,
        });
        assert.equal(bobRule().pattern, word);
        const pushRuleSyncs = bob.wire.syncs.flatMap((s) => s.account_data?.events ?? []).filter((e) => e.type === "m.push_rules");
        assert.ok(pushRuleSyncs.length > 0, "m.push_rules came through /sync account_data");

        // The rule highlights matching messages.
        const bobRoom = bob.getRoom(roomId);
        const { event_id: hit } = await withTimeout(alice.sendTextMessage(roomId, `${word} is out`), "send");
        await waitForEvent(bob, roomId, hit);
        await waitFor(() => highlights(bobRoom) === 1 && total(bobRoom) === 1, "a highlight from the content rule", {
            describe: () => describeCounts(bob, roomId),
        });
        assert.deepEqual(rawUnreadWithEvent(bob, roomId, hit), { notification_count: 1, highlight_count: 1 });

        await withTimeout(bob.setPushRuleEnabled("global", PushRuleKind.ContentSpecific, ruleId, false), "disable the rule");
        await waitFor(() => bobRule()?.enabled === false, "the disabled rule via sync", { describe: () => bobRule() });
        const { event_id: quiet } = await withTimeout(alice.sendTextMessage(roomId, `${word} again`), "send");
        await waitForEvent(bob, roomId, quiet);
        await waitFor(() => total(bobRoom) === 2, "a plain notification now", { describe: () => describeCounts(bob, roomId) });
        assert.equal(rawUnreadWithEvent(bob, roomId, quiet)?.notification_count, 2, "the disabled rule no longer highlights");

        await withTimeout(bob.deletePushRule("global", PushRuleKind.ContentSpecific, ruleId), "DELETE the rule");
        await waitFor(() => !bobRule(), "the rule gone from bob's client via sync", { describe: () => bob.pushRules?.global?.content });
        await expectMatrixError(
            rawRequest(bob, Method.Get, `/pushrules/global/content/${ruleId}`),
            "M_NOT_FOUND",
            404,
            "GET a deleted rule",
        );

        // A room rule with no actions mutes the room.
        await withTimeout(bob.addPushRule("global", PushRuleKind.RoomSpecific, roomId, { actions: [] }), "mute the room");
        await waitFor(() => bob.pushRules?.global?.room?.some((r) => r.rule_id === roomId), "room rule via sync");
        await withTimeout(bob.sendReadReceipt(bobRoom.findEventById(quiet)), "read everything");
        await waitFor(() => total(bobRoom) === 0, "count cleared", { describe: () => describeCounts(bob, roomId) });
        const { event_id: muted } = await withTimeout(alice.sendTextMessage(roomId, "into the void"), "send");
        await waitForEvent(bob, roomId, muted);
        const counts = await waitFor(() => rawUnreadWithEvent(bob, roomId, muted), "the sync that delivered the muted message");
        assert.deepEqual(counts, { notification_count: 0, highlight_count: 0 }, "a muted room does not count");
        assert.equal(total(bobRoom), 0);
    });

    it("changing a push rule does not rewrite notifications already received", async () => {
        // A notification is generated when the event arrives, by the rules in
        // force then (that is what a pusher is sent); a later rule change
        // applies to later events. The highlight of an unread message that
        // matched a highlight rule must stay counted after the rule is disabled,
        // and a message that notified must stay counted after a mute rule is added.
        const roomId = await sharedRoom(alice, bob);
        const bobRoom = bob.getRoom(roomId);
        const word = `urgent${Math.random().toString(36).slice(2, 7).replace(/\d/g, "z")}`;
        const ruleId = `bastion-${word}`;
        await withTimeout(
            bob.addPushRule("global", PushRuleKind.ContentSpecific, ruleId, { pattern: word, actions: ["notify", { set_tweak: "highlight" }] }),
            "add a highlight rule",
        );
        await waitFor(() => bob.pushRules?.global?.content?.some((r) => r.rule_id === ruleId), "the rule via sync");
        const { event_id: hit } = await withTimeout(alice.sendTextMessage(roomId, `${word}: look`), "send");
        await waitForEvent(bob, roomId, hit);
        await waitFor(() => highlights(bobRoom) === 1, "the highlight", { describe: () => describeCounts(bob, roomId) });
        assert.deepEqual(rawUnreadWithEvent(bob, roomId, hit), { notification_count: 1, highlight_count: 1 });

        await withTimeout(bob.setPushRuleEnabled("global", PushRuleKind.ContentSpecific, ruleId, false), "disable the rule");
        await waitFor(() => bob.pushRules?.global?.content?.find((r) => r.rule_id === ruleId)?.enabled === false, "disabled via sync");
        const { event_id: next } = await withTimeout(alice.sendTextMessage(roomId, "and another thing"), "send");
        await waitForEvent(bob, roomId, next);
        const counts = await waitFor(() => rawUnreadWithEvent(bob, roomId, next), "the sync that delivered the next message");
        assert.deepEqual(
            counts,
            { notification_count: 2, highlight_count: 1 },
            "the unread message that was highlighted when it arrived is still an unread highlight",
        );

        await withTimeout(bob.addPushRule("global", PushRuleKind.RoomSpecific, roomId, { actions: [] }), "mute the room");
        await waitFor(() => bob.pushRules?.global?.room?.some((r) => r.rule_id === roomId), "room rule via sync");
        const { event_id: muted } = await withTimeout(alice.sendTextMessage(roomId, "after muting"), "send");
        await waitForEvent(bob, roomId, muted);
        const afterMute = await waitFor(() => rawUnreadWithEvent(bob, roomId, muted), "the sync that delivered the muted message");
        assert.deepEqual(afterMute, { notification_count: 2, highlight_count: 1 }, "muting affects new messages only");
    });
});
