"""A message to a big room: every member's long-poll gets it once, and the sender is
answered without waiting for the whole fan-out (long-polls are woken in batches of
``WAKE_BATCH`` per turn of the event loop, the senders first)."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from bastion.streams.notifier import WAKE_BATCH
from tests.harness import (
    MatrixHttp,
    ServerProcess,
    TestDatabase,
    free_port,
    metric_total,
    start_server,
)

MEMBERS = 4 * WAKE_BATCH


@pytest.fixture
def one_worker(tmp_path: Path, test_database: TestDatabase) -> Any:
    # One worker: every long-poll waits in the process that commits the message. No
    # presence: members coming online would wake each other's long-polls first.
    metrics_port = free_port()
    srv = start_server(
        tmp_path / "fanout", test_database, workers=1, presence={"enabled": False},
        metrics={"enabled": True, "listen": {"host": "127.0.0.1", "port": metrics_port}},
    )
    yield srv, metrics_port
    srv.stop()


async def _fan_out(srv: ServerProcess, metrics_port: int, sender: MatrixHttp, room: str,
                   members: list[tuple[MatrixHttp, str]]) -> tuple[float, list[float], list[Any]]:
    url = srv.base_url + "/_matrix/client/v3/sync"
    limits = httpx.Limits(max_connections=len(members) + 5)
    async with httpx.AsyncClient(limits=limits, timeout=60) as http:

        async def poll(member: MatrixHttp, since: str) -> tuple[float, Any]:
            resp = await http.get(url, params={"since": since, "timeout": "30000"},
                                  headers={"Authorization": f"Bearer {member.token}"})
            return time.monotonic(), resp.json()

        polls = [asyncio.create_task(poll(m, since)) for m, since in members]
        deadline = time.monotonic() + 20
        while metric_total(metrics_port, "bastion_sync_waiting") < len(members):
            assert time.monotonic() < deadline, "the long-polls never all started waiting"
            await asyncio.sleep(0.05)
        resp = await http.put(
            f"{srv.base_url}/_matrix/client/v3/rooms/{room}/send/m.room.message/fanout1",
            json={"msgtype": "m.text", "body": "all hands"},
            headers={"Authorization": f"Bearer {sender.token}"},
        )
        sent_at = time.monotonic()
        assert resp.status_code == 200, resp.text
        answers = await asyncio.gather(*polls)
    return sent_at, [at for at, _ in answers], [body for _, body in answers]


def test_a_big_rooms_sender_is_answered_before_the_fan_out_ends(one_worker) -> None:
    srv, metrics_port = one_worker
    sender = srv.client().register()
    room = sender.create_room(preset="public_chat")
    joined = [sender.new_user() for _ in range(MEMBERS)]
    for member in joined:
        member.join(room)
    # Each member's token after every join: the long-polls then wait for the message.
    members = [(m, m.sync()["next_batch"]) for m in joined]

    sent_at, answered_at, bodies = asyncio.run(_fan_out(srv, metrics_port, sender, room, members))

    # Every member got the message, once.
    for body in bodies:
        events = body["rooms"]["join"][room]["timeline"]["events"]
        assert [e["content"]["body"] for e in events] == ["all hands"]
    # The sender's answer came before most of the long-polls' (all of them were answered
    # before it when the whole fan-out ran first).
    assert sum(at > sent_at for at in answered_at) > MEMBERS // 2
