"""The bundled spec document: complete for Bastion's routes, self-contained, loadable."""

from __future__ import annotations

import json
import re
from typing import Any

import pytest
import schemathesis

from bastion.app import build_routes
from tests.contract import spec_loader

# Routes Bastion serves that the client-server spec does not define, and why.
NOT_IN_SPEC = {
    ("GET", "/health"): "liveness probe for operators and the test harness",
    ("GET", "/ready"): "readiness probe for load balancers (database reachable)",
    ("GET", "/_matrix/client/v3/pushrules"): "the spec only has /pushrules/ (trailing slash); clients use both",
}
NOT_IN_SPEC_PREFIXES = {
    "/_synapse/admin/": "Synapse-compatible admin API (shared-secret registration, media administration)",
}


def _explained(route: Any) -> bool:
    if any(method == route.method and route.regex.match(path) for method, path in NOT_IN_SPEC):
        return True
    return any(route.regex.pattern.startswith("^" + re.escape(prefix)) for prefix in NOT_IN_SPEC_PREFIXES)


def _route_label(route: Any) -> str:
    return f"{route.method} {route.regex.pattern}"


def test_every_route_in_the_spec_is_in_the_bundle() -> None:
    bundle = spec_loader.bundle()
    unexplained = []
    for route in build_routes().routes:
        candidates = spec_loader.spec_operations_for_route(route)
        if not candidates:
            if not _explained(route):
                unexplained.append(_route_label(route))
            continue
        paths = {op.path for op in candidates}
        assert len(paths) == 1, f"{_route_label(route)} matches several spec paths: {paths}"
        path = paths.pop()
        bundled = bundle["paths"].get(path, {}).get(route.method.lower())
        assert bundled is not None, f"{_route_label(route)} serves {route.method} {path}, which the bundle lacks"
        assert bundled["operationId"] in {op.operation_id for op in candidates}
    assert not unexplained, f"routes neither in the spec nor in NOT_IN_SPEC: {unexplained}"


def test_not_in_spec_list_is_current() -> None:
    routes = build_routes().routes
    for (method, path), reason in NOT_IN_SPEC.items():
        assert any(r.method == method and r.regex.match(path) for r in routes), f"stale NOT_IN_SPEC entry {method} {path} ({reason})"
        assert not [
            op for op in spec_loader.all_operations() if op.method == method and op.sample_path() == path
        ], f"{method} {path} is in the spec now; drop it from NOT_IN_SPEC"


def test_bundle_holds_exactly_the_implemented_operations() -> None:
    bundle = spec_loader.bundle()
    bundled = {(method.upper(), path) for path, item in bundle["paths"].items() for method in item}
    implemented = {(op.method, op.path) for op in spec_loader.implemented_operations()}
    assert bundled == implemented
    ids = [op["operationId"] for item in bundle["paths"].values() for op in item.values()]
    assert len(ids) == len(set(ids))


def test_bundle_is_self_contained_with_absolute_paths() -> None:
    bundle = spec_loader.bundle()
    text = json.dumps(bundle)
    assert '"$ref"' not in text
    for path in bundle["paths"]:
        assert path.startswith(("/_matrix/client/", "/_matrix/media/", "/.well-known/")), path
        assert path == path.strip()
    # The v3 paths are the ones Bastion also serves as r0.
    assert "/_matrix/client/v3/rooms/{roomId}/send/{eventType}/{txnId}" in bundle["paths"]
    assert "/_matrix/client/v1/register/m.login.registration_token/validity" in bundle["paths"]
    assert "/_matrix/client/versions" in bundle["paths"]


def test_collision_preferences_name_real_operations() -> None:
    ids = {op.operation_id for op in spec_loader.all_operations()}
    for key, operation_id in spec_loader.PREFERRED_ON_COLLISION.items():
        assert operation_id in ids, key
        assert len([op for op in spec_loader.all_operations() if (op.method, op.path) == key]) > 1, f"{key} no longer collides"


@pytest.mark.parametrize("operation_id", ["sendMessage", "sync", "getEventContext", "register"])
def test_response_schemas_resolve(operation_id: str) -> None:
    schema = spec_loader.response_schema(operation_id, 200)
    assert schema is not None and "$ref" not in json.dumps(schema)


def test_schemathesis_loads_the_bundle() -> None:
    schema = schemathesis.openapi.from_dict(spec_loader.bundle())
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) == len(spec_loader.implemented_operations())
