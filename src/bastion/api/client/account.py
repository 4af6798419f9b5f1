"""Login, logout, registration, whoami, password changes."""

from __future__ import annotations

from typing import Any

from bastion.api.http import CLIENT_V1, CLIENT_V3, Request, RouteTable
from bastion.errors import InvalidParam, MissingParam
from bastion.services.auth import UiaService


def _fingerprint(req: Request, user_id: str | None) -> str:
    path = req.path.replace("/r0/", "/v3/")
    return UiaService.fingerprint(req.method, path, user_id)


async def get_login(req: Request) -> dict[str, Any]:
    """GET /_matrix/client/v3/login"""
    return {"flows": [{"type": "m.login.password"}]}


async def post_login(req: Request) -> dict[str, Any]:
    """POST /_matrix/client/v3/login"""
    return await req.hs.accounts.login(await req.json())


async def logout(req: Request) -> dict[str, Any]:
    """POST /_matrix/client/v3/logout"""
    await req.hs.accounts.logout(req.requester.user_id, req.requester.device_id)
    return {}


async def logout_all(req: Request) -> dict[str, Any]:
    """POST /_matrix/client/v3/logout/all"""
    await req.hs.accounts.logout_all(req.requester.user_id)
    return {}


async def whoami(req: Request) -> dict[str, Any]:
    """GET /_matrix/client/v3/account/whoami"""
    result: dict[str, Any] = {"user_id": req.requester.user_id, "is_guest": False}
    if req.requester.device_id is not None:
        result["device_id"] = req.requester.device_id
    return result


async def post_register(req: Request) -> dict[str, Any]:
    """POST /_matrix/client/v3/register"""
    kind = req.query_str("kind", "user") or "user"
    body = await req.json()
    return await req.hs.accounts.register(body, kind, _fingerprint(req, None))


async def register_available(req: Request) -> dict[str, Any]:
    """GET /_matrix/client/v3/register/available"""
    username = req.query_str("username")
    if not username:
        raise MissingParam("'username' is required")
    await req.hs.accounts.check_username_available(username)
    return {"available": True}


async def registration_token_validity(req: Request) -> dict[str, Any]:
    """GET /_matrix/client/v1/register/m.login.registration_token/validity"""
    token = req.query_str("token")
    if token is None:
        raise MissingParam("'token' is required")
    if len(token) > 64:
        raise InvalidParam("'token' is too long")
    return {"valid": await req.hs.accounts.registration_token_valid(token)}


async def change_password(req: Request) -> dict[str, Any]:
    """POST /_matrix/client/v3/account/password"""
    body = await req.json()
    user = req.requester.user_id
    await req.hs.accounts.change_password(user, req.requester.device_id, body, _fingerprint(req, user))
    return {}


def register(routes: RouteTable) -> None:
    routes.add("GET", CLIENT_V3 + "/login", get_login, auth=False)
    routes.add("POST", CLIENT_V3 + "/login", post_login, auth=False)
    routes.add("POST", CLIENT_V3 + "/logout", logout)
    routes.add("POST", CLIENT_V3 + "/logout/all", logout_all)
    routes.add("GET", CLIENT_V3 + "/account/whoami", whoami)
    routes.add("POST", CLIENT_V3 + "/register", post_register, auth=False)
    routes.add("GET", CLIENT_V3 + "/register/available", register_available, auth=False)
    routes.add("GET", CLIENT_V1 + "/register/m.login.registration_token/validity", registration_token_validity, auth=False)
    routes.add("POST", CLIENT_V3 + "/account/password", change_password)
