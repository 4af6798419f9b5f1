"""Server bugs the contract and fuzz tests have found and that are not fixed yet.

Each open bug has a regression test marked with :func:`xfail` (``strict``: once the
server is fixed the test passes, the run fails, and the entry must be removed here —
the test then stays as an ordinary regression test). The fuzz tests tolerate a 5xx
only when the request matches an open bug's ``matches`` predicate, so the rest of that
operation keeps being fuzzed.

Set ``BASTION_CONTRACT_STRICT=1`` to ignore this list: the regression tests then fail
outright and the fuzzers report every 5xx.

Found and since fixed (their tests are ordinary regression tests now):

* BUG-1 ``POST /createRoom`` with a non-string ``preset`` -> 500 (fixed in da92548)
* BUG-2 ``joined_members`` returned ``null`` display_name/avatar_url (fixed in da92548)
* BUG-3 PostgreSQL: U+0000 in IDs, keys, names -> 500 (fixed in 9b49a0e)
* BUG-4 JSON nested 255-1024 levels deep -> 500 when re-serialised (fixed in da92548)
* BUG-5 ``PUT /profile/{userId}/m.tz`` rejected (fixed in da92548)
* BUG-6 token validity answered 403 with open, token-less registration (fixed in da92548)
* BUG-7 PostgreSQL: U+0000 in a message body or room name/topic -> 500 from the search
  index (found after 3d3d5fe; fixed in the working tree after b3d8b42)
* BUG-8 re-uploading identical cross-signing keys demanded user-interactive auth (fixed in
  the working tree after b3d8b42: ``cross_signing_upload_needs_auth``)
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest

STRICT = os.environ.get("BASTION_CONTRACT_STRICT", "") not in ("", "0")


@dataclass(frozen=True)
class FuzzRequest:
    """What a 5xx predicate sees: decoded path parameters, query, body, and the database."""

    operation_id: str
    path: dict[str, Any]
    query: dict[str, Any]
    body: Any
    database: str  # "sqlite" or "postgresql"


@dataclass(frozen=True)
class KnownBug:
    id: str
    operation_id: str  # "*": any operation
    summary: str
    # For 5xx bugs: does a request that got a 5xx match this bug?
    matches: Callable[[FuzzRequest], bool] | None = None
    # Databases the bug shows on.
    databases: tuple[str, ...] = ("sqlite", "postgresql")


BUGS: dict[str, KnownBug] = {
    bug.id: bug
    for bug in [
        # None open. Add entries like:
        # KnownBug("BUG-9", "createRoom", "what is wrong, with the request that shows it",
        #          matches=lambda request: ..., databases=("postgresql",)),
    ]
}


def xfail(bug_id: str, database: str | None = None) -> pytest.MarkDecorator:
    """Mark a regression test for an open bug (no-op under BASTION_CONTRACT_STRICT=1).

    ``database``: the database the test runs on, for bugs that show on one only
    (``None``: read ``BASTION_TEST_DATABASE`` as the test fixtures do).
    """
    bug = BUGS[bug_id]
    if database is None:
        database = "postgresql" if os.environ.get("BASTION_TEST_DATABASE", "").startswith("postgres") else "sqlite"
    applies = database in bug.databases and not STRICT
    return pytest.mark.xfail(applies, strict=True, reason=f"{bug.id} (server bug): {bug.summary}")


def tolerated(request: FuzzRequest) -> KnownBug | None:
    """The open bug a request that got a 5xx hits, if any (never under STRICT)."""
    if STRICT:
        return None
    for bug in BUGS.values():
        if bug.operation_id not in ("*", request.operation_id) or bug.matches is None:
            continue
        if request.database in bug.databases and bug.matches(request):
            return bug
    return None
