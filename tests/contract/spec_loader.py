"""Bundle the vendored Matrix client-server OpenAPI files into one OpenAPI document.

The spec ships one OpenAPI 3.1 file per API area (``tests/spec/matrix-spec/data/api/
client-server/*.yaml``), each with a server ``basePath`` (``/_matrix/client/v3``,
``/_matrix/client/v1``, ``/.well-known`` ...) and relative ``$ref``s into
``definitions/`` and ``../../event-schemas/``. :func:`bundle` turns them into a single
self-contained document:

* every path is made absolute by prefixing its file's ``basePath``;
* every ``$ref`` (file references, local ``#/components/...`` references and the
  ``$ref``-with-siblings convention the spec uses in examples) is inlined, so the
  result needs no resolver — schemathesis and ``jsonschema`` can use it directly;
* it holds only the operations Bastion implements, derived from the server's own route
  table (:func:`bastion.app.build_routes`), so it cannot drift from the server.

Operations are matched to routes by instantiating the spec's path template with a
dummy value per parameter and matching the result against each route's regex — the
same regex the server routes requests with.
"""

from __future__ import annotations

import copy
import functools
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

SPEC_ROOT = Path(__file__).resolve().parent.parent / "spec" / "matrix-spec" / "data"
CLIENT_SERVER = SPEC_ROOT / "api" / "client-server"

HTTP_METHODS = ("get", "put", "post", "delete", "patch", "head", "options")

# Two spec files define the same METHOD + path (the spec disambiguates them with a
# trailing space in the path key). Which one describes what Bastion serves:
PREFERRED_ON_COLLISION = {
    # Bastion invites by user ID only; 3PID invites are rejected with M_INVALID_PARAM.
    ("POST", "/_matrix/client/v3/rooms/{roomId}/invite"): "inviteUser",
    # /events (legacy) is not implemented; listed for completeness of the full table.
    ("GET", "/_matrix/client/v3/events"): "getEvents",
}

_PARAM = re.compile(r"\{([^}]+)\}")


class _SpecLoader(yaml.SafeLoader):
    """YAML 1.1 as JSON would read it: no timestamps, only true/false as booleans."""


_SpecLoader.yaml_implicit_resolvers = {
    key: [(tag, regexp) for tag, regexp in resolvers if tag not in ("tag:yaml.org,2002:timestamp", "tag:yaml.org,2002:bool")]
    for key, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_SpecLoader.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")
)


def _stringify_keys(node: Any) -> Any:
    if isinstance(node, dict):
        return {str(k): _stringify_keys(v) for k, v in node.items()}
    if isinstance(node, list):
        return [_stringify_keys(v) for v in node]
    return node


@functools.cache
def load_file(path: Path) -> Any:
    """One spec file (YAML or JSON), keys as strings. Cached; never mutate the result."""
    with open(path, encoding="utf-8") as fh:
        return _stringify_keys(yaml.load(fh, Loader=_SpecLoader))  # a SafeLoader subclass


def _pointer(document: Any, fragment: str) -> Any:
    node = document
    if not fragment or fragment == "/":
        return node
    for raw in fragment.lstrip("/").split("/"):
        part = raw.replace("~1", "/").replace("~0", "~")
        node = node[int(part)] if isinstance(node, list) else node[part]
    return node


class RefCycle(Exception):
    pass


def dereference(node: Any, base: Path, _stack: tuple[tuple[Path, str], ...] = ()) -> Any:
    """A deep copy of ``node`` (found in file ``base``) with every ``$ref`` inlined.

    ``{"$ref": X, **siblings}`` becomes the resolved X overlaid with the siblings —
    how the spec's own tooling reads it (examples extend a base event this way; in
    schemas the siblings are annotations such as ``description`` or a matching
    ``type``).
    """
    if isinstance(node, list):
        return [dereference(v, base, _stack) for v in node]
    if not isinstance(node, dict):
        return node
    ref = node.get("$ref")
    if isinstance(ref, str):
        file_part, _, fragment = ref.partition("#")
        target_file = (base.parent / file_part).resolve() if file_part else base
        key = (target_file, fragment)
        if key in _stack:
            raise RefCycle(" -> ".join(f"{p.name}#{f}" for p, f in (*_stack, key)))
        target = _pointer(load_file(target_file), fragment)
        resolved = dereference(target, target_file, (*_stack, key))
        siblings = {k: dereference(v, base, _stack) for k, v in node.items() if k != "$ref"}
        if siblings:
            if not isinstance(resolved, dict):
                raise ValueError(f"$ref {ref!r} in {base} has siblings but resolves to a non-object")
            resolved = {**resolved, **siblings}
        return resolved
    return {k: dereference(v, base, _stack) for k, v in node.items()}


# -- operations ------------------------------------------------------------------------------


@dataclass(frozen=True)
class SpecOperation:
    method: str  # upper case
    path: str  # absolute path template, e.g. /_matrix/client/v3/rooms/{roomId}/send/{eventType}/{txnId}
    spec_path: str  # the key in the spec file, e.g. /rooms/{roomId}/send/{eventType}/{txnId}
    file: Path
    operation_id: str

    @property
    def label(self) -> str:
        return f"{self.method} {self.path}"

    @property
    def raw(self) -> dict[str, Any]:
        """The operation object as written in its file (refs unresolved)."""
        return load_file(self.file)["paths"][self.spec_path][self.method.lower()]

    def sample_path(self, value: str = "x") -> str:
        return _PARAM.sub(value, self.path)


def _base_path(document: dict[str, Any]) -> str:
    servers = document.get("servers") or [{}]
    variables = servers[0].get("variables", {})
    base = variables.get("basePath", {}).get("default")
    if base is None:
        raise ValueError("spec file without a basePath server variable")
    return base.rstrip("/")


@functools.cache
def all_operations() -> tuple[SpecOperation, ...]:
    """Every operation of every client-server spec file."""
    out: list[SpecOperation] = []
    for file in sorted(CLIENT_SERVER.glob("*.yaml")):
        document = load_file(file)
        if not isinstance(document, dict) or "paths" not in document:
            continue
        base = _base_path(document)
        for spec_path, item in (document.get("paths") or {}).items():
            for method in HTTP_METHODS:
                op = item.get(method)
                if op is None:
                    continue
                out.append(SpecOperation(method.upper(), base + spec_path.strip(), spec_path, file, op["operationId"]))
    return tuple(out)


def _dedupe(operations: Iterable[SpecOperation]) -> list[SpecOperation]:
    by_key: dict[tuple[str, str], list[SpecOperation]] = {}
    for op in operations:
        by_key.setdefault((op.method, op.path), []).append(op)
    out = []
    for key, ops in by_key.items():
        if len(ops) == 1:
            out.append(ops[0])
            continue
        wanted = PREFERRED_ON_COLLISION.get(key)
        chosen = [op for op in ops if op.operation_id == wanted]
        if len(chosen) != 1:
            raise ValueError(f"spec defines {key} more than once: {[o.operation_id for o in ops]}; add a preference")
        out.append(chosen[0])
    return out


def _routes() -> list[Any]:
    from bastion.app import build_routes

    return build_routes().routes


def route_for(op: SpecOperation, routes: list[Any] | None = None) -> Any | None:
    """The Bastion route that serves ``op``, if any."""
    sample = op.sample_path()
    for route in routes if routes is not None else _routes():
        if route.method == op.method and route.regex.match(sample):
            return route
    return None


def implemented_operations(routes: list[Any] | None = None) -> list[SpecOperation]:
    """The spec operations Bastion has a route for, one per METHOD + path."""
    routes = routes if routes is not None else _routes()
    return _dedupe(op for op in all_operations() if route_for(op, routes) is not None)


def spec_operations_for_route(route: Any) -> list[SpecOperation]:
    """Spec operations (any file, duplicates included) a server route serves."""
    return [op for op in all_operations() if op.method == route.method and route.regex.match(op.sample_path())]


# -- the bundle ------------------------------------------------------------------------------


def _deref_operation(op: SpecOperation) -> dict[str, Any]:
    document = load_file(op.file)
    item = document["paths"][op.spec_path]
    resolved = dereference(item[op.method.lower()], op.file)
    # Path-item-level parameters apply to every operation of the path.
    shared = dereference(item.get("parameters", []), op.file)
    if shared:
        own = {(p["name"], p["in"]) for p in resolved.get("parameters", [])}
        resolved["parameters"] = [p for p in shared if (p["name"], p["in"]) not in own] + resolved.get("parameters", [])
    return resolved


@functools.cache
def _bundle_cached() -> dict[str, Any]:
    operations = implemented_operations()
    paths: dict[str, dict[str, Any]] = {}
    for op in sorted(operations, key=lambda o: (o.path, o.method)):
        paths.setdefault(op.path, {})[op.method.lower()] = _deref_operation(op)
    security = dereference(load_file(CLIENT_SERVER / "definitions" / "security.yaml"), CLIENT_SERVER / "definitions" / "security.yaml")
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "Matrix Client-Server API (operations implemented by Bastion)",
            "version": "1.0.0",
            "description": "Bundled from tests/spec/matrix-spec by tests/contract/spec_loader.py",
        },
        "paths": paths,
        "components": {"securitySchemes": security},
    }


def bundle() -> dict[str, Any]:
    """The bundled OpenAPI document (a fresh deep copy; callers may mutate it)."""
    return copy.deepcopy(_bundle_cached())


def operation_by_id(operation_id: str) -> SpecOperation:
    for op in implemented_operations():
        if op.operation_id == operation_id:
            return op
    raise KeyError(f"{operation_id} is not an operation Bastion implements (or not in the spec)")


def response_definition(operation_id: str, status: int | str) -> dict[str, Any] | None:
    """The resolved response object of ``operation_id`` for ``status`` (a fresh copy), or None."""
    op = operation_by_id(operation_id)
    responses = _bundle_cached()["paths"][op.path][op.method.lower()].get("responses", {})
    response = responses.get(str(status))
    return copy.deepcopy(response) if response is not None else None


def response_schema(operation_id: str, status: int | str) -> dict[str, Any] | None:
    """The JSON schema of ``operation_id``'s ``status`` response body (resolved), or None."""
    response = response_definition(operation_id, status)
    if response is None:
        return None
    content = response.get("content", {})
    media = content.get("application/json")
    if media is None or "schema" not in media:
        return None
    return copy.deepcopy(media["schema"])


def operation_definition(operation_id: str) -> dict[str, Any]:
    """The bundled (fully resolved) operation object; a fresh copy."""
    op = operation_by_id(operation_id)
    return copy.deepcopy(_bundle_cached()["paths"][op.path][op.method.lower()])


def request_example(operation_id: str) -> Any:
    """The spec's example JSON request body for ``operation_id``, or None."""
    body = operation_definition(operation_id).get("requestBody")
    if body is None:
        return None
    media = body.get("content", {}).get("application/json", {})
    if "example" in media:
        return media["example"]
    for example in (media.get("examples") or {}).values():
        if "value" in example:
            return example["value"]
    return media.get("schema", {}).get("example")


@functools.cache
def _error_schema() -> dict[str, Any]:
    path = CLIENT_SERVER / "definitions" / "errors" / "error.yaml"
    return dereference(load_file(path), path)


@functools.cache
def _auth_response_schema() -> dict[str, Any]:
    path = CLIENT_SERVER / "definitions" / "auth_response.yaml"
    return dereference(load_file(path), path)


def auth_response_schema() -> dict[str, Any]:
    """The user-interactive authentication 401 body (flows, params, session, completed)."""
    return copy.deepcopy(_auth_response_schema())


def error_schema() -> dict[str, Any]:
    """The standard Matrix error body schema (``errcode`` required, ``error`` string)."""
    return copy.deepcopy(_error_schema())
