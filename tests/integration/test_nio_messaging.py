"""matrix-nio (a real Matrix SDK, encryption off) against Bastion: everyday messaging.

Each test is one asyncio program in which nio clients talk to a real server over HTTP
and assert what a user of a chat app would notice: receipts and unread badges, typing
notices, presence, names and avatars, direct chats and tags, the room directory,
edits/threads/reactions, search, device management, notification rules, finding
people, leaving for good, and following an upgraded room.

nio's own API is used wherever it has one; endpoints nio does not wrap (tags, account
data writes, /search, the user directory, deactivation, the server-side room upgrade,
directory publication) go through :func:`api`, a plain httpx call authenticated with
the nio client's access token.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import quote

import httpx
from nio import (
    AccountDataEvent,
    AsyncClient,
    AsyncClientConfig,
    DeleteDevicesAuthResponse,
    DeleteDevicesResponse,
    DeletePushRuleError,
    DeletePushRuleResponse,
    DevicesResponse,
    DirectRoomsErrorResponse,
    DirectRoomsResponse,
    EnablePushRuleResponse,
    Event,
    FullyReadEvent,
    JoinResponse,
    LoginError,
    LoginResponse,
    PresenceEvent,
    PresenceGetError,
    PresenceGetResponse,
    PresenceSetResponse,
    ProfileGetResponse,
    ProfileSetAvatarResponse,
    ProfileSetDisplayNameResponse,
    PushNotify,
    PushRuleKind,
    PushRulesEvent,
    PushSetTweak,
    ReactionEvent,
    ReceiptEvent,
    RoomContextResponse,
    RoomCreateResponse,
    RoomDeleteAliasResponse,
    RoomGetEventResponse,
    RoomGetVisibilityResponse,
    RoomMemberEvent,
    RoomMessageText,
    RoomPreset,
    RoomPutAliasResponse,
    RoomReadMarkersResponse,
    RoomResolveAliasError,
    RoomResolveAliasResponse,
    RoomSendError,
    RoomSendResponse,
    RoomTypingResponse,
    RoomUpgradeEvent,
    RoomVisibility,
    SetPushRuleActionsResponse,
    SetPushRuleResponse,
    SyncError,
    SyncResponse,
    TagEvent,
    UnknownAccountDataEvent,
    UpdateDeviceResponse,
    UpdateReceiptMarkerResponse,
    WhoamiError,
)
from nio.api import ReceiptType, RelationshipType, ThreadInclusion
from nio.responses import PublicRoomsResponse

from tests.harness import MatrixHttp, ServerProcess
from tests.integration.test_directory_devices import admin_user

SCENARIO_TIMEOUT = 45.0  # seconds per test: every wait below is also bounded on its own


# -- helpers -----------------------------------------------------------------------------------


def run(scenario: Callable[[], Awaitable[None]]) -> None:
    """Run one test's asyncio program, bounded as a whole."""

    async def bounded() -> None:
        await asyncio.wait_for(scenario(), SCENARIO_TIMEOUT)

    asyncio.run(bounded())


def uid() -> str:
    return uuid.uuid4().hex[:8]


class Clients:
    """Logs nio clients in and closes them all at the end of a scenario."""

    def __init__(self, server: ServerProcess) -> None:
        self.server = server
        self.opened: list[AsyncClient] = []

    async def login(self, user: MatrixHttp, device_name: str = "nio messaging") -> AsyncClient:
        client = AsyncClient(self.server.base_url, user.user_id, config=AsyncClientConfig(encryption_enabled=False))
        self.opened.append(client)
        resp = await client.login(user.password, device_name=device_name)
        assert isinstance(resp, LoginResponse), resp
        return client

    async def new_user(self, device_name: str = "nio messaging") -> tuple[AsyncClient, MatrixHttp]:
        user = self.server.client().register()
        return await self.login(user, device_name), user

    async def close(self) -> None:
        for client in self.opened:
            await client.close()


def scenario_with_clients(server: ServerProcess, body: Callable[[Clients], Awaitable[None]]) -> None:
    async def scenario() -> None:
        clients = Clients(server)
        try:
            await body(clients)
        finally:
            await clients.close()

    run(scenario)


async def api(client: AsyncClient, method: str, path: str, body: Any = None, *, params: dict[str, Any] | None = None,
              expect: int = 200) -> Any:
    """A raw client-server call with the nio client's access token (for what nio does not wrap)."""
    async with httpx.AsyncClient(base_url=client.homeserver, timeout=10) as http:
        resp = await http.request(method, path, json=body, params=params,
                                  headers={"Authorization": f"Bearer {client.access_token}"})
    assert resp.status_code == expect, f"{method} {path} -> {resp.status_code} {resp.text}"
    return resp.json()


async def sync_until(client: AsyncClient, done: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    """Sync (short long-polls) until ``done()`` holds; always syncs at least once."""
    deadline = time.monotonic() + timeout
    while True:
        resp = await client.sync(timeout=300)
        assert isinstance(resp, SyncResponse), resp
        if done():
            return
        assert time.monotonic() < deadline, f"{client.user_id} never saw {what}"


class Timeline:
    """Records the timeline events a client receives through sync, per room."""

    def __init__(self, client: AsyncClient) -> None:
        self.events: dict[str, list[Event]] = {}
        client.add_event_callback(self._on_event, Event)

    async def _on_event(self, room: Any, event: Event) -> None:
        self.events.setdefault(room.room_id, []).append(event)

    def ids(self, room_id: str) -> list[str]:
        return [e.event_id for e in self.events.get(room_id, [])]


async def send_text(client: AsyncClient, room_id: str, body: str | dict[str, Any], event_type: str = "m.room.message") -> str:
    content = {"msgtype": "m.text", "body": body} if isinstance(body, str) else body
    resp = await client.room_send(room_id, event_type, content)
    assert isinstance(resp, RoomSendResponse), resp
    return resp.event_id


async def shared_room(alice: AsyncClient, bob: AsyncClient, **create: Any) -> str:
    """alice creates a room, invites bob, bob joins; both clients have synced it."""
    created = await alice.room_create(invite=[bob.user_id], **create)
    assert isinstance(created, RoomCreateResponse), created
    joined = await bob.join(created.room_id)
    assert isinstance(joined, JoinResponse), joined
    room_id = created.room_id
    await sync_until(alice, lambda: room_id in alice.rooms and bob.user_id in alice.rooms[room_id].users, "bob's join")
    await sync_until(bob, lambda: room_id in bob.rooms, "the room")
    return room_id


def password_auth(user: MatrixHttp, session: str, password: str | None = None) -> dict[str, Any]:
    return {"type": "m.login.password", "identifier": {"type": "m.id.user", "user": user.user_id},
            "password": password or user.password, "session": session}


def q(value: str) -> str:
    return quote(value, safe="")


# -- read receipts, read markers and unread counts --------------------------------------------


def test_receipts_read_markers_and_unread_counts(server: ServerProcess) -> None:
    async def body(c: Clients) -> None:
        (alice, _), (bob, _) = await c.new_user(), await c.new_user()
        room = await shared_room(alice, bob)
        alice_receipts: list[ReceiptEvent] = []

        async def on_receipt(_room: Any, event: ReceiptEvent) -> None:
            alice_receipts.append(event)

        alice.add_ephemeral_callback(on_receipt, ReceiptEvent)

        ids = [await send_text(alice, room, f"message {i}") for i in range(3)]
        mention = await send_text(alice, room, {"msgtype": "m.text", "body": "bob, have a look",
                                                "m.mentions": {"user_ids": [bob.user_id]}})
        bob_room = bob.rooms[room]
        await sync_until(bob, lambda: bob_room.unread_notifications == 4, "4 unread messages")
        assert bob_room.unread_highlights == 1  # the mention

        # bob reads up to the second message: alice sees the receipt, bob's badge drops.
        resp = await bob.update_receipt_marker(room, ids[1])
        assert isinstance(resp, UpdateReceiptMarkerResponse), resp
        await sync_until(alice, lambda: bob.user_id in alice.rooms[room].threaded_read_receipts, "bob's receipt")
        receipt = alice.rooms[room].threaded_read_receipts[bob.user_id]["main"]
        assert (receipt.event_id, receipt.receipt_type, receipt.user_id) == (ids[1], "m.read", bob.user_id)
        assert receipt.timestamp > 0
        await sync_until(bob, lambda: bob_room.unread_notifications == 2, "2 unread after the receipt")
        assert bob_room.unread_highlights == 1

        # read markers: fully-read marker plus a *private* receipt clear everything for bob.
        resp = await bob.room_read_markers(room, fully_read_event=mention, private_read_event=mention)
        assert isinstance(resp, RoomReadMarkersResponse), resp
        await sync_until(bob, lambda: bob_room.fully_read_marker == mention and bob_room.unread_notifications == 0,
                         "fully-read marker and cleared count")
        assert bob_room.unread_highlights == 0
        assert bob_room.read_receipts[bob.user_id].receipt_type == "m.read.private"  # bob sees his own
        assert bob_room.read_receipts[bob.user_id].event_id == mention

        # ... but alice never learns of the private receipt: she still sees bob at ids[1].
        marker = await send_text(bob, room, "caught up")
        alice_timeline = Timeline(alice)
        await sync_until(alice, lambda: marker in alice_timeline.ids(room), "bob's later message")
        assert not [r for e in alice_receipts for r in e.receipts if r.receipt_type == ReceiptType.read_private.value]
        assert bob.user_id not in alice.rooms[room].read_receipts
        assert alice.rooms[room].threaded_read_receipts[bob.user_id]["main"].event_id == ids[1]
        # bob's own message does not count as unread for him, alice's next one does.
        await send_text(alice, room, "one more")
        await sync_until(bob, lambda: bob_room.unread_notifications == 1, "a new unread message")

    scenario_with_clients(server, body)


# -- typing ------------------------------------------------------------------------------------


def test_typing_notices_start_stop_and_expire(server: ServerProcess) -> None:
    async def body(c: Clients) -> None:
        (alice, _), (bob, _) = await c.new_user(), await c.new_user()
        room = await shared_room(alice, bob)
        bob_room = bob.rooms[room]
        assert isinstance(await alice.room_typing(room, True, timeout=20_000), RoomTypingResponse)
        await sync_until(bob, lambda: bob_room.typing_users == [alice.user_id], "alice typing")
        assert isinstance(await alice.room_typing(room, False), RoomTypingResponse)
        await sync_until(bob, lambda: bob_room.typing_users == [], "alice stopped typing")
        # A notice that is never cancelled expires by itself.
        await alice.room_typing(room, True, timeout=1000)
        await sync_until(bob, lambda: bob_room.typing_users == [alice.user_id], "alice typing again")
        started = time.monotonic()
        await sync_until(bob, lambda: bob_room.typing_users == [], "the notice expiring", timeout=6)
        assert time.monotonic() - started < 5

    scenario_with_clients(server, body)


# -- presence ----------------------------------------------------------------------------------


def test_presence_status_reaches_room_mates(server: ServerProcess) -> None:
    async def body(c: Clients) -> None:
        (alice, _), (bob, _), (stranger, _) = await c.new_user(), await c.new_user(), await c.new_user()
        room = await shared_room(alice, bob)
        seen: list[PresenceEvent] = []

        async def on_presence(event: PresenceEvent) -> None:
            seen.append(event)

        bob.add_presence_callback(on_presence, PresenceEvent)
        resp = await alice.set_presence("unavailable", "in a meeting")
        assert isinstance(resp, PresenceSetResponse), resp

        status = await bob.get_presence(alice.user_id)
        assert isinstance(status, PresenceGetResponse), status
        assert (status.presence, status.status_msg) == ("unavailable", "in a meeting")
        await sync_until(bob, lambda: any(e.user_id == alice.user_id and e.presence == "unavailable" for e in seen),
                         "alice away")
        latest = [e for e in seen if e.user_id == alice.user_id][-1]
        assert latest.status_msg == "in a meeting"
        member = bob.rooms[room].users[alice.user_id]
        assert (member.presence, member.status_msg) == ("unavailable", "in a meeting")

        # Back online (nio now syncs alice with set_presence=online).
        assert isinstance(await alice.set_presence("online", "back"), PresenceSetResponse)
        await alice.sync(timeout=0)
        await sync_until(bob, lambda: bob.rooms[room].users[alice.user_id].presence == "online", "alice online")
        assert bob.rooms[room].users[alice.user_id].status_msg == "back"
        # Someone who shares no room with alice may not watch her.
        denied = await stranger.get_presence(alice.user_id)
        assert isinstance(denied, PresenceGetError), denied

    scenario_with_clients(server, body)


# -- profiles ----------------------------------------------------------------------------------


def test_profile_changes_reach_room_members(server: ServerProcess) -> None:
    async def body(c: Clients) -> None:
        (alice, _), (bob, _) = await c.new_user(), await c.new_user()
        room = await shared_room(alice, bob)
        bob_timeline = Timeline(bob)
        assert isinstance(await alice.set_displayname("Alice Liddell"), ProfileSetDisplayNameResponse)
        assert isinstance(await alice.set_avatar("mxc://localhost/alice-avatar"), ProfileSetAvatarResponse)

        profile = await bob.get_profile(alice.user_id)
        assert isinstance(profile, ProfileGetResponse), profile
        assert (profile.displayname, profile.avatar_url) == ("Alice Liddell", "mxc://localhost/alice-avatar")
        assert (await bob.get_displayname(alice.user_id)).displayname == "Alice Liddell"
        assert (await bob.get_avatar(alice.user_id)).avatar_url == "mxc://localhost/alice-avatar"

        bob_room = bob.rooms[room]
        await sync_until(bob, lambda: bob_room.user_name(alice.user_id) == "Alice Liddell"
                         and bob_room.avatar_url(alice.user_id) == "mxc://localhost/alice-avatar", "alice's new profile")
        # The change arrived as member events that keep alice joined.
        changes = [e for e in bob_timeline.events[room] if isinstance(e, RoomMemberEvent) and e.state_key == alice.user_id]
        assert changes and all(e.membership == "join" and e.prev_membership == "join" for e in changes)
        assert changes[-1].content["displayname"] == "Alice Liddell"
        # A clashing name is disambiguated by the client from the member list the server sent.
        await bob.set_displayname("Alice Liddell")
        await sync_until(bob, lambda: bob_room.user_name(bob.user_id) == f"Alice Liddell ({bob.user_id})", "the clash")

    scenario_with_clients(server, body)


# -- account data: m.direct, tags, room account data ------------------------------------------


def test_direct_chats_tags_and_account_data_sync_across_devices(server: ServerProcess) -> None:
    async def body(c: Clients) -> None:
        (alice, alice_user), (bob, _) = await c.new_user("laptop"), await c.new_user()
        phone = await c.login(alice_user, "phone")  # alice's second device learns everything via sync
        await phone.sync(timeout=0)
        global_data: list[AccountDataEvent] = []
        room_data: list[AccountDataEvent] = []

        async def on_global(event: AccountDataEvent) -> None:
            global_data.append(event)

        async def on_room(_room: Any, event: AccountDataEvent) -> None:
            room_data.append(event)

        phone.add_global_account_data_callback(on_global, AccountDataEvent)
        phone.add_room_account_data_callback(on_room, AccountDataEvent)

        assert isinstance(await alice.list_direct_rooms(), DirectRoomsErrorResponse)  # never set yet
        created = await alice.room_create(is_direct=True, invite=[bob.user_id], preset=RoomPreset.trusted_private_chat)
        assert isinstance(created, RoomCreateResponse), created
        dm = created.room_id
        await sync_until(bob, lambda: dm in bob.invited_rooms, "the DM invite")
        invite = bob.invited_rooms[dm]
        assert invite.inviter == alice.user_id
        sync = await api(bob, "GET", "/_matrix/client/v3/sync")
        me = [e for e in sync["rooms"]["invite"][dm]["invite_state"]["events"]
              if e["type"] == "m.room.member" and e["state_key"] == bob.user_id]
        assert me and me[0]["content"].get("is_direct") is True  # bob's client can file it as a DM
        assert isinstance(await bob.join(dm), JoinResponse)

        # m.direct is the client's job: alice records the DM, her phone sees it.
        await api(alice, "PUT", f"/_matrix/client/v3/user/{q(alice.user_id)}/account_data/m.direct", {bob.user_id: [dm]})
        direct = await alice.list_direct_rooms()
        assert isinstance(direct, DirectRoomsResponse), direct
        assert direct.rooms == {bob.user_id: [dm]}
        await sync_until(phone, lambda: any(isinstance(e, UnknownAccountDataEvent) and e.type == "m.direct" for e in global_data),
                         "m.direct")
        assert [e.content for e in global_data if isinstance(e, UnknownAccountDataEvent) and e.type == "m.direct"][-1] == {
            bob.user_id: [dm]}

        # Tags: favourite + a user tag, then untag; each change syncs as an m.tag TagEvent.
        tags = f"/_matrix/client/v3/user/{q(alice.user_id)}/rooms/{q(dm)}/tags"
        await api(alice, "PUT", f"{tags}/m.favourite", {"order": 0.5})
        await api(alice, "PUT", f"{tags}/u.friends", {})
        await sync_until(phone, lambda: dm in phone.rooms and phone.rooms[dm].tags == {
            "m.favourite": {"order": 0.5}, "u.friends": {}}, "the tags")
        assert any(isinstance(e, TagEvent) for e in room_data)
        await api(alice, "DELETE", f"{tags}/u.friends")
        await sync_until(phone, lambda: phone.rooms[dm].tags == {"m.favourite": {"order": 0.5}}, "the untag")
        assert await api(alice, "GET", tags) == {"tags": {"m.favourite": {"order": 0.5}}}

        # Arbitrary per-room account data (a draft) and the fully-read marker.
        draft = f"/_matrix/client/v3/user/{q(alice.user_id)}/rooms/{q(dm)}/account_data/org.example.draft"
        await api(alice, "PUT", draft, {"text": "see you at"})
        last = await send_text(bob, dm, "hi alice")
        await alice.room_read_markers(dm, fully_read_event=last)
        await sync_until(phone, lambda: phone.rooms[dm].fully_read_marker == last, "the fully-read marker")
        drafts = [e.content for e in room_data if isinstance(e, UnknownAccountDataEvent) and e.type == "org.example.draft"]
        assert drafts == [{"text": "see you at"}]
        assert any(isinstance(e, FullyReadEvent) and e.event_id == last for e in room_data)
        # Account data is private: bob's sync carries none of it.
        bob_sync = await api(bob, "GET", "/_matrix/client/v3/sync")
        assert "m.direct" not in [e["type"] for e in bob_sync.get("account_data", {}).get("events", [])]
        assert not bob_sync["rooms"]["join"][dm].get("account_data", {}).get("events")
        # Other users' account data cannot be read or written.
        await api(bob, "GET", f"/_matrix/client/v3/user/{q(alice.user_id)}/account_data/m.direct", expect=403)
        await api(bob, "PUT", f"/_matrix/client/v3/user/{q(alice.user_id)}/rooms/{q(dm)}/tags/u.x", {}, expect=403)

    scenario_with_clients(server, body)


# -- room directory and aliases ----------------------------------------------------------------


def test_aliases_and_public_room_directory(server: ServerProcess) -> None:
    tag = uid()
    admin_http = admin_user(server, f"admin{tag}")

    async def body(c: Clients) -> None:
        (alice, _), (bob, _) = await c.new_user(), await c.new_user()
        admin = await c.login(admin_http)
        room = (await alice.room_create(name=f"Book club {tag}", topic="Reading together")).room_id
        alias = f"#books-{tag}:{server.server_name}"

        assert isinstance(await alice.room_put_alias(alias, room), RoomPutAliasResponse)
        # (nio reports put/delete alias as successes whatever the status, so check the status itself)
        bobs_room = (await bob.room_create(name="bob's")).room_id
        taken = await bob.room_put_alias(alias, bobs_room)
        assert taken.transport_response.status == 409  # the name is taken
        not_member = await bob.room_put_alias(f"#bob-{tag}:{server.server_name}", room)
        assert not_member.transport_response.status == 403  # no aliases for rooms bob is not in
        resolved = await bob.room_resolve_alias(alias)
        assert isinstance(resolved, RoomResolveAliasResponse), resolved
        assert (resolved.room_id, resolved.servers) == (room, [server.server_name])

        visibility = await bob.room_get_visibility(room)  # no auth needed
        assert isinstance(visibility, RoomGetVisibilityResponse) and visibility.visibility == "private"
        # Publishing needs a server admin here; alice may not even for her own room.
        await api(alice, "PUT", f"/_matrix/client/v3/directory/list/room/{q(room)}", {"visibility": "public"}, expect=403)

        # An admin creates a published room with an alias: people find and join it by name.
        lobby = await admin.room_create(visibility=RoomVisibility.public, alias=f"lobby-{tag}", name=f"Lobby {tag}",
                                        topic="Everyone welcome")
        assert isinstance(lobby, RoomCreateResponse), lobby
        joined = await bob.join(f"#lobby-{tag}:{server.server_name}")
        assert isinstance(joined, JoinResponse) and joined.room_id == lobby.room_id
        listing = await bob.list_public_rooms(filter_generic_search_term=tag)
        assert isinstance(listing, PublicRoomsResponse), listing
        assert [r.room_id for r in listing.public_rooms] == [lobby.room_id]
        entry = listing.public_rooms[0]
        assert (entry.name, entry.topic, entry.num_joined_members) == (f"Lobby {tag}", "Everyone welcome", 2)
        assert (entry.canonical_alias, entry.join_rule) == (f"#lobby-{tag}:{server.server_name}", "public")
        assert (await alice.room_get_visibility(lobby.room_id)).visibility == "public"
        everything = await alice.list_public_rooms(limit=500)
        assert lobby.room_id in [r.room_id for r in everything.public_rooms]
        assert room not in [r.room_id for r in everything.public_rooms]

        # The admin unpublishes it again.
        await api(admin, "PUT", f"/_matrix/client/v3/directory/list/room/{q(lobby.room_id)}", {"visibility": "private"})
        assert (await bob.list_public_rooms(filter_generic_search_term=tag)).public_rooms == []

        # Only the alias's creator (or an admin) removes it; then it no longer resolves.
        assert (await bob.room_delete_alias(alias)).transport_response.status == 403
        deleted = await alice.room_delete_alias(alias)
        assert isinstance(deleted, RoomDeleteAliasResponse) and deleted.transport_response.status == 200
        gone = await bob.room_resolve_alias(alias)
        assert isinstance(gone, RoomResolveAliasError) and gone.status_code == "M_NOT_FOUND"

    scenario_with_clients(server, body)


# -- relations: edits, threads, reactions ------------------------------------------------------


def _edit(original: str, text: str) -> dict[str, Any]:
    return {"msgtype": "m.text", "body": f"* {text}", "m.new_content": {"msgtype": "m.text", "body": text},
            "m.relates_to": {"rel_type": "m.replace", "event_id": original}}


def _reply_in_thread(root: str, text: str) -> dict[str, Any]:
    return {"msgtype": "m.text", "body": text, "m.relates_to": {"rel_type": "m.thread", "event_id": root}}


def _reaction(target: str, key: str) -> dict[str, Any]:
    return {"m.relates_to": {"rel_type": "m.annotation", "event_id": target, "key": key}}


def test_edits_threads_reactions_and_bundled_aggregations(server: ServerProcess) -> None:
    async def body(c: Clients) -> None:
        (alice, _), (bob, _), (carol, _) = await c.new_user(), await c.new_user(), await c.new_user()
        room = await shared_room(alice, bob)
        bob_timeline = Timeline(bob)
        root = await send_text(alice, room, "Who's coming to the picnic?")
        first_edit = await send_text(alice, room, _edit(root, "Who's coming to the picnic on Saturday?"))
        latest_edit = await send_text(alice, room, _edit(root, "Who's coming to the picnic on Sunday?"))
        thumbs = await send_text(bob, room, _reaction(root, "👍"), event_type="m.reaction")
        replies = [await send_text(bob, room, _reply_in_thread(root, "me!")),
                   await send_text(alice, room, _reply_in_thread(root, "great, bring cake"))]
        after = await send_text(alice, room, "unrelated")

        # bob's client receives the relation events in its timeline, typed by nio.
        await sync_until(bob, lambda: after in bob_timeline.ids(room), "the conversation")
        by_id = {e.event_id: e for e in bob_timeline.events[room]}
        assert isinstance(by_id[thumbs], ReactionEvent) and by_id[thumbs].reacts_to == root and by_id[thumbs].key == "👍"
        assert by_id[latest_edit].source["content"]["m.relates_to"] == {"rel_type": "m.replace", "event_id": root}

        def check_bundle(event: Event, viewer_participated: bool) -> None:
            relations = event.source["unsigned"]["m.relations"]
            assert event.source["content"]["body"] == "Who's coming to the picnic?"  # the original is left intact
            assert relations["m.replace"]["event_id"] == latest_edit
            assert relations["m.replace"]["content"]["m.new_content"]["body"] == "Who's coming to the picnic on Sunday?"
            thread = relations["m.thread"]
            assert thread["count"] == 2 and thread["latest_event"]["event_id"] == replies[-1]
            assert thread["current_user_participated"] is viewer_participated

        got = await bob.room_get_event(room, root)
        assert isinstance(got, RoomGetEventResponse), got
        check_bundle(got.event, True)
        context = await alice.room_context(room, root, limit=4)
        assert isinstance(context, RoomContextResponse), context
        check_bundle(context.event, True)
        assert [e.event_id for e in context.events_after][:2] == [first_edit, latest_edit]
        await alice.room_invite(room, carol.user_id)
        assert isinstance(await carol.join(room), JoinResponse)
        check_bundle((await carol.room_get_event(room, root)).event, False)

        # /relations through nio's iterators: everything, by type, and paginated raw.
        everything = [e.event_id async for e in bob.room_get_event_relations(room, root)]
        assert everything == [replies[1], replies[0], thumbs, latest_edit, first_edit]  # newest first
        in_thread = [e.event_id async for e in bob.room_get_event_relations(room, root, RelationshipType.thread, limit=1)]
        assert in_thread == replies[::-1]
        reactions = [e async for e in bob.room_get_event_relations(room, root, RelationshipType.annotation, "m.reaction")]
        assert [(type(e), e.key) for e in reactions] == [(ReactionEvent, "👍")]
        page = await api(bob, "GET", f"/_matrix/client/v1/rooms/{q(room)}/relations/{q(root)}/m.replace",
                         params={"limit": 1, "dir": "f"})
        assert [e["event_id"] for e in page["chunk"]] == [first_edit] and page["next_batch"]

        # /threads: the room's thread list, and "threads I take part in".
        assert [e.event_id async for e in bob.room_get_threads(room)] == [root]
        assert [e.event_id async for e in carol.room_get_threads(room, ThreadInclusion.participated)] == []
        raw_threads = await api(alice, "GET", f"/_matrix/client/v1/rooms/{q(room)}/threads", params={"include": "participated"})
        assert [e["event_id"] for e in raw_threads["chunk"]] == [root]
        assert raw_threads["chunk"][0]["unsigned"]["m.relations"]["m.thread"]["count"] == 2

    scenario_with_clients(server, body)


def test_duplicate_reaction_is_refused(server: ServerProcess) -> None:
    """Tapping the same reaction twice must not count twice (spec: M_DUPLICATE_ANNOTATION)."""

    async def body(c: Clients) -> None:
        (alice, _), (bob, _) = await c.new_user(), await c.new_user()
        room = await shared_room(alice, bob)
        target = await send_text(alice, room, "vote with a reaction")
        await send_text(bob, room, _reaction(target, "🎉"), event_type="m.reaction")
        again = await bob.room_send(room, "m.reaction", _reaction(target, "🎉"))
        assert isinstance(again, RoomSendError), again
        assert again.transport_response.status == 400 and again.status_code == "M_DUPLICATE_ANNOTATION"
        # a different key, or another user's identical key, is fine
        await send_text(bob, room, _reaction(target, "👍"), event_type="m.reaction")
        await send_text(alice, room, _reaction(target, "🎉"), event_type="m.reaction")

    scenario_with_clients(server, body)


# -- search ------------------------------------------------------------------------------------


def test_search_finds_messages_sent_with_nio(server: ServerProcess) -> None:
    async def body(c: Clients) -> None:
        (alice, _), (bob, _), (carol, _) = await c.new_user(), await c.new_user(), await c.new_user()
        room = await shared_room(alice, bob)
        word = f"kumquat{uid()}"
        older = await send_text(alice, room, f"Does anyone like {word} jam?")
        newer = await send_text(bob, room, f"I love {word} jam, {word} forever")
        await send_text(alice, room, "something else")

        def search_body(**extra: Any) -> dict[str, Any]:
            return {"search_categories": {"room_events": {"search_term": word, **extra}}}

        found = (await api(bob, "POST", "/_matrix/client/v3/search", search_body()))["search_categories"]["room_events"]
        assert found["count"] == 2 and [r["result"]["event_id"] for r in found["results"]] == [newer, older]  # by rank
        assert word in found["highlights"]
        parsed = Event.parse_event(found["results"][0]["result"])  # results are ordinary events nio can parse
        assert isinstance(parsed, RoomMessageText) and parsed.sender == bob.user_id
        recent = (await api(bob, "POST", "/_matrix/client/v3/search",
                            search_body(order_by="recent", event_context={"before_limit": 1, "after_limit": 1})
                            ))["search_categories"]["room_events"]
        assert [r["result"]["event_id"] for r in recent["results"]] == [newer, older]
        context = recent["results"][1]["context"]
        assert [e["event_id"] for e in context["events_after"]] == [newer]
        # Someone outside the room finds nothing.
        outside = (await api(carol, "POST", "/_matrix/client/v3/search", search_body()))["search_categories"]["room_events"]
        assert outside["results"] == [] and outside.get("count", 0) == 0

    scenario_with_clients(server, body)


# -- devices -----------------------------------------------------------------------------------


def test_devices_list_rename_and_delete_logs_the_device_out(server: ServerProcess) -> None:
    async def body(c: Clients) -> None:
        alice, alice_user = await c.new_user("laptop")
        # nio's schema wants every device to carry a display_name (the spec makes it optional and
        # Bastion omits it for unnamed devices), so sign out the unnamed registration device.
        alice_user.call("POST", "/_matrix/client/v3/logout")
        phone = await c.login(alice_user, "phone")
        await phone.sync(timeout=0)

        listed = await alice.devices()
        assert isinstance(listed, DevicesResponse), listed
        assert {d.id: d.display_name for d in listed.devices} == {alice.device_id: "laptop", phone.device_id: "phone"}

        assert isinstance(await alice.update_device(phone.device_id, {"display_name": "old phone"}), UpdateDeviceResponse)
        assert {d.id: d.display_name for d in (await alice.devices()).devices}[phone.device_id] == "old phone"

        challenge = await alice.delete_devices([phone.device_id])
        assert isinstance(challenge, DeleteDevicesAuthResponse), challenge
        assert ["m.login.password"] in [f["stages"] for f in challenge.flows]
        wrong = await alice.delete_devices([phone.device_id], auth=password_auth(alice_user, challenge.session, "wrong pw"))
        assert not isinstance(wrong, DeleteDevicesResponse), wrong
        assert isinstance(await phone.sync(timeout=0), SyncResponse)  # still signed in

        challenge = await alice.delete_devices([phone.device_id])
        done = await alice.delete_devices([phone.device_id], auth=password_auth(alice_user, challenge.session))
        assert isinstance(done, DeleteDevicesResponse), done
        signed_out = await phone.sync(timeout=0)
        assert isinstance(signed_out, SyncError) and signed_out.status_code == "M_UNKNOWN_TOKEN", signed_out
        assert isinstance(await phone.whoami(), WhoamiError)
        assert [d.id for d in (await alice.devices()).devices] == [alice.device_id]
        assert isinstance(await alice.sync(timeout=0), SyncResponse)  # the laptop is unaffected

    scenario_with_clients(server, body)


# -- push rules --------------------------------------------------------------------------------


class Badge:
    """bob's view of one room: what alice says arrives, and the unread badge that goes with it."""

    def __init__(self, alice: AsyncClient, bob: AsyncClient, room: str) -> None:
        self.alice, self.bob, self.room = alice, bob, room
        self.timeline = Timeline(bob)

    async def alice_says(self, body: str | dict[str, Any]) -> str:
        event_id = await send_text(self.alice, self.room, body)
        await sync_until(self.bob, lambda: event_id in self.timeline.ids(self.room), repr(body))
        return event_id

    def counts(self) -> tuple[int, int]:
        room = self.bob.rooms[self.room]
        return room.unread_notifications, room.unread_highlights

    async def read_all(self) -> None:
        resp = await self.bob.update_receipt_marker(self.room, self.timeline.ids(self.room)[-1])
        assert isinstance(resp, UpdateReceiptMarkerResponse), resp
        await sync_until(self.bob, lambda: self.counts() == (0, 0), "a cleared badge")


def test_push_rules_drive_unread_counts(server: ServerProcess) -> None:
    async def body(c: Clients) -> None:
        (alice, _), (bob, _) = await c.new_user(), await c.new_user()
        room = await shared_room(alice, bob)
        badge = Badge(alice, bob, room)
        rulesets: list[PushRulesEvent] = []

        async def on_rules(event: PushRulesEvent) -> None:
            rulesets.append(event)

        bob.add_global_account_data_callback(on_rules, PushRulesEvent)

        # A keyword rule: messages saying "picnic" highlight.
        resp = await bob.set_pushrule("global", PushRuleKind.content, "picnic", pattern="picnic",
                                      actions=[PushNotify(), PushSetTweak("highlight", True)])
        assert isinstance(resp, SetPushRuleResponse), resp
        await sync_until(bob, lambda: any(r.id == "picnic" for e in rulesets for r in e.global_rules.content),
                         "the new rule in m.push_rules")
        rule = next(r for r in rulesets[-1].global_rules.content if r.id == "picnic")
        assert (rule.pattern, rule.enabled, rule.default) == ("picnic", True, False)
        await badge.alice_says("hello")
        await badge.alice_says("picnic on Sunday")
        assert badge.counts() == (2, 1)
        await badge.read_all()

        # Disabled, it no longer highlights (the default rules still notify).
        assert isinstance(await bob.enable_pushrule("global", PushRuleKind.content, "picnic", False), EnablePushRuleResponse)
        await badge.alice_says("the picnic moved")
        assert badge.counts() == (1, 0)
        await badge.read_all()

        # (bob reads before every rule change: see test_unread_highlight_is_not_recounted_when_rules_change)
        # Silence one-to-one chatter by changing a server-default rule's actions...
        resp = await bob.set_pushrule_actions("global", PushRuleKind.underride, ".m.rule.room_one_to_one", [])
        assert isinstance(resp, SetPushRuleActionsResponse), resp
        await badge.alice_says("just chatting")
        assert badge.counts() == (0, 0)
        # ... mentions still get through (override rules come first) ...
        await badge.alice_says({"msgtype": "m.text", "body": "bob!", "m.mentions": {"user_ids": [bob.user_id]}})
        assert badge.counts() == (1, 1)
        await badge.read_all()
        # ... and a room rule for this room makes it notify again.
        assert isinstance(await bob.set_pushrule("global", PushRuleKind.room, room, actions=[PushNotify()]), SetPushRuleResponse)
        await badge.alice_says("room rule")
        assert badge.counts() == (1, 0)
        await badge.read_all()

        assert isinstance(await bob.delete_pushrule("global", PushRuleKind.content, "picnic"), DeletePushRuleResponse)
        await api(bob, "GET", "/_matrix/client/v3/pushrules/global/content/picnic", expect=404)
        assert isinstance(await bob.delete_pushrule("global", PushRuleKind.override, ".m.rule.master"), DeletePushRuleError)
        await sync_until(bob, lambda: not any(r.id == "picnic" for r in rulesets[-1].global_rules.content), "the deletion")
        underride = {r.id: r for r in rulesets[-1].global_rules.underride}
        assert underride[".m.rule.room_one_to_one"].actions == []
        assert room in [r.id for r in rulesets[-1].global_rules.room]

        # The master switch silences everything, mentions included.
        assert isinstance(await bob.enable_pushrule("global", PushRuleKind.override, ".m.rule.master", True), EnablePushRuleResponse)
        await badge.alice_says({"msgtype": "m.text", "body": "bob!!", "m.mentions": {"user_ids": [bob.user_id]}})
        assert badge.counts() == (0, 0)

    scenario_with_clients(server, body)


def test_unread_highlight_is_not_recounted_when_rules_change(server: ServerProcess) -> None:
    """A highlight bob was already notified about stays in his badge until he reads it.

    Push rules are evaluated when an event arrives (that is when the push gateway is
    told, with ``prio: high`` for highlights), and GET /notifications lists "the events
    that the user has been, or would have been notified about". Changing a rule later
    must not rewrite the past.
    """

    async def body(c: Clients) -> None:
        (alice, _), (bob, _) = await c.new_user(), await c.new_user()
        room = await shared_room(alice, bob)
        badge = Badge(alice, bob, room)
        await bob.set_pushrule("global", PushRuleKind.content, "picnic", pattern="picnic",
                               actions=[PushNotify(), PushSetTweak("highlight", True)])
        picnic = await badge.alice_says("picnic on Sunday")
        assert badge.counts() == (1, 1)
        highlights = await api(bob, "GET", "/_matrix/client/v3/notifications", params={"only": "highlight"})
        assert [n["event"]["event_id"] for n in highlights["notifications"]] == [picnic]

        await bob.enable_pushrule("global", PushRuleKind.content, "picnic", False)  # no more picnic highlights from now on
        await badge.alice_says("something else")
        assert badge.counts() == (2, 1)  # the unread picnic message still highlights
        highlights = await api(bob, "GET", "/_matrix/client/v3/notifications", params={"only": "highlight"})
        assert [n["event"]["event_id"] for n in highlights["notifications"]] == [picnic]

    scenario_with_clients(server, body)


def test_unread_counts_survive_a_server_restart(make_server) -> None:
    """The badge must not change because the server restarted.

    alice's @room mention highlights for bob (her power level allows room
    notifications). alice then lowers her own power level below notifications.room.
    Nothing bob has not read changes, so his counts must stay (1, 1) — also after a
    restart.
    """
    srv: ServerProcess = make_server()

    async def body(c: Clients) -> None:
        (alice, _), (bob, _) = await c.new_user(), await c.new_user()
        room = await shared_room(alice, bob)
        badge = Badge(alice, bob, room)
        await badge.alice_says({"msgtype": "m.text", "body": "@room fire drill at 3", "m.mentions": {"room": True}})
        assert badge.counts() == (1, 1)
        levels = (await alice.room_get_state_event(room, "m.room.power_levels")).content
        levels["notifications"] = {"room": 100}
        levels["users"][alice.user_id] = 99  # alice steps down a little
        await alice.room_put_state(room, "m.room.power_levels", levels)
        await sync_until(bob, lambda: bob.rooms[room].power_levels.get_user_level(alice.user_id) == 99, "the new levels")
        assert badge.counts() == (1, 1)

        srv.restart()
        await bob.sync(timeout=0, full_state=True)  # counts come with every sync of the room
        assert badge.counts() == (1, 1)

    scenario_with_clients(srv, body)


def test_own_message_reads_the_room_also_after_a_restart(make_server) -> None:
    """bob's reply marks what came before it as read (he has seen it); after a restart
    the server must still know his newest message in the room, or his badge jumps back
    to everything alice ever said."""
    srv: ServerProcess = make_server()

    async def body(c: Clients) -> None:
        (alice, _), (bob, _) = await c.new_user(), await c.new_user()
        room = await shared_room(alice, bob)
        badge = Badge(alice, bob, room)
        await badge.alice_says("one")
        await badge.alice_says("two")
        assert badge.counts() == (2, 0)
        reply = await send_text(bob, room, "seen both")
        await sync_until(bob, lambda: reply in badge.timeline.ids(room) and badge.counts() == (0, 0), "bob's reply")
        await badge.alice_says("three")
        assert badge.counts() == (1, 0)

        srv.restart()
        await bob.sync(timeout=0, full_state=True)  # counts come with every sync of the room
        assert badge.counts() == (1, 0)

    scenario_with_clients(srv, body)


# -- user directory ----------------------------------------------------------------------------


async def directory_search(client: AsyncClient, term: str, limit: int | None = None) -> dict[str, Any]:
    payload: dict[str, Any] = {"search_term": term}
    if limit is not None:
        payload["limit"] = limit
    return await api(client, "POST", "/_matrix/client/v3/user_directory/search", payload)


def test_user_directory_finds_room_mates_by_name(server: ServerProcess) -> None:
    async def body(c: Clients) -> None:
        tag = uid()
        (alice, _), (bob, _), (carol, _), (fred, _) = [await c.new_user() for _ in range(4)]
        await shared_room(alice, bob)
        await shared_room(alice, fred)
        await bob.set_displayname(f"Zebedee {tag} Bob")
        await fred.set_displayname(f"Zebedee {tag} Fred")
        await carol.set_displayname(f"Zebedee {tag} Carol")  # shares no room with alice, in no public room

        found = await directory_search(alice, f"zebedee {tag}")
        assert {r["user_id"]: r.get("display_name") for r in found["results"]} == {
            bob.user_id: f"Zebedee {tag} Bob", fred.user_id: f"Zebedee {tag} Fred"}
        assert found["limited"] is False
        page = await directory_search(alice, f"zebedee {tag}", limit=1)
        assert len(page["results"]) == 1 and page["limited"] is True
        # by user ID too
        by_id = await directory_search(alice, bob.user_id.split(":")[0][1:])
        assert [r["user_id"] for r in by_id["results"]] == [bob.user_id]
        # renames are reflected at once
        await bob.set_displayname(f"Robert {tag}")
        assert [r["user_id"] for r in (await directory_search(alice, f"robert {tag}"))["results"]] == [bob.user_id]
        assert bob.user_id not in [r["user_id"] for r in (await directory_search(alice, f"zebedee {tag}"))["results"]]

    scenario_with_clients(server, body)


def test_user_directory_includes_members_of_public_and_world_readable_rooms(server: ServerProcess) -> None:
    """spec (POST /user_directory/search): the homeserver MUST at a minimum consider users
    who share a room with the requester, users joined to rooms with a ``public`` join rule,
    and users joined to rooms with ``world_readable`` history visibility."""

    async def body(c: Clients) -> None:
        tag = uid()
        (alice, _), (dora, _), (eve, _) = [await c.new_user() for _ in range(3)]
        await dora.set_displayname(f"Quill {tag} Dora")
        await eve.set_displayname(f"Quill {tag} Eve")
        # dora: a public (join rule) room, not published in the room directory
        assert isinstance(await dora.room_create(preset=RoomPreset.public_chat, name="open door"), RoomCreateResponse)
        # eve: an invite-only room whose history anyone may read
        readable = await eve.room_create(initial_state=[
            {"type": "m.room.history_visibility", "state_key": "", "content": {"history_visibility": "world_readable"}}])
        assert isinstance(readable, RoomCreateResponse), readable
        found = {r["user_id"] for r in (await directory_search(alice, f"quill {tag}"))["results"]}
        assert found == {dora.user_id, eve.user_id}

    scenario_with_clients(server, body)


# -- account deactivation ----------------------------------------------------------------------


def test_account_deactivation_signs_out_and_leaves_rooms(server: ServerProcess) -> None:
    async def body(c: Clients) -> None:
        (alice, _), (dave, dave_user) = await c.new_user(), await c.new_user()
        dave_tablet = await c.login(dave_user, "tablet")
        room = await shared_room(alice, dave)
        said = await send_text(dave, room, "goodbye everyone")

        first = await api(dave, "POST", "/_matrix/client/v3/account/deactivate", {}, expect=401)
        assert ["m.login.password"] in [f["stages"] for f in first["flows"]]
        await api(dave, "POST", "/_matrix/client/v3/account/deactivate",
                  {"auth": password_auth(dave_user, first["session"], "wrong password")}, expect=401)
        assert isinstance(await dave.sync(timeout=0), SyncResponse)  # a wrong password changes nothing
        done = await api(dave, "POST", "/_matrix/client/v3/account/deactivate",
                         {"auth": password_auth(dave_user, first["session"])})
        assert done["id_server_unbind_result"] in ("success", "no-support")

        for device in (dave, dave_tablet):  # every device is signed out
            gone = await device.sync(timeout=0)
            assert isinstance(gone, SyncError) and gone.status_code == "M_UNKNOWN_TOKEN", gone
        await sync_until(alice, lambda: dave.user_id not in alice.rooms[room].users, "dave leaving")
        messages = await alice.room_messages(room, start=alice.next_batch, limit=10)
        assert said in [e.event_id for e in messages.chunk]  # what he said stays
        again = AsyncClient(server.base_url, dave.user_id, config=AsyncClientConfig(encryption_enabled=False))
        c.opened.append(again)
        refused = await again.login(dave_user.password)
        assert isinstance(refused, LoginError) and refused.status_code in ("M_USER_DEACTIVATED", "M_FORBIDDEN"), refused

    scenario_with_clients(server, body)


# -- room upgrade ------------------------------------------------------------------------------


def test_room_upgrade_tombstone_reaches_nio(server: ServerProcess) -> None:
    async def body(c: Clients) -> None:
        (alice, _), (bob, _) = await c.new_user(), await c.new_user()
        room = await shared_room(alice, bob, name="Old times", topic="history")
        tombstones: list[RoomUpgradeEvent] = []

        async def on_tombstone(_room: Any, event: RoomUpgradeEvent) -> None:
            tombstones.append(event)

        bob.add_event_callback(on_tombstone, RoomUpgradeEvent)
        await api(bob, "POST", f"/_matrix/client/v3/rooms/{q(room)}/upgrade", {"new_version": "11"}, expect=403)
        new_room = (await api(alice, "POST", f"/_matrix/client/v3/rooms/{q(room)}/upgrade", {"new_version": "11"}))["replacement_room"]

        await sync_until(bob, lambda: bob.rooms[room].replacement_room == new_room, "the tombstone")
        assert [t.replacement_room for t in tombstones] == [new_room] and tombstones[0].sender == alice.user_id
        assert bob.rooms[room].unread_highlights == 1  # .m.rule.tombstone: the move is hard to miss
        assert new_room in bob.invited_rooms  # invite-only room: members are invited to follow
        assert isinstance(await bob.join(new_room), JoinResponse)
        await sync_until(bob, lambda: new_room in bob.rooms and bob.rooms[new_room].name == "Old times", "the new room")
        assert bob.rooms[new_room].room_version == "11" and bob.rooms[new_room].topic == "history"
        create = (await bob.room_get_state_event(new_room, "m.room.create")).content
        assert create["predecessor"]["room_id"] == room
        stale = await bob.room_send(room, "m.room.message", {"msgtype": "m.text", "body": "anyone here?"})
        assert isinstance(stale, RoomSendError) and stale.status_code == "M_FORBIDDEN"
        assert isinstance(await bob.room_send(new_room, "m.room.message", {"msgtype": "m.text", "body": "moved!"}),
                          RoomSendResponse)

    scenario_with_clients(server, body)
