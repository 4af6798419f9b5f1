// /messages pagination tokens as matrix-js-sdk uses them.
//
// Spec, GET /rooms/{roomId}/messages (data/api/client-server/message_pagination.yaml):
// `start` "will be the same as the value given in `from`", and `from` may be a /sync
// `prev_batch`/`next_batch` token or an `end` token from an earlier page.

import assert from "node:assert/strict";
import { after, before, describe, it } from "node:test";

import { TEST_MS, USER1, loggedInSyncingClient, messageBodies, sdk, stopAll, waitFor, withTimeout } from "./helpers.mjs";

let alice;
before(async () => {
    alice = await loggedInSyncingClient(USER1);
});
after(() => stopAll(alice));

describe("/messages tokens", { timeout: TEST_MS }, () => {
    it("/messages `start` is the `from` token that was passed in", async () => {
        const { room_id: roomId } = await withTimeout(alice.createRoom({ name: "start token" }), "createRoom");
        for (let i = 0; i < 4; i++) await withTimeout(alice.sendTextMessage(roomId, `s ${i}`), "send");
        await waitFor(() => alice.getRoom(roomId) && messageBodies(alice.getRoom(roomId)).length === 4, "messages via sync");
        const syncToken = alice.getSyncStateData()?.nextSyncToken ?? alice.store.getSyncToken();
        assert.ok(syncToken, "a /sync next_batch token");

        const first = await withTimeout(
            alice.createMessagesRequest(roomId, syncToken, 2, sdk.Direction.Backward),
            "/messages from=<next_batch>",
        );
        assert.ok(first.end, "first page has an end token");
        const second = await withTimeout(
            alice.createMessagesRequest(roomId, first.end, 2, sdk.Direction.Backward),
            "/messages from=<end>",
        );
        assert.equal(second.start, first.end, "start of a page fetched with from=<end token>");
        assert.equal(first.start, syncToken, "start of a page fetched with from=<sync next_batch>");
    });
});
