"""Accounts: login, logout, registration modes, UIA, shared-secret registration."""

from __future__ import annotations

import hashlib
import hmac
import subprocess
import sys
import time

import httpx
import pytest

from tests.harness import MatrixHttp, ServerProcess


def login(client: MatrixHttp, user: str, password: str, **extra) -> httpx.Response:
    body = {"type": "m.login.password", "identifier": {"type": "m.id.user", "user": user}, "password": password, **extra}
    return client.raw("POST", "/_matrix/client/v3/login", json=body, token=False)


def test_login_flows_and_failures_do_not_reveal_users(server: ServerProcess) -> None:
    user = server.client().register()
    anon = server.client()
    assert anon.call("GET", "/_matrix/client/v3/login") == {"flows": [{"type": "m.login.password"}]}
    ok = login(anon, user.user_id, user.password)
    assert ok.status_code == 200
    body = ok.json()
    assert body["user_id"] == user.user_id and body["access_token"].startswith("bst_")
    assert len(body["access_token"]) >= 40  # 256 random bits, URL-safe Base64
    # Localpart works too, and the legacy top-level 'user' field.
    assert login(anon, user.user_id.split(":")[0][1:], user.password).status_code == 200
    legacy = anon.raw("POST", "/_matrix/client/v3/login", json={"type": "m.login.password", "user": user.user_id, "password": user.password}, token=False)
    assert legacy.status_code == 200
    wrong = login(anon, user.user_id, "not the password")
    unknown = login(anon, "@nobody-here:localhost", "not the password")
    assert wrong.status_code == unknown.status_code == 403
    assert wrong.json() == unknown.json() == {"errcode": "M_FORBIDDEN", "error": "Invalid username or password"}
    bad_type = anon.raw("POST", "/_matrix/client/v3/login", json={"type": "m.login.token", "token": "x"}, token=False)
    assert bad_type.status_code == 400


def test_login_with_device_id_replaces_old_token(server: ServerProcess) -> None:
    user = server.client().register()
    anon = server.client()
    first = login(anon, user.user_id, user.password, device_id="PHONE").json()
    second = login(anon, user.user_id, user.password, device_id="PHONE").json()
    assert first["device_id"] == second["device_id"] == "PHONE"
    old = MatrixHttp(server.base_url, server.server_name, first["access_token"])
    new = MatrixHttp(server.base_url, server.server_name, second["access_token"])
    assert old.raw("GET", "/_matrix/client/v3/account/whoami").json()["errcode"] == "M_UNKNOWN_TOKEN"
    assert new.call("GET", "/_matrix/client/v3/account/whoami") == {"user_id": user.user_id, "device_id": "PHONE", "is_guest": False}


def test_logout_and_logout_all(server: ServerProcess) -> None:
    user = server.client().register()
    anon = server.client()
    tokens = [login(anon, user.user_id, user.password).json()["access_token"] for _ in range(2)]
    user.call("POST", "/_matrix/client/v3/logout", {})
    assert user.raw("GET", "/_matrix/client/v3/account/whoami").status_code == 401
    other = MatrixHttp(server.base_url, server.server_name, tokens[0])
    assert other.call("GET", "/_matrix/client/v3/account/whoami")["user_id"] == user.user_id
    other.call("POST", "/_matrix/client/v3/logout/all", {})
    for token in tokens:
        resp = MatrixHttp(server.base_url, server.server_name, token).raw("GET", "/_matrix/client/v3/account/whoami")
        assert resp.status_code == 401 and resp.json()["errcode"] == "M_UNKNOWN_TOKEN"


def test_password_change_behind_uia(server: ServerProcess) -> None:
    user = server.client().register()
    other_device = MatrixHttp(server.base_url, server.server_name, login(server.client(), user.user_id, user.password).json()["access_token"])
    first = user.raw("POST", "/_matrix/client/v3/account/password", json={"new_password": "a much better password"})
    assert first.status_code == 401
    challenge = first.json()
    assert challenge["flows"] == [{"stages": ["m.login.password"]}] and challenge["session"]
    auth = {"type": "m.login.password", "identifier": {"type": "m.id.user", "user": user.user_id}, "session": challenge["session"]}
    wrong = user.raw("POST", "/_matrix/client/v3/account/password",
                     json={"new_password": "a much better password", "auth": {**auth, "password": "wrong"}})
    assert wrong.status_code == 401 and wrong.json()["errcode"] == "M_FORBIDDEN" and wrong.json()["session"] == challenge["session"]
    # A UIA session is bound to the request that opened it.
    replay = user.raw("POST", "/_matrix/client/v3/register", json={"auth": {"type": "m.login.dummy", "session": challenge["session"]}})
    assert replay.status_code in (400, 403)
    ok = user.raw("POST", "/_matrix/client/v3/account/password",
                  json={"new_password": "a much better password", "auth": {**auth, "password": user.password}})
    assert ok.status_code == 200, ok.text
    assert login(server.client(), user.user_id, user.password).status_code == 403
    assert login(server.client(), user.user_id, "a much better password").status_code == 200
    # logout_devices defaults to true: the other device is logged out, this one is not.
    assert other_device.raw("GET", "/_matrix/client/v3/account/whoami").status_code == 401
    assert user.raw("GET", "/_matrix/client/v3/account/whoami").status_code == 200
    short = user.raw("POST", "/_matrix/client/v3/account/password", json={"new_password": "short", "auth": {}})
    assert short.status_code == 400 and short.json()["errcode"] == "M_WEAK_PASSWORD"


def test_registration_is_closed_by_default(make_server) -> None:
    srv: ServerProcess = make_server(registration={"enabled": False, "require_token": True})
    anon = srv.client()
    resp = anon.raw("POST", "/_matrix/client/v3/register", json={"username": "eve", "password": "long enough pw"})
    assert resp.status_code == 403 and resp.json()["errcode"] == "M_FORBIDDEN"
    avail = anon.raw("GET", "/_matrix/client/v3/register/available", params={"username": "eve"})
    assert avail.status_code == 403  # no user enumeration while registration is closed
    guest = anon.raw("POST", "/_matrix/client/v3/register", params={"kind": "guest"}, json={})
    assert guest.status_code == 403
    nonce = anon.raw("GET", "/_synapse/admin/v1/register")
    assert nonce.status_code == 404  # no shared secret configured


def test_registration_with_token(make_server) -> None:
    srv: ServerProcess = make_server(registration={"enabled": True, "require_token": True})
    made = srv.cli("registration-token", "create", "--uses", "1")
    assert made.returncode == 0, made.stderr
    token = made.stdout.strip()
    anon = srv.client()
    validity = anon.call("GET", "/_matrix/client/v1/register/m.login.registration_token/validity", params={"token": token}, token=False)
    assert validity == {"valid": True}
    first = anon.raw("POST", "/_matrix/client/v3/register", json={"username": "tokenuser", "password": "long enough pw"}, token=False)
    assert first.status_code == 401
    session = first.json()["session"]
    assert first.json()["flows"] == [{"stages": ["m.login.registration_token"]}]
    bad = anon.raw("POST", "/_matrix/client/v3/register", token=False, json={
        "username": "tokenuser", "password": "long enough pw",
        "auth": {"type": "m.login.registration_token", "token": "wrong", "session": session}})
    assert bad.status_code == 401 and bad.json()["errcode"] == "M_FORBIDDEN"
    dummy = anon.raw("POST", "/_matrix/client/v3/register", token=False, json={
        "username": "tokenuser", "password": "long enough pw", "auth": {"type": "m.login.dummy", "session": session}})
    assert dummy.status_code == 401  # dummy is not an offered stage
    ok = anon.raw("POST", "/_matrix/client/v3/register", token=False, json={
        "username": "tokenuser", "password": "long enough pw",
        "auth": {"type": "m.login.registration_token", "token": token, "session": session}})
    assert ok.status_code == 200, ok.text
    assert ok.json()["user_id"] == "@tokenuser:localhost"
    # The single use is spent.
    again = anon.call("GET", "/_matrix/client/v1/register/m.login.registration_token/validity", params={"token": token}, token=False)
    assert again == {"valid": False}


def test_register_validation(server: ServerProcess) -> None:
    anon = server.client()
    taken = server.client().register()
    local = taken.user_id.split(":")[0][1:]
    resp = anon.raw("POST", "/_matrix/client/v3/register", json={"username": local, "password": "long enough pw"}, token=False)
    assert resp.status_code == 400 and resp.json()["errcode"] == "M_USER_IN_USE"
    resp = anon.raw("POST", "/_matrix/client/v3/register", json={"username": "Bad Name", "password": "long enough pw"}, token=False)
    assert resp.status_code == 400 and resp.json()["errcode"] == "M_INVALID_USERNAME"
    resp = anon.raw("POST", "/_matrix/client/v3/register", json={"username": "shortpw", "password": "123"}, token=False)
    assert resp.status_code == 400 and resp.json()["errcode"] == "M_WEAK_PASSWORD"
    avail = anon.raw("GET", "/_matrix/client/v3/register/available", params={"username": local}, token=False)
    assert avail.status_code == 400 and avail.json()["errcode"] == "M_USER_IN_USE"
    assert anon.call("GET", "/_matrix/client/v3/register/available", params={"username": "fresh-name-123"}, token=False) == {"available": True}


def test_shared_secret_registration_like_register_new_matrix_user(make_server) -> None:
    secret = "s3cr3t-s3cr3t-s3cr3t"
    srv: ServerProcess = make_server(registration={"enabled": False, "shared_secret": secret})
    anon = srv.client()

    def mac(nonce: str, user: str, password: str, admin: bool) -> str:
        digest = hmac.new(secret.encode(), digestmod=hashlib.sha1)
        for part in (nonce, user, password):
            digest.update(part.encode())
            digest.update(b"\x00")
        digest.update(b"admin" if admin else b"notadmin")
        return digest.hexdigest()

    nonce = anon.call("GET", "/_synapse/admin/v1/register", token=False)["nonce"]
    body = {"nonce": nonce, "username": "ops", "password": "long enough pw", "admin": True, "mac": mac(nonce, "ops", "long enough pw", True)}
    created = anon.call("POST", "/_synapse/admin/v1/register", body, token=False)
    assert created["user_id"] == "@ops:localhost" and created["access_token"]
    replay = anon.raw("POST", "/_synapse/admin/v1/register", json=body, token=False)
    assert replay.status_code == 403  # nonces are single-use
    nonce = anon.call("GET", "/_synapse/admin/v1/register", token=False)["nonce"]
    forged = {"nonce": nonce, "username": "ops2", "password": "long enough pw", "admin": True, "mac": mac(nonce, "ops2", "long enough pw", False)}
    assert anon.raw("POST", "/_synapse/admin/v1/register", json=forged, token=False).status_code == 403


FORGED_ADDRESSES = [
    {"X-Forwarded-For": "10.0.0.1"},
    {"X-Forwarded-For": "203.0.113.9, 10.0.0.1"},
    {"X-Forwarded-For": "10.0.0.1:443"},
    {"X-Forwarded-Proto": "https", "X-Forwarded-For": "10.0.0.1"},
]


def test_admin_api_only_from_allowed_networks(make_server) -> None:
    """The connecting address decides, unless it is a trusted proxy: an
    X-Forwarded-For header from anyone else is ignored. (uvicorn's own proxy-header
    handling used to rewrite the address of any connection from 127.0.0.1 first, so a
    local front end that passed the header through let a client claim an address in
    ``allowed_networks``, and forge the ``last_seen_ip`` of its devices.)"""
    srv: ServerProcess = make_server(registration={"shared_secret": "s3cr3t-s3cr3t-s3cr3t"}, admin_api={"allowed_networks": ["10.0.0.0/8"]})
    anon = srv.client()  # (behind the test cluster's nginx too: it overwrites the header)
    resp = anon.raw("GET", "/_synapse/admin/v1/register", token=False)
    assert resp.status_code == 404 and resp.json()["errcode"] == "M_UNRECOGNIZED"
    for headers in FORGED_ADDRESSES:
        resp = anon.raw("GET", "/_synapse/admin/v1/register", token=False, headers=headers)
        assert resp.status_code == 404, headers
    user = srv.client().register()
    user.raw("GET", "/_matrix/client/v3/account/whoami", headers={"X-Forwarded-For": "198.51.100.66"})
    devices = user.call("GET", "/_matrix/client/v3/devices")["devices"]
    assert [d["last_seen_ip"] for d in devices] == ["127.0.0.1"]


def test_a_trusted_proxy_passes_on_the_client_address(make_server) -> None:
    srv: ServerProcess = make_server(
        registration={"shared_secret": "s3cr3t-s3cr3t-s3cr3t"}, admin_api={"allowed_networks": ["10.0.0.0/8"]},
        trusted_proxies=["127.0.0.1/32"],
    )
    if hasattr(srv, "nginx_proc"):
        pytest.skip("behind the test cluster's nginx, which overwrites the header with its peer's address")
    anon = srv.client()
    assert anon.raw("GET", "/_synapse/admin/v1/register", token=False, headers={"X-Forwarded-For": "10.0.0.1"}).status_code == 200
    assert anon.raw("GET", "/_synapse/admin/v1/register", token=False, headers={"X-Forwarded-For": "192.0.2.7"}).status_code == 404


def _refused_everywhere(client: MatrixHttp, within_s: float = 5) -> bool:
    """Within ``within_s`` the token is refused — by every worker: six requests in a row
    (with several workers behind a load balancer they land on different ones)."""
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        if all(client.raw("GET", "/_matrix/client/v3/account/whoami").status_code == 401 for _ in range(6)):
            return True
        time.sleep(0.1)
    return False


def test_a_login_replaces_a_hash_made_with_weaker_settings(make_server) -> None:
    """After the operator raises the password-hashing cost, each user's hash is re-made
    at the new cost when they next log in (the old one keeps working until then)."""
    import asyncio

    import yaml

    from bastion.app import open_migrated_database
    from bastion.settings import load_settings

    srv: ServerProcess = make_server(password_hashing={"time_cost": 2, "memory_kib": 2048, "parallelism": 1})
    weaker = srv.directory / "weaker.yaml"
    config = yaml.safe_load(srv.config_path.read_text())
    config["password_hashing"] = {"time_cost": 1, "memory_kib": 1024, "parallelism": 1}
    weaker.write_text(yaml.safe_dump(config))
    added = subprocess.run(
        [sys.executable, "-m", "bastion", "user", "add", "legacy", "--password-file", "-", "--config", str(weaker)],
        input="legacy password\n", capture_output=True, text=True, cwd=srv.directory,
    )
    assert added.returncode == 0, added.stderr

    def stored_hash() -> str:
        async def read() -> str:
            db = open_migrated_database(load_settings(srv.config_path))
            try:
                return await db.read(lambda txn: txn.fetchval("SELECT password_hash FROM users WHERE user_id = '@legacy:localhost'"))
            finally:
                await db.close()

        return asyncio.run(read())

    before = stored_hash()
    assert "t=1" in before
    assert login(srv.client(), "legacy", "wrong password").status_code == 403
    assert stored_hash() == before  # a wrong password changes nothing
    assert login(srv.client(), "legacy", "legacy password").status_code == 200
    after = stored_hash()
    assert after != before and "t=2" in after and "m=2048" in after
    assert login(srv.client(), "legacy", "legacy password").status_code == 200  # the new hash works


def test_a_known_device_keeps_its_name_and_an_empty_device_id_is_refused(server: ServerProcess) -> None:
    """spec (POST /login): ``initial_device_display_name`` is ignored if ``device_id``
    names a known device."""
    user = server.client().register()
    first = login(server.client(), user.user_id, user.password, device_id="PHONE", initial_device_display_name="My phone")
    assert first.status_code == 200
    again = login(server.client(), user.user_id, user.password, device_id="PHONE", initial_device_display_name="Renamed")
    assert again.status_code == 200
    device = user.call("GET", "/_matrix/client/v3/devices/PHONE")
    assert device["display_name"] == "My phone"
    empty = login(server.client(), user.user_id, user.password, device_id="")
    assert empty.status_code == 400 and empty.json()["errcode"] == "M_BAD_JSON"


def test_cli_user_management_applies_to_running_server(make_server) -> None:
    srv: ServerProcess = make_server()
    added = srv.cli("user", "add", "carol", input="")
    assert added.returncode == 0, added.stderr
    password = added.stdout.split("store it now): ")[1].strip()
    carol = srv.client()
    resp = login(carol, "carol", password)
    assert resp.status_code == 200
    carol.token = resp.json()["access_token"]
    carol.user_id = "@carol:localhost"
    witness = srv.client().register()
    room = carol.create_room(invite=[witness.user_id])
    witness.join(room)
    assert srv.cli("user", "add", "carol", input="").returncode != 0  # exists

    changed = srv.cli("user", "passwd", "carol", "--password-file", "-", input="the new password here\n")
    assert changed.returncode == 0, changed.stderr
    assert _refused_everywhere(carol), "the old session still works 5 s after the password change"
    resp = login(carol, "carol", "the new password here")
    assert resp.status_code == 200
    carol.token = resp.json()["access_token"]

    gone = srv.cli("user", "deactivate", "carol", "--yes")
    assert gone.returncode == 0, gone.stderr
    assert _refused_everywhere(carol), "the session still works 5 s after deactivation"
    assert login(carol, "carol", "the new password here").status_code == 403
    # The running server finishes the deactivation: carol leaves her rooms.
    deadline = time.monotonic() + 5
    joined = witness.call("GET", f"/_matrix/client/v3/rooms/{room}/joined_members")["joined"]
    while time.monotonic() < deadline and "@carol:localhost" in joined:
        time.sleep(0.2)
        joined = witness.call("GET", f"/_matrix/client/v3/rooms/{room}/joined_members")["joined"]
    assert set(joined) == {witness.user_id}
    assert srv.cli("user", "deactivate", "carol", "--yes").returncode != 0  # already deactivated


@pytest.mark.parametrize("bad", [b"not json", b"[]", b'{"type": 5}'])
def test_login_rejects_malformed_bodies(server: ServerProcess, bad: bytes) -> None:
    resp = server.client().raw("POST", "/_matrix/client/v3/login", content=bad, token=False)
    assert resp.status_code == 400
    assert resp.json()["errcode"] in ("M_NOT_JSON", "M_BAD_JSON", "M_UNKNOWN")


def test_access_token_stored_only_as_hash(make_server) -> None:
    srv: ServerProcess = make_server()
    user = srv.client().register()
    if srv.database_url.startswith("sqlite"):
        raw = (srv.directory / "bastion.db").read_bytes()
        wal = srv.directory / "bastion.db-wal"
        if wal.exists():
            raw += wal.read_bytes()
    else:
        import psycopg

        with psycopg.connect(srv.database_url) as conn:
            raw = b"".join(bytes(r[0]) for r in conn.execute("SELECT token_hash FROM access_tokens"))
            raw += "".join(str(r) for r in conn.execute("SELECT * FROM access_tokens")).encode()
    assert user.token.encode() not in raw
    assert hashlib.sha256(user.token.encode()).digest() in raw
