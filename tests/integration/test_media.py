"""The media repository over HTTP: uploads, downloads, thumbnails, limits, hostile input."""

from __future__ import annotations

import asyncio
import io
import os
import sqlite3
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest
import yaml
from PIL import Image, PngImagePlugin

from tests.harness import MatrixHttp, ServerProcess, free_port
from tests.integration.test_encryption_at_rest import keys_status


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


def test_concurrent_thumbnail_requests_right_after_upload_agree(user: MatrixHttp) -> None:
    """Clients asking at once for a size the background pass is also making all get it."""
    mid = media_id(upload(user, png(1600, 1200, (10, 120, 200))).json()["content_uri"])
    from concurrent.futures import ThreadPoolExecutor

    def fetch(_: int) -> tuple[int, bytes]:
        resp = user.raw("GET", f"/_matrix/client/v1/media/thumbnail/localhost/{mid}",
                        params={"width": 320, "height": 240, "method": "scale"})
        return resp.status_code, resp.content

    with ThreadPoolExecutor(6) as pool:
        results = list(pool.map(fetch, range(6)))
    assert [status for status, _ in results] == [200] * 6
    assert len({body for _, body in results}) == 1
    assert Image.open(io.BytesIO(results[0][1])).size == (320, 240)


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
    upload(user, b"older")
    assert admin.call("POST", "/_synapse/admin/v1/media/delete", params={"before_ts": int(time.time() * 1000) + 1000, "size_gt": 3})["total"] == 1
    # A bound beyond what a database integer holds means "everything", not a 500.
    assert admin.call("POST", "/_synapse/admin/v1/media/delete", params={"before_ts": 10**20, "size_gt": 0})["total"] == 1
    assert admin.call("POST", "/_synapse/admin/v1/media/delete", params={"before_ts": 10**20, "size_gt": 10**20})["total"] == 0


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


# -- encryption at rest ---------------------------------------------------------------------------

ENCRYPTED_MAGIC = b"\xbaM"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
JPEG_MAGIC = b"\xff\xd8\xff"
THUMBNAIL_COUNT = 5  # sizes pregenerated for an image larger than all of them


def media_root(srv: ServerProcess) -> Path:
    """Where the server keeps media files: media.store_path, else <data_dir>/media."""
    config = yaml.safe_load(srv.config_path.read_text())
    store = (config.get("media") or {}).get("store_path")
    return Path(store) if store else Path(config["data_dir"]) / "media"


def stored_file(srv: ServerProcess, mid: str, name: str = "original") -> Path:
    return media_root(srv) / mid[:2] / mid[2:4] / mid / name


def stored_files(srv: ServerProcess) -> list[Path]:
    return [p for p in media_root(srv).rglob("*") if p.is_file()]


def find(paths: list[Path], needles: dict[str, bytes]) -> dict[str, list[str]]:
    """Which needles occur in which files, scanning every byte of every file."""
    found: dict[str, list[str]] = {}
    for path in paths:
        data = path.read_bytes()
        for label, needle in needles.items():
            if needle in data:
                found.setdefault(label, []).append(str(path))
    return found


def database_files(srv: ServerProcess) -> list[Path]:
    if not srv.database_url.startswith("sqlite"):
        return []
    db = Path(srv.database_url.removeprefix("sqlite:///"))
    return [p for p in (db, Path(f"{db}-wal")) if p.exists()]


def media_columns(srv: ServerProcess, mid: str) -> tuple[str | None, str | None]:
    """(upload_name, sha256) as stored in the database."""
    sql = "SELECT upload_name, sha256 FROM media WHERE media_id = "
    if srv.database_url.startswith("sqlite"):
        with sqlite3.connect(srv.database_url.removeprefix("sqlite:///")) as conn:
            row = conn.execute(sql + "?", (mid,)).fetchone()
    else:
        import psycopg

        with psycopg.connect(srv.database_url) as conn:
            row = conn.execute(sql + "%s", (mid,)).fetchone()
    assert row is not None
    return row[0], row[1]


def canary_png(canary: bytes, width: int = 1200, height: int = 900) -> bytes:
    """A real PNG with noise pixels (so the compressed data is distinctive) and the canary as text."""
    image = Image.frombytes("RGB", (width, height), os.urandom(width * height * 3))
    info = PngImagePlugin.PngInfo()
    info.add_text("Comment", canary.decode())
    out = io.BytesIO()
    image.save(out, format="PNG", pnginfo=info)
    return out.getvalue()


def wait_for_thumbnails(srv: ServerProcess, mid: str, count: int = THUMBNAIL_COUNT) -> list[Path]:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        thumbs = list(stored_file(srv, mid, "x").parent.glob("thumb-*"))
        if len(thumbs) >= count:
            return thumbs
        time.sleep(0.1)
    raise AssertionError(f"thumbnails of {mid} were not generated")


def store_canaries(srv: ServerProcess) -> dict[str, bytes]:
    """Upload a text file and a PNG carrying a canary; check they round-trip; return what to look for."""
    user = srv.client().register()
    canary = b"CANARY-" + uuid.uuid4().hex.encode()
    text = canary + b"\n" + b"The board meets on Thursday about the merger.\n" * 2000 + canary
    text_name = f"merger-minutes-{uuid.uuid4().hex[:8]}.txt"
    image = canary_png(canary)
    image_name = f"holiday-{uuid.uuid4().hex[:8]}.png"
    text_id = media_id(upload(user, text, "text/plain", text_name).json()["content_uri"])
    image_id = media_id(upload(user, image, "image/png", image_name).json()["content_uri"])
    got = user.raw("GET", f"/_matrix/client/v1/media/download/localhost/{text_id}")
    assert got.status_code == 200 and got.content == text
    assert text_name in got.headers["content-disposition"]
    got = user.raw("GET", f"/_matrix/client/v1/media/download/localhost/{image_id}")
    assert got.status_code == 200 and got.content == image
    assert image_name in got.headers["content-disposition"]
    wait_for_thumbnails(srv, image_id)
    thumbs = []
    for width, height, method in [(32, 32, "crop"), (320, 240, "scale"), (1000, 800, "scale")]:
        resp = user.raw("GET", f"/_matrix/client/v1/media/thumbnail/localhost/{image_id}",
                        params={"width": width, "height": height, "method": method})
        assert resp.status_code == 200, resp.text
        assert Image.open(io.BytesIO(resp.content)).width <= 1200
        thumbs.append(resp.content)
    # 1000x800 is larger than every pregenerated size: it was made (and stored) on demand
    assert len(list(stored_file(srv, image_id, "x").parent.glob("thumb-*"))) == THUMBNAIL_COUNT + 1
    needles = {
        "canary": canary,
        "text file name": text_name.encode(),
        "image file name": image_name.encode(),
        "text contents": b"The board meets on Thursday",
        "image data": image[len(image) // 2:len(image) // 2 + 64],
        "png signature": PNG_MAGIC,
    }
    for n, thumb in enumerate(thumbs):
        needles[f"thumbnail {n}"] = thumb[len(thumb) // 2:len(thumb) // 2 + 32]
    needles["thumbnail data"] = thumbs[1][len(thumbs[1]) // 2:len(thumbs[1]) // 2 + 32]
    needles["text id"] = text_id.encode()
    needles["image id"] = image_id.encode()
    return needles


def test_media_files_thumbnails_and_names_are_encrypted_at_rest(make_server) -> None:
    srv: ServerProcess = make_server()
    needles = store_canaries(srv)
    text_id, image_id = needles.pop("text id").decode(), needles.pop("image id").decode()
    files = stored_files(srv)
    assert len(files) == 2 + THUMBNAIL_COUNT + 1
    assert all(p.read_bytes()[:2] == ENCRYPTED_MAGIC for p in files), files
    assert find(files, needles) == {}
    # the database keeps no file name and no plaintext digest
    for mid, label in ((text_id, "text file name"), (image_id, "image file name")):
        name, digest = media_columns(srv, mid)
        assert name is not None and name.startswith("enc:1:") and needles[label].decode() not in name
        assert digest is not None and digest.startswith("hmac-sha256:")
    names = {k: v for k, v in needles.items() if k.endswith("file name")}
    assert find(database_files(srv), names) == {}  # SQLite only: a PostgreSQL server has no file to scan


def test_media_stored_in_plaintext_with_encryption_disabled(make_server) -> None:
    """The positive control: the same scan does find the canaries when nothing is encrypted."""
    srv: ServerProcess = make_server(encryption={"enabled": False})
    needles = store_canaries(srv)
    text_id = needles.pop("text id").decode()
    needles.pop("image id")
    files = stored_files(srv)
    found = find(files, needles)
    for label in ("canary", "text contents", "image data", "png signature", "thumbnail 0", "thumbnail 1", "thumbnail 2"):
        assert label in found, label
    name, digest = media_columns(srv, text_id)
    assert name == needles["text file name"].decode()
    assert digest is not None and len(digest) == 64  # a bare SHA-256
    if database_files(srv):
        assert "text file name" in find(database_files(srv), {"text file name": needles["text file name"]})


def flip(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


def assert_integrity_error(resp: httpx.Response) -> None:
    assert resp.status_code == 500, (resp.status_code, resp.content[:200])
    assert resp.json()["errcode"] == "M_UNKNOWN"
    assert "integrity" in resp.json()["error"]


def test_tampered_media_gives_a_clear_error_and_the_server_keeps_serving(make_server) -> None:
    srv: ServerProcess = make_server()
    user = srv.client().register()
    small = b"a small file " * 1000
    big = os.urandom(3 * 1024 * 1024 + 123)
    small_id = media_id(upload(user, small).json()["content_uri"])
    big_id = media_id(upload(user, big).json()["content_uri"])
    plain_id = media_id(upload(user, b"will be swapped for plaintext").json()["content_uri"])
    image_id = media_id(upload(user, png(1200, 900)).json()["content_uri"])
    bystander = media_id(upload(user, b"an innocent bystander").json()["content_uri"])
    wait_for_thumbnails(srv, image_id)
    url = "/_matrix/client/v1/media/download/localhost/"

    # a flipped byte in a small file: nothing is sent but a clear error
    flip(stored_file(srv, small_id), 5000)
    assert_integrity_error(user.raw("GET", url + small_id))

    # a flipped byte late in a large file: the first 256 KiB batches are already on their way,
    # so the transfer is aborted — the client never receives a complete-looking file
    bad_offset = 28 + 40 * (64 * 1024 + 16) + 500  # in chunk 40 of 49 (header 28 bytes, chunks 64 KiB + tag)
    flip(stored_file(srv, big_id), bad_offset)
    received = bytearray()
    auth = {"Authorization": f"Bearer {user.token}"}
    with pytest.raises((httpx.RemoteProtocolError, httpx.ReadError)), user._http.stream("GET", url + big_id, headers=auth) as resp:
        assert resp.status_code == 200
        assert int(resp.headers["content-length"]) == len(big)
        for piece in resp.iter_raw():
            received += piece
    assert len(received) <= 40 * 64 * 1024 and bytes(received) == big[:len(received)]  # nothing from the bad chunk on

    # a file replaced by plaintext (its header gone) is not served as it is
    stored_file(srv, plain_id).write_bytes(b"will be swapped for plaintext")
    assert_integrity_error(user.raw("GET", url + plain_id))

    # a tampered thumbnail, and a tampered original when a new thumbnail is made from it
    flip(stored_file(srv, image_id, "thumb-32x32-crop"), 40)
    thumb = "/_matrix/client/v1/media/thumbnail/localhost/" + image_id
    assert_integrity_error(user.raw("GET", thumb, params={"width": 32, "height": 32, "method": "crop"}))
    assert user.raw("GET", thumb, params={"width": 320, "height": 240}).status_code == 200
    flip(stored_file(srv, image_id), 30)  # in the first chunk's ciphertext
    assert_integrity_error(user.raw("GET", thumb, params={"width": 1000, "height": 800}))
    assert_integrity_error(user.raw("GET", url + image_id))

    # the server carries on: other media, new uploads, the health check
    assert srv.process is not None and srv.process.poll() is None
    got = user.raw("GET", url + bystander)
    assert got.status_code == 200 and got.content == b"an innocent bystander"
    fresh = media_id(upload(user, b"after the storm").json()["content_uri"])
    assert user.raw("GET", url + fresh).content == b"after the storm"
    assert httpx.get(srv.base_url + "/health").status_code == 200
    log = srv.log()
    assert f"media file {small_id} failed its integrity check" in log
    assert f"media file {big_id} failed its integrity check part-way through" in log


def test_files_from_before_encryption_are_still_served(make_server) -> None:
    srv: ServerProcess = make_server(encryption={"enabled": False})
    user = srv.client().register()
    old = b"written while encryption was off"
    old_id = media_id(upload(user, old, "text/plain", "old.txt").json()["content_uri"])
    image = png(1200, 900)
    image_id = media_id(upload(user, image).json()["content_uri"])
    wait_for_thumbnails(srv, image_id)
    srv.stop()
    config = yaml.safe_load(srv.config_path.read_text())
    config["encryption"]["enabled"] = True
    srv.config_path.write_text(yaml.safe_dump(config))
    srv.start()
    url = "/_matrix/client/v1/media/download/localhost/"
    got = user.raw("GET", url + old_id)
    assert got.status_code == 200 and got.content == old and "old.txt" in got.headers["content-disposition"]
    assert user.raw("GET", url + image_id).content == image
    thumb = "/_matrix/client/v1/media/thumbnail/localhost/" + image_id
    assert user.raw("GET", thumb, params={"width": 320, "height": 240}).status_code == 200  # an old plaintext thumbnail
    made = user.raw("GET", thumb, params={"width": 1000, "height": 800})  # a new one, from the plaintext original
    assert made.status_code == 200 and Image.open(io.BytesIO(made.content)).width <= 1200
    assert stored_file(srv, image_id, "thumb-1000x800-scale").read_bytes()[:2] == ENCRYPTED_MAGIC
    assert stored_file(srv, old_id).read_bytes() == old
    new_id = media_id(upload(user, b"written with encryption on").json()["content_uri"])
    assert stored_file(srv, new_id).read_bytes()[:2] == ENCRYPTED_MAGIC
    assert user.raw("GET", url + new_id).content == b"written with encryption on"


# -- key rotation ---------------------------------------------------------------------------------


def header_dek_id(path: Path) -> int | None:
    """The data key a stored file's header names (None: no header, plaintext)."""
    head = path.read_bytes()[:28]
    return int.from_bytes(head[4:12], "big") if head[:2] == ENCRYPTED_MAGIC else None


def media_status(srv: ServerProcess) -> dict:
    return next(c for c in keys_status(srv)["columns"] if c["column"] == "media files")


def served(user: MatrixHttp, mid: str, thumbnails: list[tuple[int, int, str]]) -> list[bytes]:
    """The original and the given thumbnails as a client gets them."""
    out = []
    got = user.raw("GET", f"/_matrix/client/v1/media/download/localhost/{mid}")
    assert got.status_code == 200, got.text
    out.append(got.content)
    for width, height, method in thumbnails:
        got = user.raw("GET", f"/_matrix/client/v1/media/thumbnail/localhost/{mid}",
                       params={"width": width, "height": height, "method": method})
        assert got.status_code == 200, got.text
        out.append(got.content)
    return out


SIZES = [(32, 32, "crop"), (96, 96, "crop"), (320, 240, "scale"), (640, 480, "scale"), (800, 600, "scale"), (1000, 800, "scale")]


def test_rotating_a_users_key_reencrypts_their_files_and_thumbnails(make_server) -> None:
    """``bastion keys rotate --user`` while the server runs: every file of the user (multi-
    chunk original, thumbnails) ends up under the new key version, byte-identical to
    clients; another user's files are untouched; a tampered file is reported and left."""
    srv: ServerProcess = make_server()
    alice, bob = srv.client().register(), srv.client().register()
    big = os.urandom(700 * 1024 + 5)  # eleven 64 KiB chunks, more than one 256 KiB batch
    big_id = media_id(upload(alice, big).json()["content_uri"])
    image_id = media_id(upload(alice, canary_png(b"rotation")).json()["content_uri"])
    wait_for_thumbnails(srv, image_id)
    bob_id = media_id(upload(bob, b"bob's file, bob's key").json()["content_uri"])
    before = served(alice, image_id, SIZES)  # the last size is made on demand: six thumbnails
    alice_files = [stored_file(srv, big_id), *stored_file(srv, image_id, "x").parent.iterdir()]
    assert len(alice_files) == 2 + THUMBNAIL_COUNT + 1
    old_keys = {header_dek_id(p) for p in alice_files}
    assert len(old_keys) == 1 and None not in old_keys
    bob_before = stored_file(srv, bob_id).read_bytes()
    digests_before = {mid: media_columns(srv, mid)[1] for mid in (big_id, image_id, bob_id)}

    # Clients keep downloading while the files are replaced under them.
    stop = threading.Event()
    downloads: list[bool] = []

    def download_loop() -> None:
        reader = alice  # the main thread waits on the CLI meanwhile
        while not stop.is_set():
            try:
                got = reader.raw("GET", f"/_matrix/client/v1/media/download/localhost/{big_id}")
                downloads.append(got.status_code == 200 and got.content == big)
                downloads.append(served(reader, image_id, SIZES[:3]) == before[:4])
            except Exception:  # a failed download is what this looks for: record it, keep going
                downloads.append(False)

    loop = threading.Thread(target=download_loop)
    loop.start()
    try:
        rotated = srv.cli("keys", "rotate", "--user", alice.user_id)
    finally:
        stop.set()
        loop.join()
    assert rotated.returncode == 0, rotated.stderr
    assert "8 media files re-encrypted" in rotated.stdout, rotated.stdout
    assert downloads and all(downloads), downloads

    new_keys = {header_dek_id(p) for p in alice_files}
    assert len(new_keys) == 1 and new_keys.isdisjoint(old_keys), (old_keys, new_keys)
    (new_key,) = new_keys
    for mid in (big_id, image_id):
        digest = media_columns(srv, mid)[1]
        assert digest is not None and digest.startswith(f"hmac-sha256:{new_key}:"), digest
        assert digest != digests_before[mid]
    assert stored_file(srv, bob_id).read_bytes() == bob_before
    assert media_columns(srv, bob_id)[1] == digests_before[bob_id]
    assert served(alice, image_id, SIZES) == before
    assert alice.raw("GET", f"/_matrix/client/v1/media/download/localhost/{big_id}").content == big
    assert media_status(srv) == {"column": "media files", "rows": 3, "active_key": 3, "old_key": 0,
                                 "plaintext": 0, "unreadable": 0}

    # A tampered file cannot be re-encrypted: the rotation says so, leaves it, does the rest.
    flip(stored_file(srv, bob_id), 40)  # in the sealed chunk (the header is 28 bytes)
    tampered = stored_file(srv, bob_id).read_bytes()
    rotated = srv.cli("keys", "rotate", "--all")
    assert rotated.returncode == 2, rotated.stderr  # done, but not everything
    assert "1 media files failed their integrity check" in rotated.stderr, rotated.stderr
    assert bob_id in rotated.stderr
    assert "8 media files re-encrypted" in rotated.stdout, rotated.stdout
    assert stored_file(srv, bob_id).read_bytes() == tampered
    assert {header_dek_id(p) for p in alice_files}.isdisjoint({new_key})
    assert served(alice, image_id, SIZES) == before
    assert media_status(srv) == {"column": "media files", "rows": 3, "active_key": 2, "old_key": 1,
                                 "plaintext": 0, "unreadable": 0}


def test_rotation_encrypts_files_written_while_encryption_was_off(make_server) -> None:
    srv: ServerProcess = make_server(encryption={"enabled": False})
    user = srv.client().register()
    text = b"written while encryption was off\n" * 30_000  # ~1 MiB
    text_id = media_id(upload(user, text, "text/plain", "old.txt").json()["content_uri"])
    image_id = media_id(upload(user, canary_png(b"plaintext")).json()["content_uri"])
    wait_for_thumbnails(srv, image_id)
    altered_id = media_id(upload(user, b"this file will be changed on disk").json()["content_uri"])
    altered_image_id = media_id(upload(user, canary_png(b"altered")).json()["content_uri"])
    altered_thumbnails = wait_for_thumbnails(srv, altered_image_id)
    before = served(user, image_id, SIZES[:THUMBNAIL_COUNT])
    stored_file(srv, altered_id).write_bytes(b"this file WAS changed on disk")
    with stored_file(srv, altered_image_id).open("ab") as fh:
        fh.write(b"appended")
    srv.stop()
    config = yaml.safe_load(srv.config_path.read_text())
    config["encryption"]["enabled"] = True
    srv.config_path.write_text(yaml.safe_dump(config))
    srv.start()
    assert media_status(srv)["plaintext"] == 4

    rotated = srv.cli("keys", "rotate", "--all")
    assert rotated.returncode == 2, rotated.stderr
    assert "7 media files re-encrypted" in rotated.stdout, rotated.stdout  # 2 originals, 5 thumbnails
    assert "2 media files failed their integrity check" in rotated.stderr, rotated.stderr
    assert rotated.stderr.count("does not match its stored SHA-256") >= 2, rotated.stderr

    files = [stored_file(srv, text_id), *stored_file(srv, image_id, "x").parent.iterdir()]
    assert all(p.read_bytes()[:2] == ENCRYPTED_MAGIC for p in files), files
    assert find(files, {"text": b"written while encryption was off", "png": PNG_MAGIC}) == {}
    for mid in (text_id, image_id):
        assert (media_columns(srv, mid)[1] or "").startswith("hmac-sha256:")
    got = user.raw("GET", f"/_matrix/client/v1/media/download/localhost/{text_id}")
    assert got.status_code == 200 and got.content == text and "old.txt" in got.headers["content-disposition"]
    assert served(user, image_id, SIZES[:THUMBNAIL_COUNT]) == before
    # The altered files were not sealed as if they were the uploads; they, and the
    # thumbnails of the altered image (nothing to check them against), stay as found.
    assert stored_file(srv, altered_id).read_bytes() == b"this file WAS changed on disk"
    assert stored_file(srv, altered_image_id).read_bytes().endswith(b"appended")
    assert all(p.read_bytes()[:2] != ENCRYPTED_MAGIC for p in altered_thumbnails), altered_thumbnails
    assert media_status(srv) == {"column": "media files", "rows": 4, "active_key": 2, "old_key": 0,
                                 "plaintext": 2, "unreadable": 0}


def test_rotation_refuses_to_run_without_the_media_directory(make_server) -> None:
    """Run where the files are not (another host, a container without the volume), the
    rotation would report every file as missing: it stops before changing any key."""
    srv: ServerProcess = make_server()
    user = srv.client().register()
    mid = media_id(upload(user, b"kept where it is").json()["content_uri"])
    keys_before = keys_status(srv)["deks"]
    root = media_root(srv)
    root.rename(root.with_name("media-elsewhere"))
    try:
        refused = srv.cli("keys", "rotate", "--all")
    finally:
        root.with_name("media-elsewhere").rename(root)
    assert refused.returncode == 1 and "is not here" in refused.stderr, refused.stderr
    assert keys_status(srv)["deks"] == keys_before and keys_status(srv)["rotation_in_progress"] is None
    assert user.raw("GET", f"/_matrix/client/v1/media/download/localhost/{mid}").content == b"kept where it is"


def test_a_rotation_interrupted_among_the_files_resumes(make_server, monkeypatch) -> None:
    """A crash part-way through the files (here: on the second upload of a batch, before
    the batch's cursor is saved) loses nothing; ``bastion keys rotate`` resumes, skips
    what is already under the new key, and finishes the rest."""
    from bastion import keytool
    from bastion.app import media_store_for, open_migrated_database
    from bastion.settings import load_settings

    srv: ServerProcess = make_server()
    user = srv.client().register()
    by_id = {media_id(upload(user, body).json()["content_uri"]): body
             for body in (f"file {n} ".encode() * 5000 for n in range(6))}
    ids = sorted(by_id)  # the order the rotation walks them in
    old_keys = {header_dek_id(stored_file(srv, mid)) for mid in ids}
    assert len(old_keys) == 1

    calls = 0
    real = keytool.reencrypt_upload

    async def crash_on_the_second(db, store, mid):  # type: ignore[no-untyped-def]
        nonlocal calls
        calls += 1
        if calls == 2:
            raise InterruptedError("power cut")
        return await real(db, store, mid)

    monkeypatch.setattr(keytool, "reencrypt_upload", crash_on_the_second)
    settings = load_settings(srv.config_path)
    db = open_migrated_database(settings)
    try:
        job = keytool.start_rotation(db, "user", user.user_id)
        with pytest.raises(InterruptedError):
            keytool.run_rotation(db, job, batch=4, media=media_store_for(settings))
    finally:
        asyncio.run(db.close())
    after_crash = [header_dek_id(stored_file(srv, mid)) for mid in ids]
    assert after_crash[0] not in old_keys and set(after_crash[1:]) == old_keys  # one done, the rest not

    resumed = srv.cli("keys", "rotate")
    assert resumed.returncode == 0, resumed.stderr
    assert "Resuming" in resumed.stdout and "5 media files re-encrypted" in resumed.stdout, resumed.stdout
    assert {header_dek_id(stored_file(srv, mid)) for mid in ids} == {after_crash[0]}
    assert keys_status(srv)["rotation_in_progress"] is None
    for mid, body in by_id.items():
        got = user.raw("GET", f"/_matrix/client/v1/media/download/localhost/{mid}")
        assert got.status_code == 200 and got.content == body
