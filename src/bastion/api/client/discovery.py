"""Discovery and health: /versions, /.well-known/matrix/client, /capabilities, /health."""

from __future__ import annotations

import asyncio
from typing import Any

import orjson

from bastion.api.http import CLIENT_V3, Request, Response, RouteTable
from bastion.core.room_versions import KNOWN_ROOM_VERSIONS

SPEC_VERSIONS = ["r0.6.1"] + [f"v1.{n}" for n in range(1, 17)]


async def versions(req: Request) -> dict[str, Any]:
    """GET /_matrix/client/versions"""
    return {"versions": SPEC_VERSIONS, "unstable_features": {}}


async def well_known_client(req: Request) -> dict[str, Any]:
    """GET /.well-known/matrix/client

    Uses ``well_known.client_base_url`` when configured; otherwise the scheme and
    host the client used to reach this server.
    """
    base = req.hs.settings.well_known.client_base_url
    if base is None:
        host = req.header(b"host") or f"{req.hs.settings.listen.host}:{req.hs.settings.listen.port}"
        scheme = req.header(b"x-forwarded-proto") if req.hs.trusts_proxy(req) else None
        base = f"{scheme or req.scope.get('scheme', 'http')}://{host}"
    return {"m.homeserver": {"base_url": base}}


async def capabilities(req: Request) -> dict[str, Any]:
    """GET /_matrix/client/v3/capabilities"""
    return {
        "capabilities": {
            "m.change_password": {"enabled": True},
            "m.room_versions": {
                "default": req.hs.settings.default_room_version,
                "available": {v: "stable" for v in KNOWN_ROOM_VERSIONS},
            },
            "m.set_displayname": {"enabled": True},
            "m.profile_fields": {"enabled": True},
            "m.set_avatar_url": {"enabled": True},
            "m.3pid_changes": {"enabled": False},
            "m.get_login_token": {"enabled": False},
            "m.forget_forced_upon_leave": {"enabled": False},
        }
    }


async def health(req: Request) -> Response:
    """GET /health — 200 once the server has started (the app only routes after start-up)."""
    return Response(b'{"status":"ok"}')


async def ready(req: Request) -> Response:
    """GET /ready — 200 while this worker can serve: its database answers within 2 s.

    A lost Redis bus does not make a worker unready (it falls back to polling); the
    body says whether the bus is connected.
    """
    hs = req.hs
    try:
        await asyncio.wait_for(hs.db.read(lambda txn: txn.fetchval("SELECT 1")), timeout=2)
    except Exception as exc:
        body = {"status": "unavailable", "database": f"{exc.__class__.__name__}"}
        return Response(orjson.dumps(body), 503)
    bus = None if hs.bus is None else ("connected" if hs.bus.connected else "disconnected (polling)")
    return Response(orjson.dumps({"status": "ok", "database": "ok", "bus": bus, "worker": hs.instance_id}))


def register(routes: RouteTable) -> None:
    routes.add("GET", "/_matrix/client/versions", versions, auth=False)
    routes.add("GET", "/.well-known/matrix/client", well_known_client, auth=False)
    routes.add("GET", CLIENT_V3 + "/capabilities", capabilities)
    routes.add("GET", "/health", health, auth=False)
    routes.add("GET", "/ready", ready, auth=False)
