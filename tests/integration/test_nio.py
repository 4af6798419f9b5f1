"""matrix-nio (a real Matrix SDK) against a running Bastion."""

from __future__ import annotations

import asyncio
import time

import pytest
from nio import (
    AsyncClient,
    AsyncClientConfig,
    JoinResponse,
    LoginResponse,
    RoomBanResponse,
    RoomCreateResponse,
    RoomGetStateEventError,
    RoomGetStateEventResponse,
    RoomInviteResponse,
    RoomKickResponse,
    RoomMessagesResponse,
    RoomMessageText,
    RoomPutStateError,
    RoomPutStateResponse,
    RoomSendResponse,
    SyncResponse,
)

from tests.harness import MatrixHttp, ServerProcess


async def nio_login(server: ServerProcess, user: MatrixHttp) -> AsyncClient:
    client = AsyncClient(server.base_url, user.user_id, config=AsyncClientConfig(encryption_enabled=False))
    resp = await client.login(user.password, device_name="nio test")
    assert isinstance(resp, LoginResponse), resp
    return client


@pytest.fixture
def users(server: ServerProcess) -> tuple[MatrixHttp, MatrixHttp]:
    return server.client().register(), server.client().register()


def run(coro):  # small helper: every test is one asyncio program
    return asyncio.run(coro)


def test_login_create_invite_join_and_100_messages_in_order(server: ServerProcess, users) -> None:
    alice_http, bob_http = users

    async def scenario() -> None:
        alice = await nio_login(server, alice_http)
        bob = await nio_login(server, bob_http)
        try:
            created = await alice.room_create(name="nio room", topic="t")
            assert isinstance(created, RoomCreateResponse), created
            room_id = created.room_id
            assert isinstance(await alice.room_invite(room_id, bob.user_id), RoomInviteResponse)

            first = await bob.sync(timeout=0)
            assert isinstance(first, SyncResponse)
            assert room_id in first.rooms.invite
            assert isinstance(await bob.join(room_id), JoinResponse)
            await bob.sync(timeout=0)
            await alice.sync(timeout=0)

            received: list[str] = []

            def on_message(room, event) -> None:
                if room.room_id == room_id and isinstance(event, RoomMessageText) and event.sender == alice.user_id:
                    received.append(event.body)

            bob.add_event_callback(on_message, RoomMessageText)

            async def sender() -> None:
                for i in range(100):
                    resp = await alice.room_send(room_id, "m.room.message", {"msgtype": "m.text", "body": f"msg {i}"})
                    assert isinstance(resp, RoomSendResponse), resp

            async def receiver() -> None:
                deadline = time.monotonic() + 60
                while len(received) < 100 and time.monotonic() < deadline:
                    resp = await bob.sync(timeout=10000)
                    assert isinstance(resp, SyncResponse), resp

            await asyncio.gather(sender(), receiver())
            assert received == [f"msg {i}" for i in range(100)]

            # The room as bob's nio client sees it after syncing.
            room = bob.rooms[room_id]
            assert room.name == "nio room"
            assert set(room.users) == {alice.user_id, bob.user_id}

            # Paginate all the way back to m.room.create.
            token = bob.next_batch
            types: list[str] = []
            for _ in range(50):
                page = await bob.room_messages(room_id, start=token, limit=17)
                assert isinstance(page, RoomMessagesResponse), page
                types.extend(type(e).__name__ for e in page.chunk)
                if not page.chunk or page.end is None:
                    break
                token = page.end
            assert types[-1] == "RoomCreateEvent"
            assert types.count("RoomMessageText") == 100
        finally:
            await alice.close()
            await bob.close()

    run(scenario())


def test_kick_ban_and_power_level_denial(server: ServerProcess, users) -> None:
    alice_http, bob_http = users
    carol_http = server.client().register()

    async def scenario() -> None:
        alice = await nio_login(server, alice_http)
        bob = await nio_login(server, bob_http)
        carol = await nio_login(server, carol_http)
        try:
            room_id = (await alice.room_create(invite=[bob.user_id, carol.user_id])).room_id
            assert isinstance(await bob.join(room_id), JoinResponse)
            assert isinstance(await carol.join(room_id), JoinResponse)
            await carol.sync(timeout=0)

            denied = await bob.room_put_state(room_id, "m.room.name", {"name": "taken over"})
            assert isinstance(denied, RoomPutStateError)
            assert denied.status_code == "M_FORBIDDEN"
            name = await alice.room_get_state_event(room_id, "m.room.name")
            assert isinstance(name, RoomGetStateEventError)  # never set

            ok = await alice.room_put_state(room_id, "m.room.name", {"name": "Ops"})
            assert isinstance(ok, RoomPutStateResponse)
            name = await bob.room_get_state_event(room_id, "m.room.name")
            assert isinstance(name, RoomGetStateEventResponse) and name.content["name"] == "Ops"

            assert isinstance(await alice.room_kick(room_id, carol.user_id, reason="test"), RoomKickResponse)
            carol_sync = await carol.sync(timeout=0)  # incremental: reports the kick
            assert room_id in carol_sync.rooms.leave
            kick = carol_sync.rooms.leave[room_id].timeline.events[-1]
            assert kick.membership == "leave" and kick.sender == alice.user_id
            resp = await carol.room_send(room_id, "m.room.message", {"msgtype": "m.text", "body": "still here?"})
            assert not isinstance(resp, RoomSendResponse)

            assert isinstance(await alice.room_ban(room_id, bob.user_id, reason="test"), RoomBanResponse)
            rejoin = await bob.join(room_id)
            assert not isinstance(rejoin, JoinResponse)
        finally:
            for c in (alice, bob, carol):
                await c.close()

    run(scenario())
