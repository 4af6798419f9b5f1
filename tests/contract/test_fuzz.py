"""Fuzz every implemented spec operation: no request, however malformed, may get a 5xx.

Two tests, both against a dedicated Bastion server (so fuzzing never disturbs the
shared one), both parametrised by operation so a failure names it:

``test_no_server_errors``
    The bundled OpenAPI document (:mod:`tests.contract.spec_loader`) drives
    schemathesis's pytest integration: for each operation its phases run — the spec's
    own examples, the deterministic *coverage* phase (boundary values, wrong types,
    missing fields, unexpected methods and content types), then Hypothesis fuzzing of
    valid and invalid data — asserting only ``not_a_server_error``.

``test_hostile_values_never_cause_server_errors``
    A deterministic sweep of the values Hypothesis rarely produces: U+0000 in every
    path/query parameter and string field, every top-level field replaced by each JSON
    type, bodies nested 300 levels deep.

To reach past the first ``403``/``404``, each operation gets fresh real objects — a
public room the fuzzing user created with an alias, a joined member, a user outside
the room, a banned user, an event, a filter, account data, a push rule, sync and
pagination tokens — and their IDs are mixed into the requests: by the ``flatmap_*``
hooks while Hypothesis fuzzes, and deterministically in the test for the examples and
coverage phases (every parameter or body field the scenario is not probing gets a real
value). Operations the spec secures get a valid access token, the others none (except
``TOKEN_BY_DESIGN``). Operations that end a session or an account
(``SESSION_ENDING``) get a throwaway token per request.

Runtime is bounded and reproducible: ``FUZZ_MAX_EXAMPLES`` examples per operation in
the fuzzing phase (override with ``BASTION_FUZZ_MAX_EXAMPLES``), a fixed seed, no
example database. A 5xx fails the test with the request as a ``curl`` command and the
server's traceback (``(ref ...)`` looked up in its log). 5xx answers matching an open
bug in :mod:`tests.contract.known_bugs` are tolerated and counted; run with
``pytest -s`` to see per-operation status counts.
"""

from __future__ import annotations

import copy
import json
import os
import re
import shlex
import uuid
import zlib
from collections import Counter, defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote, unquote

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from schemathesis.checks import not_a_server_error
from schemathesis.core.parameters import ParameterLocation
from schemathesis.generation.meta import TestPhase

from tests.contract import known_bugs, spec_loader
from tests.harness import MatrixHttp, ServerProcess, TestDatabase, start_server

pytestmark = [pytest.mark.fuzz, pytest.mark.integration]

FUZZ_MAX_EXAMPLES = int(os.environ.get("BASTION_FUZZ_MAX_EXAMPLES", "50"))
FUZZ_SEED = 20240601

BUNDLE = spec_loader.bundle()
schema = schemathesis.openapi.from_dict(BUNDLE)
schema.config.seed = FUZZ_SEED
schema.config.generation.update(max_examples=FUZZ_MAX_EXAMPLES, deterministic=True, database="none")
schema.config.update(request_timeout=30)

# Operations that end the session (or the account) of the token they are called with:
# each request gets a token of its own, never the fuzzing user's.
SESSION_ENDING = {"logout", "logout_all", "deactivateAccount"}


def _operation_id(case: schemathesis.Case) -> str:
    return case.operation.definition.raw["operationId"]


# The spec defines these without security; Bastion deliberately requires a token
# (docs/architecture.md, "Profiles are readable by signed-in users only"). Fuzz them
# signed in, or every request stops at the 401.
# Likewise GET /publicRooms unless room_directory.public_without_auth is set.
TOKEN_BY_DESIGN = {"getUserProfile", "getProfileField", "getPublicRooms"}


def _sends_token(definition: dict[str, Any]) -> bool:
    """Whether to authenticate: the spec secures the operation (required or optional token)."""
    if definition.get("operationId") in TOKEN_BY_DESIGN:
        return True
    return any("accessTokenBearer" in requirement for requirement in definition.get("security") or [])


def _database(env: FuzzEnv) -> str:
    return "postgresql" if env.server.database_url.startswith("postgres") else "sqlite"


# -- real objects mixed into generated requests ------------------------------------------------

# name -> real values (raw, not percent-encoded); filled per operation by `fuzz_targets`.
PATH_TARGETS: dict[str, list[str]] = {}
QUERY_TARGETS: dict[str, list[str]] = {}
BODY_TARGETS: dict[str, list[str]] = {}


def _mix(values: dict[str, Any] | None, targets: dict[str, list[str]], *, add_missing: bool = False) -> Any:
    """A strategy picking each value from {generated, real...}; optionally adding absent targets."""
    if values is None and not add_missing:
        return st.just(values)
    values = values or {}
    parts = {}
    for name, value in values.items():
        reals = targets.get(name, [])
        parts[name] = st.sampled_from([value, *reals]) if reals else st.just(value)
    optional = {name: st.sampled_from(reals) for name, reals in targets.items() if add_missing and name not in values}
    return st.fixed_dictionaries(parts, optional=optional)


@schema.hook
def flatmap_path_parameters(context: Any, path_parameters: dict[str, Any] | None) -> Any:
    """While fuzzing, let Hypothesis pick each path parameter from {generated, real...}."""
    if not path_parameters:
        return st.just(path_parameters)
    return _mix(path_parameters, PATH_TARGETS)


@schema.hook
def flatmap_query(context: Any, query: dict[str, Any] | None) -> Any:
    """While fuzzing, mix real sync/pagination tokens and filters into the operation's query."""
    declared = {p.name for p in context.operation.query}
    targets = {name: reals for name, reals in QUERY_TARGETS.items() if name in declared}
    if not targets:
        return st.just(query)
    return _mix(query, targets, add_missing=True)


@schema.hook
def flatmap_body(context: Any, body: Any) -> Any:
    """While fuzzing, let Hypothesis pick known body fields (user_id, room_id) from {generated, real...}."""
    if not isinstance(body, dict):
        return st.just(body)
    return _mix(body, BODY_TARGETS)


def _pick(values: list[str], case: schemathesis.Case) -> str:
    """A deterministic choice among ``values`` for this case."""
    key = repr((case.operation.label, case.path_parameters, case.query, case.body)).encode()
    return values[zlib.crc32(key) % len(values)]


def _use_real_objects(case: schemathesis.Case) -> None:
    """Examples and coverage phases: put real IDs wherever the scenario is not probing.

    Their cases are built when the test is collected, before any server exists, so the
    substitution happens here rather than in a hook.
    """
    meta = case.meta
    if meta is None or meta.phase.name not in (TestPhase.EXAMPLES, TestPhase.COVERAGE):
        return
    data = meta.phase.data
    location = getattr(data, "parameter_location", None)
    probed = getattr(data, "parameter", None)
    if case.path_parameters:
        for name in list(case.path_parameters):
            reals = PATH_TARGETS.get(name)
            if reals and not (location == ParameterLocation.PATH and probed == name):
                case.path_parameters[name] = quote(_pick(reals, case), safe="")
    if isinstance(case.query, dict) and location != ParameterLocation.QUERY:
        for name in list(case.query):
            if QUERY_TARGETS.get(name):
                case.query[name] = _pick(QUERY_TARGETS[name], case)
    if isinstance(case.body, dict):
        for name, value in list(case.body.items()):
            reals = BODY_TARGETS.get(name)
            # Replace well-formed sample IDs only; keep the malformed values a scenario probes with.
            if reals and isinstance(value, str) and isinstance(reals[0], str) and value[:1] == reals[0][:1] and len(value) > 1:
                case.body[name] = _pick(reals, case)


def _no_long_polls(case: schemathesis.Case) -> None:
    """A real ``since`` token makes /sync wait up to ``timeout`` ms for news: cap it at 100."""
    query = case.query
    if not isinstance(query, dict) or query.get("since") not in QUERY_TARGETS.get("since", []):
        return
    try:
        if int(query.get("timeout", 0)) > 100:
            query["timeout"] = 100
    except (TypeError, ValueError):
        pass


@dataclass
class FuzzEnv:
    server: ServerProcess
    user: MatrixHttp  # the fuzzing user: its token goes on every secured request
    member: MatrixHttp  # a second member of each target room
    outsider: MatrixHttp  # never in the target rooms: an invite target
    banned: MatrixHttp  # banned from each target room: an unban target
    session_user: MatrixHttp  # logs in afresh for each /logout and /logout/all request
    spare_device: str  # a second device of the fuzzing user (not the one its token belongs to)
    # operation label -> status code -> count; printed at the end (pytest -s) to judge depth
    statuses: dict[str, Counter[int]] = field(default_factory=lambda: defaultdict(Counter))
    tolerated: Counter[str] = field(default_factory=Counter)
    seconds: Counter[str] = field(default_factory=Counter)  # server time per operation label


@pytest.fixture(scope="module")
def fuzz_env(tmp_path_factory: pytest.TempPathFactory, test_database: TestDatabase) -> Iterator[FuzzEnv]:
    # Uploads are rate-limited (60/min by default): lift that so fuzzing reaches past the 429.
    srv = start_server(tmp_path_factory.mktemp("fuzz"), test_database, media={"uploads_per_minute": 100_000})
    try:
        env = FuzzEnv(
            srv,
            user=srv.client().register("fuzzer"),
            member=srv.client().register("fuzzmember"),
            outsider=srv.client().register("fuzzoutsider"),
            banned=srv.client().register("fuzzbanned"),
            session_user=srv.client().register("fuzzsessions"),
            spare_device="",
        )
        env.spare_device = _login(env.user)["device_id"]
        yield env
        total = sum(sum(c.values()) for c in env.statuses.values())
        print(f"\nfuzz: {total} requests; 5xx tolerated as known bugs: {dict(env.tolerated)}")
        slowest = ", ".join(f"{label} {secs:.1f}s" for label, secs in env.seconds.most_common(5))
        print(f"  slowest (server time): {slowest}")
        for label, counts in sorted(env.statuses.items()):
            print(f"  {label}: {dict(sorted(counts.items()))}")
    finally:
        srv.stop()


@pytest.fixture
def fuzz_targets(fuzz_env: FuzzEnv) -> Iterator[FuzzEnv]:
    """Fresh real objects for one operation, so what one operation's fuzzing breaks stays there."""
    env = fuzz_env
    user = env.user
    v3 = "/_matrix/client/v3"
    alias_local = "fz" + uuid.uuid4().hex[:10]
    alias = f"#{alias_local}:{user.server_name}"
    room = user.create_room(preset="public_chat", name="fuzz", topic="fuzzing", room_alias_name=alias_local)
    env.member.join(room)
    env.banned.join(room)
    user.call("POST", f"{v3}/rooms/{room}/ban", {"user_id": env.banned.user_id, "reason": "fuzz"})
    event = user.send(room, "fuzz target")
    filter_id = user.call("POST", f"{v3}/user/{user.user_id}/filter", {"room": {"timeline": {"limit": 5}}})["filter_id"]
    user.call("PUT", f"{v3}/user/{user.user_id}/account_data/org.example.fuzz", {"fuzz": True})
    user.call("PUT", f"{v3}/user/{user.user_id}/rooms/{room}/account_data/org.example.fuzz", {"fuzz": True})
    user.call("PUT", f"{v3}/pushrules/global/override/org.example.fuzz", {"actions": ["notify"], "conditions": []})
    upload = user.raw("POST", "/_matrix/media/v3/upload", content=_TINY_PNG, headers={"Content-Type": "image/png"})
    media_server, _, media_id = upload.json()["content_uri"][len("mxc://"):].partition("/")
    backup = user.call(
        "POST", f"{v3}/room_keys/version",
        {"algorithm": "m.megolm_backup.v1.curve25519-aes-sha2", "auth_data": {"public_key": "8vo8F6x2QJbUgsCXOj8fXBxUsGeRD5G2nzyWc8hJh2U"}},
    )["version"]
    session = {"first_message_index": 0, "forwarded_count": 0, "is_verified": False, "session_data": {"ephemeral": "e", "ciphertext": "c", "mac": "m"}}
    user.call("PUT", f"{v3}/room_keys/keys/{room}/FUZZSESSION", session, params={"version": backup})
    PATH_TARGETS.clear()
    PATH_TARGETS.update(
        roomId=[room],
        roomIdOrAlias=[room, alias],
        roomAlias=[alias],
        eventId=[event],
        userId=[user.user_id],
        filterId=[filter_id],
        type=["org.example.fuzz"],
        eventType=["m.room.topic", "m.room.message"],
        stateKey=[""],
        keyName=["displayname", "avatar_url"],
        deviceId=[env.spare_device],
        receiptType=["m.read", "m.read.private"],
        relType=["m.thread", "m.annotation", "m.replace"],
        tag=["u.work", "m.favourite"],
        kind=["override", "content", "underride"],
        ruleId=["org.example.fuzz", ".m.rule.master"],
        serverName=[media_server],
        mediaId=[media_id],
        fileName=["fuzz.png"],
        version=[backup],
        sessionId=["FUZZSESSION"],
    )
    synced = user.sync()
    page = user.call("GET", f"{v3}/rooms/{room}/messages", params={"dir": "b", "limit": 2})
    QUERY_TARGETS.clear()
    QUERY_TARGETS.update(
        since=[synced["next_batch"]],
        at=[synced["next_batch"]],
        **{"from": [page["start"], page["end"]]},
        to=[page["start"]],
        filter=[
            filter_id,
            json.dumps({"room": {"timeline": {"limit": 3, "types": ["m.room.*"]}, "state": {"lazy_load_members": True}}}),
            json.dumps({"types": ["m.room.message"], "lazy_load_members": True, "limit": 5}),
        ],
        dir=["b", "f"],
        version=[backup],
        width=["32"],
        height=["32"],
    )
    BODY_TARGETS.clear()
    BODY_TARGETS.update(
        user_id=[env.member.user_id, env.outsider.user_id, env.banned.user_id],
        room_id=[room],
        # POST /login (and /register's password): real credentials of the fuzzing user.
        identifier=[{"type": "m.id.user", "user": user.user_id}],
        password=[user.password],
    )
    yield env
    PATH_TARGETS.clear()
    QUERY_TARGETS.clear()
    BODY_TARGETS.clear()


def _login(client: MatrixHttp) -> dict[str, Any]:
    return client.call(
        "POST",
        "/_matrix/client/v3/login",
        {"type": "m.login.password", "identifier": {"type": "m.id.user", "user": client.user_id}, "password": client.password},
        token=False,
    )


def _fresh_token(client: MatrixHttp) -> str:
    return _login(client)["access_token"]


def _throwaway_token(env: FuzzEnv, operation_id: str) -> str:
    """A token whose loss does not matter: a new account for deactivation, else a new login."""
    if operation_id == "deactivateAccount":
        return env.server.client().register().token or ""
    return _fresh_token(env.session_user)


_REF = re.compile(r"\(ref ([0-9a-f]+)\)")


def _server_traceback(server: ServerProcess, body: str) -> str:
    """The server log's traceback for a 500's ``(ref ...)``."""
    match = _REF.search(body)
    if match is None:
        return "(no error reference in the response)"
    try:
        log = server.log_path.read_text(errors="replace")
    except OSError:
        return "(server log unreadable)"
    start = log.find(f"(ref {match.group(1)})")
    if start < 0:
        return "(reference not in the server log)"
    start = log.rfind("\n", 0, start) + 1
    lines = log[start:].splitlines()
    out = [lines[0]]
    for line in lines[1:]:
        if line[:4].isdigit():  # the next timestamped log record
            break
        out.append(line)
    return "\n".join(out)


@schema.parametrize()
@settings(suppress_health_check=list(HealthCheck))
def test_no_server_errors(case: schemathesis.Case, fuzz_targets: FuzzEnv) -> None:
    env = fuzz_targets
    _use_real_objects(case)
    _no_long_polls(case)
    headers: dict[str, str] = {}
    if _sends_token(case.operation.definition.raw):
        token = _throwaway_token(env, _operation_id(case)) if _operation_id(case) in SESSION_ENDING else env.user.token
        headers["Authorization"] = f"Bearer {token}"
    response = case.call(base_url=env.server.base_url, headers=headers)
    env.statuses[case.operation.label][response.status_code] += 1
    env.seconds[case.operation.label] += float(response.elapsed)
    if response.status_code >= 500:
        request = known_bugs.FuzzRequest(
            _operation_id(case),
            {k: unquote(str(v)) for k, v in (case.path_parameters or {}).items()},
            dict(case.query or {}),
            case.body,
            _database(env),
        )
        bug = known_bugs.tolerated(request)
        if bug is not None:
            env.tolerated[bug.id] += 1
            return
        print(f"server traceback:\n{_server_traceback(env.server, response.text)}")
    case.validate_response(response, checks=[not_a_server_error], headers=headers)


# -- hostile values: a deterministic sweep over every operation ----------------------------------
#
# Hypothesis rarely produces a U+0000 inside a path segment or a JSON document nested
# hundreds of levels deep, and those are exactly the values that reach a database
# driver or a serialiser unchecked. This sweep starts from a valid request for each
# operation (the spec's example with real IDs) and sends one hostile variation at a
# time: U+0000 in each path parameter, query parameter and string field; every
# top-level field replaced by each JSON type; the body and each object field nested
# 300 levels deep.

NESTING = 300
# A 1x1 PNG for the media targets.
_TINY_PNG = bytes.fromhex(
    "89504e470d0a1a0a0000000d4948445200000001000000010802000000907753de"
    "0000000c4944415408d763f8cfc000000301010018dd8db00000000049454e44ae426082"
)
TYPE_CONFUSION: list[Any] = [None, True, 0, -1, 2**53, "", [], {}, ["x"], {"x": "y"}]


def _nested(depth: int) -> Any:
    value: Any = 1
    for _ in range(depth):
        value = {"a": value}
    return value


def _string_leaves(value: Any, path: tuple[Any, ...] = (), depth: int = 0) -> Iterator[tuple[Any, ...]]:
    if isinstance(value, str):
        yield path
    elif depth < 3 and isinstance(value, dict):
        for key, item in value.items():
            yield from _string_leaves(item, (*path, key), depth + 1)
    elif depth < 3 and isinstance(value, list):
        for index, item in enumerate(value):
            yield from _string_leaves(item, (*path, index), depth + 1)


def _replace(value: Any, path: tuple[Any, ...], new: Any) -> Any:
    copied = copy.deepcopy(value)
    target = copied
    for step in path[:-1]:
        target = target[step]
    target[path[-1]] = new
    return copied


def _base_request(op: spec_loader.SpecOperation, env: FuzzEnv) -> tuple[dict[str, str], dict[str, str], Any]:
    """A valid request: real path parameters, required query parameters, the spec's example body."""
    definition = spec_loader.operation_definition(op.operation_id)
    path = {}
    for name in re.findall(r"\{([^}]+)\}", op.path):
        path[name] = PATH_TARGETS[name][0] if name in PATH_TARGETS else uuid.uuid4().hex
    query = {}
    defaults = {"dir": "b", "username": "probe" + uuid.uuid4().hex[:8], "url": "https://example.org/"}
    for param in definition.get("parameters", []):
        if param["in"] == "query" and param.get("required"):
            name = param["name"]
            query[name] = QUERY_TARGETS[name][0] if name in QUERY_TARGETS else defaults.get(name, "abc")
    if op.operation_id == "getKeysChanges":
        query["from"] = query["to"] = QUERY_TARGETS["since"][0]
    body = copy.deepcopy(spec_loader.request_example(op.operation_id))
    if body is None and "requestBody" in definition:
        body = {}
    member = env.member.user_id
    overrides: dict[str, Any] = {
        "login": {"type": "m.login.password", "identifier": {"type": "m.id.user", "user": env.user.user_id}, "password": env.user.password},
        "register": {"username": "probe" + uuid.uuid4().hex[:8], "password": "a long enough password"},
        "changePassword": {"new_password": "a long enough password", "auth": {"type": "m.login.password", "password": "wrong"}},
        "setProfileField": {"displayname": "Probe"},
        "kick": {"user_id": member, "reason": "probe"},
        "ban": {"user_id": member, "reason": "probe"},
        "unban": {"user_id": env.banned.user_id, "reason": "probe"},
        "inviteUser": {"user_id": env.outsider.user_id, "reason": "probe"},
        "setRoomAlias": {"room_id": PATH_TARGETS["roomId"][0]},
        "joinRoom": {"reason": "probe"},
        "joinRoomById": {"reason": "probe"},
    }
    if op.operation_id in overrides:
        body = overrides[op.operation_id]
    # Event types whose text the server indexes, with matching content.
    if op.operation_id == "sendMessage":
        path["eventType"] = "m.room.message"
    elif op.operation_id == "setRoomStateWithKey":
        path["eventType"], path["stateKey"], body = "m.room.name", "", {"name": "Probe"}
    if op.operation_id == "createRoom":
        body.pop("room_alias_name", None)
    return path, query, body


def _variants(op: spec_loader.SpecOperation, base: tuple[dict[str, str], dict[str, str], Any]) -> Iterator[tuple[str, dict[str, str], dict[str, str], Any]]:
    path, query, body = base
    yield "baseline (valid request)", path, query, body
    yield "unknown query parameter=\\u0000", path, {**query, "org.example.unknown": "\x00"}, body
    for name, value in path.items():
        yield f"path {name}=…\\u0000", {**path, name: value + "\x00x"}, query, body
    for param in spec_loader.operation_definition(op.operation_id).get("parameters", []):
        if param["in"] == "query":
            yield f"query {param['name']}=\\u0000", path, {**query, param["name"]: "a\x00b"}, body
    if body is None:
        return
    yield f"body nested {NESTING} deep", path, query, _nested(NESTING)
    if not isinstance(body, dict):
        return
    for leaf in _string_leaves(body):
        yield f"body {'.'.join(map(str, leaf))}=…\\u0000", path, query, _replace(body, leaf, "x\x00" + str(_get(body, leaf)))
    for key, value in body.items():
        if isinstance(value, dict):
            yield f"body {key} nested {NESTING} deep", path, query, {**body, key: _nested(NESTING)}
        for confused in TYPE_CONFUSION:
            if type(confused) is not type(value):
                yield f"body {key}={json.dumps(confused)}", path, query, {**body, key: confused}


def _get(value: Any, path: tuple[Any, ...]) -> Any:
    for step in path:
        value = value[step]
    return value


def _curl(method: str, url: str, body: Any, token: bool) -> str:
    """The request as a shell command (``$TOKEN``: any valid access token)."""
    parts = [f"curl -X {method}"]
    if token:
        parts.append("-H \"Authorization: Bearer $TOKEN\"")
    if body is not None:
        parts.append("-H 'Content-Type: application/json' --data-binary " + _shell_json(body))
    parts.append(shlex.quote(url))
    return " ".join(parts)


def _shell_json(body: Any) -> str:
    """``body`` as a shell word; a value nested NESTING deep is generated by python3."""
    deep = _nested(NESTING)
    sentinel = "\ue000nested"
    if body == deep:
        template = json.dumps(sentinel)
    elif isinstance(body, dict) and deep in body.values():
        template = json.dumps({k: (sentinel if v == deep else v) for k, v in body.items()})
    else:
        return shlex.quote(json.dumps(body))
    prefix, _, suffix = template.partition(json.dumps(sentinel))
    script = f'print({json.dumps(prefix)} + "{{\\"a\\":" * {NESTING} + "1" + "}}" * {NESTING} + {json.dumps(suffix)})'
    return f'"$(python3 -c {shlex.quote(script)})"'


@pytest.mark.parametrize("operation", spec_loader.implemented_operations(), ids=lambda op: op.label)
def test_hostile_values_never_cause_server_errors(operation: spec_loader.SpecOperation, fuzz_targets: FuzzEnv) -> None:
    env = fuzz_targets
    definition = spec_loader.operation_definition(operation.operation_id)
    token = _sends_token(definition)
    base = _base_request(operation, env)
    failures: list[str] = []
    sent = 0
    for name, path, query, body in _variants(operation, base):
        if operation.operation_id in SESSION_ENDING:
            client = MatrixHttp(env.server.base_url, env.server.server_name, token=_throwaway_token(env, operation.operation_id))
        else:
            client = env.user
        if "txnId" in path and not name.startswith("path txnId"):
            path = {**path, "txnId": uuid.uuid4().hex}  # a reused txn ID replays the first response
        url = operation.path
        for param, value in path.items():
            url = url.replace("{" + param + "}", quote(value, safe=""))
        content = None if body is None else json.dumps(body).encode()
        response = client.raw(operation.method, url, params=query or None, content=content, token=token)
        sent += 1
        env.statuses[f"hostile {operation.label}"][response.status_code] += 1
        if response.status_code < 500:
            continue
        request = known_bugs.FuzzRequest(operation.operation_id, path, query, body, _database(env))
        bug = known_bugs.tolerated(request)
        if bug is not None:
            env.tolerated[bug.id] += 1
            continue
        full_url = str(response.request.url)
        failures.append(
            f"- {name}: HTTP {response.status_code} {response.text[:200]}\n"
            f"  {_curl(operation.method, full_url, body, token)}\n"
            + "\n".join("    " + line for line in _server_traceback(env.server, response.text).splitlines()[-6:])
        )
    assert sent > 0
    assert not failures, f"{operation.operation_id} ({operation.label}): {len(failures)} of {sent} hostile requests got a 5xx:\n" + "\n".join(failures)
