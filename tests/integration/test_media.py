"""The media repository over HTTP: uploads, downloads, thumbnails, limits, hostile input."""

from __future__ import annotations

import io
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from PIL import Image

from tests.harness import MatrixHttp, ServerProcess, free_port


def png(width: int, height: int, color: tuple[int, int, int] = (200, 30, 30)) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (width, height), color).save(out, format="PNG")
    return out.getvalue()


def upload(user: MatrixHttp, data: bytes, content_type: str = "application/octet-stream", filename: str | None = None):
    params = {"filename": filename} if filename else None
    return user.raw("POST", "/_matrix/media/v3/upload", content=data, params=params, headers={"Content-Type": content_type})


def media_id(uri: str) -> str:
    assert uri.startswith("mxc://localhost/")
    return uri.rsplit("/", 1)[1]


@pytest.fixture
def user(server: ServerProcess) -> MatrixHttp:
    return server.client().register()


def test_upload_download_round_trip_and_headers(user: MatrixHttp, server: ServerProcess) -> None:
    data = png(64, 48)
    resp = upload(user, data, "image/png", "red square.png")
    assert resp.status_code == 200, resp.text
    mid = media_id(resp.json()["content_uri"])
    other = server.client().register()
    got = other.raw("GET", f"/_matrix/client/v1/media/download/localhost/{mid}")
    assert got.status_code == 200 and got.content == data
    assert got.headers["content-type"] == "image/png"
    assert got.headers["content-disposition"].startswith("inline")
    assert "filename*=utf-8''red%20square.png" in got.headers["content-disposition"]
    assert got.headers["content-security-policy"].startswith("sandbox")
    assert got.headers["x-content-type-options"] == "nosniff"
    assert got.headers["cross-origin-resource-policy"] == "cross-origin"
    named = other.raw("GET", f"/_matrix/client/v1/media/download/localhost/{mid}/other.png")
    assert "other.png" in named.headers["content-disposition"]
    assert server.client().raw("GET", f"/_matrix/client/v1/media/download/localhost/{mid}").status_code == 401
    # the legacy unauthenticated endpoint is frozen
    legacy = server.client().raw("GET", f"/_matrix/media/v3/download/localhost/{mid}")
    assert legacy.status_code == 404
    assert user.call("GET", "/_matrix/client/v1/media/config")["m.upload.size"] > 0


def test_large_file_streams(user: MatrixHttp) -> None:
    data = bytes(range(256)) * (5 * 1024 * 1024 // 256)  # 5 MiB
    mid = media_id(upload(user, data).json()["content_uri"])
    got = user.raw("GET", f"/_matrix/client/v1/media/download/localhost/{mid}")
    assert got.content == data
    assert got.headers["content-disposition"].startswith("attachment")


def test_hostile_content_is_served_as_attachment(user: MatrixHttp) -> None:
    html = b"<!DOCTYPE html><html><body><script>alert(document.cookie)</script></body></html>"
    mid = media_id(upload(user, html, "image/png").json()["content_uri"])  # lies about its type
    got = user.raw("GET", f"/_matrix/client/v1/media/download/localhost/{mid}")
    assert got.headers["content-type"] == "text/html"
    assert got.headers["content-disposition"].startswith("attachment")
    svg = b'<?xml version="1.0"?><svg xmlns="http://www.w3.org/2000/svg"><script>alert(1)</script></svg>'
    mid = media_id(upload(user, svg, "image/svg+xml").json()["content_uri"])
    got = user.raw("GET", f"/_matrix/client/v1/media/download/localhost/{mid}")
    assert got.headers["content-type"] == "image/svg+xml"
    assert got.headers["content-disposition"].startswith("attachment")
    text = b"just words"
    mid = media_id(upload(user, text, "image/jpeg").json()["content_uri"])
    assert user.raw("GET", f"/_matrix/client/v1/media/download/localhost/{mid}").headers["content-type"] == "application/octet-stream"


def test_path_traversal_and_bad_ids(user: MatrixHttp) -> None:
    for path in [
        "/_matrix/client/v1/media/download/localhost/..%2F..%2Fetc%2Fpasswd",
        "/_matrix/client/v1/media/download/localhost/abc.def",
        "/_matrix/client/v1/media/download/127.0.0.1/abcdef",
        "/_matrix/client/v1/media/download/localhost/%2e%2e",
        "/_matrix/client/v1/media/thumbnail/localhost/..%5C..%5Cx?width=32&height=32",
    ]:
        resp = user.raw("GET", path)
        assert resp.status_code == 404, (path, resp.status_code)
        assert resp.json()["errcode"] == "M_NOT_FOUND"


def test_thumbnails(user: MatrixHttp) -> None:
    mid = media_id(upload(user, png(1200, 900)).json()["content_uri"])
    time.sleep(0.5)
    for width, height, method in [(32, 32, "crop"), (320, 240, "scale"), (100, 100, "scale"), (500, 200, "crop")]:
        resp = user.raw("GET", f"/_matrix/client/v1/media/thumbnail/localhost/{mid}",
                        params={"width": width, "height": height, "method": method})
        assert resp.status_code == 200, resp.text
        image = Image.open(io.BytesIO(resp.content))
        if method == "crop":
            assert image.size == (width, height)
        else:
            assert image.width >= width or image.height >= height  # never smaller than asked
            assert image.width <= 1200 and image.height <= 900
    small = media_id(upload(user, png(20, 20)).json()["content_uri"])
    resp = user.raw("GET", f"/_matrix/client/v1/media/thumbnail/localhost/{small}", params={"width": 96, "height": 96})
    assert Image.open(io.BytesIO(resp.content)).size == (20, 20)  # never upscaled
    not_image = media_id(upload(user, b"%PDF-1.4 not an image").json()["content_uri"])
    resp = user.raw("GET", f"/_matrix/client/v1/media/thumbnail/localhost/{not_image}", params={"width": 32, "height": 32})
    assert resp.status_code == 400
    resp = user.raw("GET", f"/_matrix/client/v1/media/thumbnail/localhost/{mid}", params={"width": -3, "height": 32})
    assert resp.status_code == 400


def test_decompression_bomb_refused(user: MatrixHttp) -> None:
    # A tiny PNG that claims 20000 x 20000 pixels (400 million).
    buffer = io.BytesIO()
    Image.new("1", (20000, 20000)).save(buffer, format="PNG", optimize=True)
    bomb = buffer.getvalue()
    assert len(bomb) < 2_000_000
    mid = media_id(upload(user, bomb, "image/png").json()["content_uri"])
    resp = user.raw("GET", f"/_matrix/client/v1/media/thumbnail/localhost/{mid}", params={"width": 32, "height": 32})
    assert resp.status_code == 413 and resp.json()["errcode"] == "M_TOO_LARGE"


def test_limits(make_server) -> None:
    srv: ServerProcess = make_server(media={"max_upload_bytes": 100_000, "user_quota_bytes": 250_000, "uploads_per_minute": 5})
    user = srv.client().register()
    resp = upload(user, b"x" * 100_001)
    assert resp.status_code == 413 and resp.json()["errcode"] == "M_TOO_LARGE"
    assert upload(user, b"y" * 90_000).status_code == 200
    assert upload(user, b"z" * 90_000).status_code == 200
    resp = upload(user, b"w" * 90_000)
    assert resp.status_code == 403 and resp.json()["errcode"] == "M_FORBIDDEN"  # quota
    for _ in range(3):
        last = upload(user, b"small")
    assert last.status_code == 429 and last.json()["errcode"] == "M_LIMIT_EXCEEDED"
    assert "retry-after" in last.headers
    # nothing was written for the refused uploads
    media_dir = srv.directory / "data" / "media"
    stored = [p for p in media_dir.rglob("original")]
    # every attempt counts towards the rate (5 a minute): the two 90k files and one small one were stored
    assert len(stored) == 3
    assert not list((media_dir / "tmp").iterdir())


def test_async_upload_create_then_put(user: MatrixHttp, server: ServerProcess) -> None:
    created = user.call("POST", "/_matrix/media/v1/create", {})
    mid = media_id(created["content_uri"])
    assert created["unused_expires_at"] > 0
    resp = user.raw("GET", f"/_matrix/client/v1/media/download/localhost/{mid}", params={"timeout_ms": 200})
    assert resp.status_code == 504 and resp.json()["errcode"] == "M_NOT_YET_UPLOADED"
    result: dict = {}

    def wait_download() -> None:
        result["resp"] = user.raw("GET", f"/_matrix/client/v1/media/download/localhost/{mid}", params={"timeout_ms": 10000})

    waiter = threading.Thread(target=wait_download)
    waiter.start()
    time.sleep(0.3)
    put = user.raw("PUT", f"/_matrix/media/v3/upload/localhost/{mid}", content=b"later", headers={"Content-Type": "text/plain"})
    assert put.status_code == 200
    waiter.join(10)
    assert result["resp"].status_code == 200 and result["resp"].content == b"later"
    again = user.raw("PUT", f"/_matrix/media/v3/upload/localhost/{mid}", content=b"overwrite")
    assert again.status_code == 409 and again.json()["errcode"] == "M_CANNOT_OVERWRITE_MEDIA"
    other = server.client().register()
    theirs = user.call("POST", "/_matrix/media/v1/create", {})
    resp = other.raw("PUT", f"/_matrix/media/v3/upload/localhost/{media_id(theirs['content_uri'])}", content=b"x")
    assert resp.status_code == 403


def test_admin_quarantine_and_delete(make_server) -> None:
    srv: ServerProcess = make_server()
    added = srv.cli("user", "add", "mod", "--admin", "--password-file", "-", input="moderator password\n")
    assert added.returncode == 0
    admin = srv.client()
    admin.token = admin.call("POST", "/_matrix/client/v3/login", {
        "type": "m.login.password", "identifier": {"type": "m.id.user", "user": "mod"}, "password": "moderator password"}, token=False)["access_token"]
    user = srv.client().register()
    mid = media_id(upload(user, b"contraband").json()["content_uri"])
    second = media_id(upload(user, b"more").json()["content_uri"])
    assert user.raw("POST", f"/_synapse/admin/v1/media/quarantine/localhost/{mid}", json={}).status_code == 403
    admin.call("POST", f"/_synapse/admin/v1/media/quarantine/localhost/{mid}", {})
    assert user.raw("GET", f"/_matrix/client/v1/media/download/localhost/{mid}").status_code == 404
    assert admin.call("POST", f"/_synapse/admin/v1/user/{user.user_id}/media/quarantine", {})["num_quarantined"] == 1
    admin.call("POST", f"/_synapse/admin/v1/media/unquarantine/localhost/{second}", {})
    assert user.raw("GET", f"/_matrix/client/v1/media/download/localhost/{second}").status_code == 200
    assert admin.call("DELETE", f"/_synapse/admin/v1/users/{user.user_id}/media")["total"] == 2
    assert user.raw("GET", f"/_matrix/client/v1/media/download/localhost/{second}").status_code == 404
    assert not list((srv.directory / "data" / "media").rglob("original"))
    upload(user, b"old")
    assert admin.call("POST", "/_synapse/admin/v1/media/delete", params={"before_ts": int(time.time() * 1000) + 1000})["total"] == 1


class _Page(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        if self.path == "/redirect-to-metadata":
            self.send_response(302)
            self.send_header("Location", "http://169.254.169.254/latest/meta-data/")
            self.end_headers()
            return
        body = b"<html><head><title>Quarterly results</title><meta property='og:description' content='All good'></head></html>"
        self.send_response(200)
        self.send_header("Content-Type", "text/html; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


def test_url_previews_are_off_by_default_and_never_reach_internal_addresses(make_server, server: ServerProcess) -> None:
    user = server.client().register()
    resp = user.raw("GET", "/_matrix/client/v1/media/preview_url", params={"url": "https://example.org"})
    assert resp.status_code == 404
    port = free_port()
    httpd = ThreadingHTTPServer(("127.0.0.1", port), _Page)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        srv: ServerProcess = make_server(url_preview={"enabled": True, "allowed_ports": [80, 443, port],
                                                      "allowed_networks": ["127.0.0.1/32"]})
        viewer = srv.client().register()
        ok = viewer.call("GET", "/_matrix/client/v1/media/preview_url", params={"url": f"http://127.0.0.1:{port}/page"})
        assert ok["og:title"] == "Quarterly results" and ok["og:description"] == "All good"
        for url in [
            "http://169.254.169.254/latest/meta-data/",
            f"http://127.0.0.2:{port}/",  # loopback outside the operator's exception
            "http://[::1]/",  # IPv6 loopback: not in the exception
            "http://10.1.2.3/",
            f"http://127.0.0.1:{port}/redirect-to-metadata",  # a redirect is checked again
            "file:///etc/passwd",
            "http://127.0.0.1:22/",
        ]:
            resp = viewer.raw("GET", "/_matrix/client/v1/media/preview_url", params={"url": url})
            assert resp.status_code in (400, 403), (url, resp.status_code, resp.text)
        # an allowed address that does not answer is a gateway error, not a server error
        resp = viewer.raw("GET", "/_matrix/client/v1/media/preview_url", params={"url": f"http://127.0.0.1:{free_port()}/"})
        assert resp.status_code in (403, 502)
    finally:
        httpd.shutdown()
