"""Validate response bodies against the bundled spec with ``jsonschema`` (Draft 2020-12).

Matrix's custom string formats (``mx-user-id``, ``mx-room-id`` ...) are checked with
the grammars of the spec's appendices, loosely enough to accept historical user IDs.
"""

from __future__ import annotations

import re
from typing import Any

import httpx
from jsonschema import Draft202012Validator, FormatChecker
from jsonschema.exceptions import best_match

from tests.contract import spec_loader

_SERVER_NAME = r"(?:\[[0-9A-Fa-f:.]{2,45}\]|[0-9A-Za-z.-]{1,255})(?::[0-9]{1,5})?"
_PATTERNS = {
    # Historical user IDs may contain any printable ASCII except ':' in the localpart.
    "mx-user-id": re.compile(rf"^@[\x21-\x39\x3b-\x7e]+:{_SERVER_NAME}$"),
    "mx-room-id": re.compile(r"^![\x21-\x7e]+(?::" + _SERVER_NAME + r")?$"),
    "mx-event-id": re.compile(r"^\$[\x21-\x7e]+$"),
    "mx-room-alias": re.compile(rf"^#[^:]+:{_SERVER_NAME}$"),
    "mx-server-name": re.compile(rf"^{_SERVER_NAME}$"),
    "mx-mxc-uri": re.compile(r"^mxc://[^/]+/[A-Za-z0-9_-]+$"),
}

FORMAT_CHECKER = FormatChecker()


def _register(name: str, pattern: re.Pattern[str]) -> None:
    @FORMAT_CHECKER.checks(name)
    def check(value: object) -> bool:
        if not isinstance(value, str):
            return True
        return bool(pattern.match(value)) and len(value.encode()) <= 255


for _name, _pattern in _PATTERNS.items():
    _register(_name, _pattern)


@FORMAT_CHECKER.checks("int64")
def _int64(value: object) -> bool:
    if not isinstance(value, int) or isinstance(value, bool):
        return True
    return -(2**63) <= value < 2**63


class SchemaViolation(AssertionError):
    pass


def violations(schema: dict[str, Any], instance: Any) -> list[str]:
    validator = Draft202012Validator(schema, format_checker=FORMAT_CHECKER)
    errors = sorted(validator.iter_errors(instance), key=lambda e: list(e.absolute_path))
    out = []
    for error in errors:
        # For oneOf/anyOf, show the most relevant sub-error too.
        detail = ""
        if error.context:
            inner = best_match(error.context)
            detail = f" (closest: at {inner.json_path}: {inner.message[:300]})"
        out.append(f"at {error.json_path}: {error.message[:500]}{detail}")
    return out


def _describe(response: httpx.Response) -> str:
    req = response.request
    return f"{req.method} {req.url.raw_path.decode()} -> {response.status_code} {response.text[:1500]}"


def _header_violations(definition: dict[str, Any], response: httpx.Response) -> list[str]:
    """Headers the spec's response object requires, and their enumerated values."""
    problems = []
    for name, header in definition.get("headers", {}).items():
        value = response.headers.get(name)
        if value is None:
            if header.get("required"):
                problems.append(f"[headers] required header {name!r} is missing")
            continue
        allowed = header.get("schema", {}).get("enum")
        if allowed and value.split(";")[0].strip().lower() not in allowed:
            problems.append(f"[headers] {name}: {value!r} is not one of {allowed}")
    return problems


def _is_user_interactive_auth(schema: dict[str, Any] | None) -> bool:
    return schema is not None and "flows" in schema.get("properties", {})


def check_response(
    operation_id: str, response: httpx.Response, expected_status: int | None = 200, *, one_of: int | None = None
) -> Any:
    """Assert ``response`` is ``expected_status`` and its body matches the spec; return the body.

    2xx bodies are validated against the operation's schema for that status; 4xx/5xx
    bodies against the operation's own schema for that status if it has one, and
    against the standard Matrix error schema (``errcode`` and ``error`` strings) — except
    user-interactive-auth 401s, whose body is the UIA response (with ``errcode``/``error``
    only when a stage failed).

    ``one_of`` selects one branch of a top-level ``oneOf`` response schema, for
    responses whose variant the request determines (see ``SPEC_DEFECTS``).
    """
    status = response.status_code
    if expected_status is not None and status != expected_status:
        raise SchemaViolation(f"{operation_id}: expected HTTP {expected_status}, got {_describe(response)}")
    definition = spec_loader.response_definition(operation_id, status) or {}
    header_problems = _header_violations(definition, response)
    declared = definition.get("content", {})
    if status < 300 and declared and "application/json" not in declared:
        # A download or thumbnail: the body is the file; the spec constrains the headers.
        if header_problems:
            raise SchemaViolation(
                f"{operation_id} ({spec_loader.operation_by_id(operation_id).label}): response headers violate the spec:\n  "
                + "\n  ".join(header_problems)
                + f"\nresponse: {response.request.method} {response.request.url.raw_path.decode()} -> {status} {dict(response.headers)}"
            )
        return response.content
    try:
        body = response.json()
    except ValueError:
        raise SchemaViolation(f"{operation_id}: body is not JSON: {_describe(response)}") from None
    problems: list[str] = list(header_problems)
    schema = spec_loader.response_schema(operation_id, status)
    if one_of is not None and schema is not None:
        schema = schema["oneOf"][one_of]
    if status == 401 and schema is None and isinstance(body, dict) and "flows" in body:
        # User-interactive auth on an operation whose spec entry omits the 401 (SPEC_DEFECTS).
        schema = spec_loader.auth_response_schema()
    if status < 300:
        if schema is None:
            op = spec_loader.operation_by_id(operation_id)
            raise SchemaViolation(f"{operation_id}: the spec defines no JSON response for {status} ({op.label})")
        problems += [f"[{status} response schema] {p}" for p in violations(schema, body)]
    else:
        if schema is not None:
            problems += [f"[{status} response schema] {p}" for p in violations(schema, body)]
        # A UIA 401 carries errcode/error only when a stage failed.
        failed_stage = isinstance(body, dict) and ("errcode" in body or "error" in body)
        if not _is_user_interactive_auth(schema) or failed_stage:
            problems += [f"[standard error schema] {p}" for p in violations(standard_error_schema(), body)]
    if problems:
        raise SchemaViolation(
            f"{operation_id} ({spec_loader.operation_by_id(operation_id).label}): response violates the spec:\n  "
            + "\n  ".join(problems)
            + f"\nresponse: {_describe(response)}"
        )
    return body


def standard_error_schema() -> dict[str, Any]:
    """error.yaml, with ``error`` required as well: every Bastion error carries a message."""
    schema = spec_loader.error_schema()
    schema["required"] = sorted({*schema.get("required", []), "errcode", "error"})
    return schema


# Places where the spec's schema cannot be used as written.
SPEC_DEFECTS = {
    "uploadCrossSigningKeys": (
        "uses user-interactive authentication (its description says so) but lists no 401 response; "
        "a 401 with `flows` is validated against definitions/auth_response.yaml"
    ),
    "getRoomStateWithKey": (
        "200 is `oneOf: [{type: object}, StateEvent]`; every state event is also an object, so a "
        "`?format=event` response matches both branches and fails `oneOf`. Tests validate the branch "
        "the request selects (one_of=0 for content, one_of=1 for format=event)."
    ),
}
