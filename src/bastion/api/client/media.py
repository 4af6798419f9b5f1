"""The media repository: upload, create, authenticated download and thumbnails, config,
URL previews; the legacy unauthenticated ``/_matrix/media/v3`` downloads (frozen
unless ``media.legacy_unauthenticated``)."""

from __future__ import annotations

from typing import Any

from bastion.api.http import Request, RouteTable, StreamResponse
from bastion.errors import InvalidParam, MatrixError, NotFound

MEDIA_V3 = "/_matrix/media/{version:v3}"
AUTHED = "/_matrix/client/v1/media"


def _length(req: Request) -> int | None:
    value = req.headers.get(b"content-length")
    try:
        return int(value) if value is not None else None
    except ValueError:
        raise MatrixError("Invalid Content-Length", errcode="M_UNKNOWN", status=400) from None


async def upload(req: Request) -> dict[str, Any]:
    """POST /_matrix/media/v3/upload"""
    media = req.hs.media
    uri = await media.upload(
        req.requester,
        req.stream(media.config.max_upload_bytes),
        req.header(b"content-type"),
        req.query_str("filename") or None,
        _length(req),
    )
    return {"content_uri": uri}


async def create(req: Request) -> dict[str, Any]:
    """POST /_matrix/media/v1/create"""
    return await req.hs.media.create(req.requester)


async def upload_to(req: Request) -> dict[str, Any]:
    """PUT /_matrix/media/v3/upload/{serverName}/{mediaId}"""
    media = req.hs.media
    await media.upload_to(
        req.requester,
        req.params["serverName"],
        req.params["mediaId"],
        req.stream(media.config.max_upload_bytes),
        req.header(b"content-type"),
        req.query_str("filename") or None,
        _length(req),
    )
    return {}


async def config(req: Request) -> dict[str, Any]:
    """GET /_matrix/client/v1/media/config"""
    return req.hs.media.config_response()


def _timeout(req: Request) -> int | None:
    return req.query_int("timeout_ms", None, minimum=0, maximum=120_000)


async def download(req: Request) -> StreamResponse:
    """GET /_matrix/client/v1/media/download/{serverName}/{mediaId}[/{fileName}]"""
    filename = req.params.get("fileName") or None
    chunks, headers, size = await req.hs.media.download(req.params["serverName"], req.params["mediaId"], filename, _timeout(req))
    return StreamResponse(chunks, headers, length=size)


async def thumbnail(req: Request) -> StreamResponse:
    """GET /_matrix/client/v1/media/thumbnail/{serverName}/{mediaId}"""
    width = req.query_int("width", None, minimum=1, maximum=10_000)
    height = req.query_int("height", None, minimum=1, maximum=10_000)
    if width is None or height is None:
        raise MatrixError("'width' and 'height' are required positive integers", errcode="M_MISSING_PARAM", status=400)
    method = req.query_str("method", "scale")
    if method not in ("crop", "scale"):
        raise InvalidParam("'method' must be 'crop' or 'scale'")
    chunks, headers, size = await req.hs.media.thumbnail(
        req.params["serverName"], req.params["mediaId"], width, height, method, req.query_bool("animated"), _timeout(req)
    )
    return StreamResponse(chunks, headers, length=size)


async def preview_url(req: Request) -> dict[str, Any]:
    """GET /_matrix/client/v1/media/preview_url"""
    url = req.query_str("url")
    if not url:
        raise MatrixError("'url' is required", errcode="M_MISSING_PARAM", status=400)
    return await req.hs.url_preview.preview(url)


async def legacy_download(req: Request) -> StreamResponse:
    """GET /_matrix/media/v3/download/... (unauthenticated; frozen unless enabled)"""
    if not req.hs.settings.media.legacy_unauthenticated:
        raise NotFound("Media downloads need authentication: use /_matrix/client/v1/media/download")
    return await download(req)


async def legacy_thumbnail(req: Request) -> StreamResponse:
    """GET /_matrix/media/v3/thumbnail/... (unauthenticated; frozen unless enabled)"""
    if not req.hs.settings.media.legacy_unauthenticated:
        raise NotFound("Thumbnails need authentication: use /_matrix/client/v1/media/thumbnail")
    return await thumbnail(req)


def register(routes: RouteTable) -> None:
    routes.add("POST", MEDIA_V3 + "/upload", upload)
    routes.add("PUT", MEDIA_V3 + "/upload/{serverName}/{mediaId}", upload_to)
    routes.add("POST", "/_matrix/media/v1/create", create)
    routes.add("GET", AUTHED + "/config", config)
    routes.add("GET", AUTHED + "/download/{serverName}/{mediaId}", download)
    routes.add("GET", AUTHED + "/download/{serverName}/{mediaId}/{fileName}", download)
    routes.add("GET", AUTHED + "/thumbnail/{serverName}/{mediaId}", thumbnail)
    routes.add("GET", AUTHED + "/preview_url", preview_url)
    routes.add("GET", MEDIA_V3 + "/config", config)
    routes.add("GET", MEDIA_V3 + "/preview_url", preview_url)
    routes.add("GET", MEDIA_V3 + "/download/{serverName}/{mediaId}", legacy_download, auth=False)
    routes.add("GET", MEDIA_V3 + "/download/{serverName}/{mediaId}/{fileName}", legacy_download, auth=False)
    routes.add("GET", MEDIA_V3 + "/thumbnail/{serverName}/{mediaId}", legacy_thumbnail, auth=False)
