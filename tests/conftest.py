"""Shared fixtures: real Bastion servers over real HTTP, on SQLite or PostgreSQL.

``BASTION_TEST_DATABASE`` selects the database for every server the tests start:
unset or ``sqlite`` for SQLite files in a temporary directory, or a PostgreSQL URL
(``postgresql://user:pass@host/postgres``) with rights to create databases — each
server then gets a fresh database of its own.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.harness import MatrixHttp, ServerProcess, TestDatabase, start_server


@pytest.fixture(scope="session")
def test_database() -> Iterator[TestDatabase]:
    db = TestDatabase(os.environ.get("BASTION_TEST_DATABASE", "sqlite"))
    yield db
    db.cleanup()


@pytest.fixture
def room_pair(server: ServerProcess) -> tuple[MatrixHttp, MatrixHttp, str]:
    """Alice and Bob, both joined to a room Alice created: (alice, bob, room_id)."""
    alice, bob = server.client().register(), server.client().register()
    room = alice.create_room(invite=[bob.user_id])
    bob.join(room)
    return alice, bob, room


@pytest.fixture(scope="session")
def server(tmp_path_factory: pytest.TempPathFactory, test_database: TestDatabase) -> Iterator[ServerProcess]:
    """One server shared by most integration tests (open registration, no token)."""
    srv = start_server(tmp_path_factory.mktemp("server"), test_database)
    yield srv
    srv.stop()


@pytest.fixture
def make_server(tmp_path: Path, test_database: TestDatabase) -> Iterator:
    """Start servers with config overrides; all are stopped after the test."""
    started: list[ServerProcess] = []

    def factory(**overrides) -> ServerProcess:
        srv = start_server(tmp_path / uuid.uuid4().hex[:8], test_database, **overrides)
        started.append(srv)
        return srv

    yield factory
    for srv in started:
        srv.stop()
