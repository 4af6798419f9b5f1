"""Pacing of long-poll /sync answers while a worker is busy (limits.sync_pacing_ms).

``sync_pacing_busy_lag_ms: 0`` makes the test server count as busy all the time, so the
pacing path runs for real over HTTP; the default threshold leaves an idle server
answering at once.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import pytest

from tests.harness import MatrixHttp, ServerProcess, TestDatabase, start_server

INTERVAL_S = 0.8


@pytest.fixture
def start(tmp_path: Path, test_database: TestDatabase) -> Any:
    started: list[ServerProcess] = []

    def factory(name: str, **limits: Any) -> ServerProcess:
        # One worker: a device's consecutive requests must reach the same process.
        srv = start_server(tmp_path / name, test_database, workers=1, limits=limits)
        started.append(srv)
        return srv

    yield factory
    for srv in started:
        srv.stop()


def bodies(sync: dict[str, Any], room: str) -> list[str]:
    joined = sync["rooms"]["join"].get(room)
    return [e["content"]["body"] for e in joined["timeline"]["events"]] if joined else []


def second_answer(srv: ServerProcess) -> tuple[list[str], float, float]:
    """Alice is answered (m1); m2 is sent, her next long-poll starts, m3 is sent 0.3 s
    later. Returns the bodies of that next answer, the seconds from the first answer to
    it, and how long a ``timeout=0`` sync took right after."""
    alice = srv.client().register()
    bob = alice.new_user()
    room = alice.create_room(preset="public_chat")
    bob.join(room)
    since = alice.sync()["next_batch"]
    bob.send(room, "m1")
    first = alice.sync(since=since, timeout=10_000)
    answered = time.monotonic()
    assert bodies(first, room) == ["m1"]
    bob.send(room, "m2")
    result: dict[str, Any] = {}

    def poll() -> None:
        poller = MatrixHttp(alice.base_url, alice.server_name, alice.token)
        result["sync"] = poller.sync(since=first["next_batch"], timeout=10_000)
        result["at"] = time.monotonic()
        poller.close()

    thread = threading.Thread(target=poll)
    thread.start()
    time.sleep(0.3)
    bob.send(room, "m3")
    thread.join(15)
    start = time.monotonic()
    alice.sync(since=result["sync"]["next_batch"], timeout=0)
    return bodies(result["sync"], room), result["at"] - answered, time.monotonic() - start


def test_a_busy_worker_batches_a_devices_events_into_one_answer(start) -> None:
    srv = start("busy", sync_pacing_ms=int(INTERVAL_S * 1000), sync_pacing_busy_lag_ms=0)
    events, gap, immediate = second_answer(srv)
    # Held until the interval since the first answer passed: m3, sent meanwhile, rides along.
    assert events == ["m2", "m3"]
    assert gap >= INTERVAL_S - 0.1
    # A sync with timeout=0 asks for an answer now and is never held.
    assert immediate < INTERVAL_S / 2


def test_an_idle_worker_answers_at_once(start) -> None:
    srv = start("idle", sync_pacing_ms=int(INTERVAL_S * 1000))  # default threshold: timers 5 ms late
    events, gap, _ = second_answer(srv)
    assert events == ["m2"]  # answered before m3 was sent
    assert gap < INTERVAL_S - 0.1
