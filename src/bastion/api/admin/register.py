"""Synapse-compatible shared-secret registration: ``/_synapse/admin/v1/register``.

What Synapse's ``register_new_matrix_user`` script speaks: GET a nonce, then POST
the new account with an HMAC-SHA1 over nonce, username, password and admin flag,
keyed by the configured shared secret. Off unless a secret is configured, and only
reachable from ``admin_api.allowed_networks`` (loopback by default).
"""

from __future__ import annotations

from typing import Any

from bastion.api.http import Request, RouteTable
from bastion.errors import Unrecognized


def _enabled(req: Request) -> None:
    if not req.hs.settings.admin_api.enabled or not req.hs.accounts.shared_secret_enabled:
        raise Unrecognized("Shared-secret registration is disabled")


async def get_nonce(req: Request) -> dict[str, Any]:
    """GET /_synapse/admin/v1/register"""
    _enabled(req)
    return {"nonce": await req.hs.accounts.new_nonce()}


async def post_register(req: Request) -> dict[str, Any]:
    """POST /_synapse/admin/v1/register"""
    _enabled(req)
    return await req.hs.accounts.register_with_shared_secret(await req.json())


def register(routes: RouteTable) -> None:
    routes.add("GET", "/_synapse/admin/v1/register", get_nonce, auth=False, admin_network=True)
    routes.add("POST", "/_synapse/admin/v1/register", post_register, auth=False, admin_network=True)
