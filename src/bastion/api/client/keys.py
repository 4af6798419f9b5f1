"""End-to-end encryption endpoints: keys, cross-signing, to-device, key backup."""

from __future__ import annotations

from typing import Any

from bastion.api.http import CLIENT_V3, Request, RouteTable
from bastion.errors import BadJson, InvalidParam
from bastion.services.auth import UiaService
from bastion.streams.tokens import StreamToken


async def upload(req: Request) -> dict[str, Any]:
    """POST /_matrix/client/v3/keys/upload"""
    return await req.hs.keys.upload(req.requester, await req.json())


async def query(req: Request) -> dict[str, Any]:
    """POST /_matrix/client/v3/keys/query"""
    return await req.hs.keys.query(req.requester, await req.json())


async def claim(req: Request) -> dict[str, Any]:
    """POST /_matrix/client/v3/keys/claim"""
    return await req.hs.keys.claim(req.requester, await req.json())


async def changes(req: Request) -> dict[str, Any]:
    """GET /_matrix/client/v3/keys/changes"""
    raw_from, raw_to = req.query_str("from"), req.query_str("to")
    if not raw_from or not raw_to:
        raise InvalidParam("'from' and 'to' are required")
    start, end = StreamToken.decode(raw_from, "from"), StreamToken.decode(raw_to, "to")
    return await req.hs.sync.key_changes(req.requester, start, end)


async def device_signing_upload(req: Request) -> dict[str, Any]:
    """POST /_matrix/client/v3/keys/device_signing/upload"""
    body = await req.json()
    user = req.requester.user_id
    if await req.hs.keys.cross_signing_upload_needs_auth(user, body):
        # Replacing cross-signing keys needs the password; the first upload does not, and
        # neither does uploading exactly the keys already stored (a retried request).
        fingerprint = UiaService.fingerprint(req.method, req.path.replace("/r0/", "/v3/"), user)
        await req.hs.uia.authenticate(body, flows=[["m.login.password"]], fingerprint=fingerprint, user_id=user)
    await req.hs.keys.upload_cross_signing(req.requester, body)
    return {}


async def signatures_upload(req: Request) -> dict[str, Any]:
    """POST /_matrix/client/v3/keys/signatures/upload"""
    return await req.hs.keys.upload_signatures(req.requester, await req.json())


async def send_to_device(req: Request) -> dict[str, Any]:
    """PUT /_matrix/client/v3/sendToDevice/{eventType}/{txnId}"""
    txn_id = req.params["txnId"]
    if not txn_id or len(txn_id) > 255:
        raise InvalidParam("Invalid transaction ID")
    await req.hs.keys.send_to_device(req.requester, req.params["eventType"], txn_id, await req.json())
    return {}


# -- key backup ----------------------------------------------------------------------------------


async def create_version(req: Request) -> dict[str, Any]:
    """POST /_matrix/client/v3/room_keys/version"""
    return {"version": await req.hs.key_backup.create(req.requester, await req.json())}


async def current_version(req: Request) -> dict[str, Any]:
    """GET /_matrix/client/v3/room_keys/version"""
    return await req.hs.key_backup.info(req.requester, None)


async def get_version(req: Request) -> dict[str, Any]:
    """GET /_matrix/client/v3/room_keys/version/{version}"""
    return await req.hs.key_backup.info(req.requester, req.params["version"])


async def put_version(req: Request) -> dict[str, Any]:
    """PUT /_matrix/client/v3/room_keys/version/{version}"""
    await req.hs.key_backup.update(req.requester, req.params["version"], await req.json())
    return {}


async def delete_version(req: Request) -> dict[str, Any]:
    """DELETE /_matrix/client/v3/room_keys/version/{version}"""
    await req.hs.key_backup.delete(req.requester, req.params["version"])
    return {}


def _scope(req: Request) -> tuple[str | None, str | None]:
    return req.params.get("roomId"), req.params.get("sessionId")


async def put_keys(req: Request) -> dict[str, Any]:
    """PUT /_matrix/client/v3/room_keys/keys[/{roomId}[/{sessionId}]]"""
    body = await req.json()
    room_id, session_id = _scope(req)
    if room_id is None:
        rooms = body.get("rooms")
        if not isinstance(rooms, dict):
            raise BadJson("'rooms' must be an object")
    elif session_id is None:
        rooms = {room_id: body}
    else:
        rooms = {room_id: {"sessions": {session_id: body}}}
    return await req.hs.key_backup.put_keys(req.requester, req.query_str("version"), rooms)


async def get_keys(req: Request) -> dict[str, Any]:
    """GET /_matrix/client/v3/room_keys/keys[/{roomId}[/{sessionId}]]"""
    room_id, session_id = _scope(req)
    return await req.hs.key_backup.get_keys(req.requester, req.query_str("version"), room_id, session_id)


async def delete_keys(req: Request) -> dict[str, Any]:
    """DELETE /_matrix/client/v3/room_keys/keys[/{roomId}[/{sessionId}]]"""
    room_id, session_id = _scope(req)
    return await req.hs.key_backup.delete_keys(req.requester, req.query_str("version"), room_id, session_id)


def register(routes: RouteTable) -> None:
    routes.add("POST", CLIENT_V3 + "/keys/upload", upload)
    routes.add("POST", CLIENT_V3 + "/keys/query", query)
    routes.add("POST", CLIENT_V3 + "/keys/claim", claim)
    routes.add("GET", CLIENT_V3 + "/keys/changes", changes)
    routes.add("POST", CLIENT_V3 + "/keys/device_signing/upload", device_signing_upload)
    routes.add("POST", CLIENT_V3 + "/keys/signatures/upload", signatures_upload)
    routes.add("PUT", CLIENT_V3 + "/sendToDevice/{eventType}/{txnId}", send_to_device)
    routes.add("POST", CLIENT_V3 + "/room_keys/version", create_version)
    routes.add("GET", CLIENT_V3 + "/room_keys/version", current_version)
    routes.add("GET", CLIENT_V3 + "/room_keys/version/{version}", get_version)
    routes.add("PUT", CLIENT_V3 + "/room_keys/version/{version}", put_version)
    routes.add("DELETE", CLIENT_V3 + "/room_keys/version/{version}", delete_version)
    for suffix in ("", "/{roomId}", "/{roomId}/{sessionId}"):
        routes.add("PUT", CLIENT_V3 + "/room_keys/keys" + suffix, put_keys)
        routes.add("GET", CLIENT_V3 + "/room_keys/keys" + suffix, get_keys)
        routes.add("DELETE", CLIENT_V3 + "/room_keys/keys" + suffix, delete_keys)
