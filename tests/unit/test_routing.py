"""The combined-regex route matcher picks the same route, with the same parameters, as
trying each route's own pattern in order would."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any
from urllib.parse import parse_qs, unquote

import pytest
from hypothesis import given
from hypothesis import strategies as st

from bastion.api.http import RouteTable, parse_query
from bastion.app import build_routes
from bastion.errors import InvalidParam
from tests.contract import spec_loader


def first_match(table: RouteTable, method: str, path: str) -> tuple[Any, dict[str, str], bool]:
    known = False
    for route in table.routes:
        m = route.regex.match(path)
        if m is None:
            continue
        if route.method != method:
            known = True
            continue
        params = {n: unquote(raw) if raw is not None else "" for n, raw in zip(route.names, m.groups(), strict=True)}
        return route, params, True
    return None, {}, known


def test_every_spec_path_and_method_matches_as_the_ordered_loop_does() -> None:
    table = build_routes()
    methods = sorted({r.method for r in table.routes} | {"PATCH"})
    paths = {op.sample_path() for op in spec_loader.all_operations()}
    paths |= {
        "/_matrix/client/r0/sync",
        "/_matrix/client/v3/rooms/%21a%3Aexample.org/state/m.room.name",
        "/_matrix/client/v3/rooms/%21a%3Aexample.org/state/m.room.name/",
        "/_matrix/client/v3/rooms/%21a%3Aexample.org/state/m.room.member/%40u%3Aexample.org",
        "/_matrix/client/v3/nope",
        "/",
    }
    matched = 0
    for path in sorted(paths):
        for method in methods:
            got = table.match(method, path)
            want = first_match(table, method, path)
            assert got[0] is want[0], (method, path)
            assert got[1:] == want[1:], (method, path)
            matched += got[0] is not None
    assert matched > 100  # the comparison covered the real routes, not only misses


def test_route_order_decides_between_overlapping_templates() -> None:
    table = RouteTable()

    async def a(req: Any) -> Any: ...
    async def b(req: Any) -> Any: ...

    table.add("GET", "/x/{name}", a)
    table.add("GET", "/x/special", b)
    table.add("PUT", "/x/special", b)
    route, params, _ = table.match("GET", "/x/special")
    assert route is not None and route.handler is a and params == {"name": "special"}
    route, _, _ = table.match("PUT", "/x/special")
    assert route is not None and route.handler is b
    assert table.match("DELETE", "/x/special") == (None, {}, True)  # 405, not 404
    assert table.match("GET", "/y") == (None, {}, False)
    table.add("GET", "/y", b)  # adding a route after matching is seen
    assert table.match("GET", "/y")[0] is not None


def test_a_nul_in_a_path_parameter_is_refused() -> None:
    table = build_routes()
    with pytest.raises(InvalidParam):
        table.match("GET", "/_matrix/client/v3/rooms/%00/state")


@given(st.lists(st.sampled_from(["since", "timeout", "filter", "a", "", "=", "&", "s12_3", "%2F", "+", "%zz", "é", "1"]),
                max_size=12))
def test_query_parsing_agrees_with_parse_qs(parts: list[str]) -> None:
    raw = "".join(parts).encode()
    try:
        expected: Any = parse_qs(raw.decode(), keep_blank_values=True, errors="strict")
    except (UnicodeDecodeError, ValueError) as exc:
        expected = type(exc)
    try:
        got: Any = parse_query(raw)
    except (UnicodeDecodeError, ValueError) as exc:
        got = type(exc)
    assert got == expected



def test_routes_are_compiled_at_start_up_not_in_the_first_request(monkeypatch: pytest.MonkeyPatch) -> None:
    """Compiling ~130 routes into one expression per method takes ~10 ms: the first request
    after a start (often a client's initial /sync) must not pay it."""
    from bastion.api import http

    class Started:
        async def close(self) -> None: ...

    async def factory() -> Started:
        return Started()

    settings = SimpleNamespace(
        trusted_proxies=[], admin_api=SimpleNamespace(allowed_networks=[]), logging=SimpleNamespace(access_log=False)
    )
    table = build_routes()
    app = http.MatrixApp(table, factory, settings)
    inbox = [{"type": "lifespan.startup"}, {"type": "lifespan.shutdown"}]
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return inbox.pop(0)

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    asyncio.run(app({"type": "lifespan", "asgi": {"version": "3.0"}}, receive, send))
    assert [m["type"] for m in sent] == ["lifespan.startup.complete", "lifespan.shutdown.complete"]

    def no_compiling(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("a regular expression was compiled while serving a request")

    monkeypatch.setattr(http.re, "compile", no_compiling)
    route, params, _ = table.match("GET", "/_matrix/client/v3/rooms/%21a%3Aexample.org/state/m.room.name")
    assert route is not None and route.template.endswith("/state/{eventType}/{stateKey?}")
    assert params["roomId"] == "!a:example.org" and params["eventType"] == "m.room.name"
