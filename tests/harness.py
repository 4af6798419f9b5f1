"""Test harness: start real Bastion processes and talk to them over HTTP.

Servers are started exactly as operators start them — ``bastion init`` writes the
config, ``bastion serve`` runs it — with overrides merged into the YAML. Password
hashing is made cheap (argon2id with small memory) so tests can log in often; the
algorithm and code path are the production ones.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import socket
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import yaml

REPO = Path(__file__).resolve().parent.parent


_handed_out: set[int] = set()


def _ephemeral_range() -> tuple[int, int]:
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 32768, 60999


def free_port(count: int = 1) -> int:
    """The first of ``count`` consecutive ports that are free now.

    Chosen below the kernel's ephemeral range: a port handed out by ``bind(0)`` lies
    inside it, where any outgoing connection (a client, the Redis or PostgreSQL
    driver) may take it before the server under test binds — and a block of ports
    (worker *i* serves metrics on ``port + i``) is not free just because its first
    port is. Ports are not handed out twice in one test process.
    """
    low, high = 20000, _ephemeral_range()[0] - 1
    if high - low < 1000:  # an unusual kernel setting: fall back to the kernel's choice
        low, high = 1025, 65535
    for _ in range(500):
        start = random.randrange(low, high - count)
        block = range(start, start + count)
        if _handed_out.intersection(block):
            continue
        try:
            for port in block:
                with socket.socket() as s:
                    s.bind(("127.0.0.1", port))
        except OSError:
            continue
        _handed_out.update(block)
        return start
    raise RuntimeError(f"no block of {count} free ports found")


class TestDatabase:
    """SQLite files, or fresh PostgreSQL databases created on an admin connection."""

    __test__ = False

    def __init__(self, spec: str) -> None:
        self.spec = spec
        self.is_postgres = spec.startswith("postgres")
        self._created: list[str] = []

    def new_url(self, directory: Path) -> str:
        if not self.is_postgres:
            return f"sqlite:///{directory / 'bastion.db'}"
        import psycopg

        name = "bastion_t_" + uuid.uuid4().hex[:12]
        with psycopg.connect(self.spec, autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        self._created.append(name)
        base, _, _ = self.spec.rpartition("/")
        return f"{base}/{name}"

    def cleanup(self) -> None:
        if not self.is_postgres:
            return
        import psycopg

        with psycopg.connect(self.spec, autocommit=True) as conn:
            for name in self._created:
                try:
                    conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
                except psycopg.Error:
                    pass


def _merge(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


@dataclass
class ServerProcess:
    directory: Path
    config_path: Path
    port: int
    database_url: str
    server_name: str
    process: subprocess.Popen[bytes] | None = None
    log_path: Path = field(default_factory=Path)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        log = open(self.log_path, "ab")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "bastion", "serve", "--config", str(self.config_path)],
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=self.directory,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited with {self.process.returncode}:\n{self.log()}")
            try:
                if httpx.get(self.base_url + "/health", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
        raise RuntimeError(f"server did not become healthy:\n{self.log()}")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20) -> int | None:
        if self.process is None or self.process.poll() is not None:
            return self.process.returncode if self.process else None
        self.process.send_signal(sig)
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            return self.process.wait()

    def kill(self) -> None:
        self.stop(signal.SIGKILL)

    def restart(self) -> None:
        self.stop()
        self.start()

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-6000:]
        except OSError:
            return ""

    def cli(self, *args: str, input: str | None = None) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "bastion", *args, "--config", str(self.config_path)],
            capture_output=True,
            text=True,
            input=input,
            cwd=self.directory,
            timeout=60,
        )

    def client(self) -> MatrixHttp:
        return MatrixHttp(self.base_url, self.server_name)


def start_server(directory: Path, db: TestDatabase, workers: int | None = None, **overrides: Any) -> ServerProcess:
    """``bastion init`` + ``bastion serve``; with ``workers`` > 1 (default: BASTION_TEST_WORKERS)
    a :class:`ClusterProcess` of that many workers, Redis and nginx."""
    directory.mkdir(parents=True, exist_ok=True)
    port = free_port()
    url = db.new_url(directory)
    config_path = directory / "bastion.yaml"
    server_name = overrides.pop("server_name", "localhost")
    subprocess.run(
        [
            sys.executable, "-m", "bastion", "init", "--config", str(config_path),
            "--server-name", server_name, "--data-dir", str(directory / "data"),
            "--port", str(port), "--database-url", url,
        ],
        check=True,
        capture_output=True,
    )
    config = yaml.safe_load(config_path.read_text())
    defaults = {
        "registration": {"enabled": True, "require_token": False},
        "password_hashing": {"time_cost": 1, "memory_kib": 1024, "parallelism": 1},
        "logging": {"level": "INFO"},
        "shutdown_grace_seconds": 5,
    }
    workers = cluster_workers() if workers is None else workers
    if workers > 1:
        defaults["trusted_proxies"] = ["127.0.0.1/32"]
    config = _merge(_merge(config, defaults), overrides)
    if workers > 1:
        if not db.is_postgres:
            raise RuntimeError("BASTION_TEST_WORKERS > 1 needs BASTION_TEST_DATABASE=postgresql://...")
        cluster = ClusterProcess(directory, config_path, port, url, server_name, log_path=directory / "server.log")
        cluster.setup(config, workers)
        cluster.start()
        return cluster
    config_path.write_text(yaml.safe_dump(config))
    srv = ServerProcess(directory, config_path, port, url, server_name, log_path=directory / "server.log")
    srv.start()
    return srv


def metric_total(metrics_port: int, name: str, workers: int = 1) -> float:
    """An unlabelled metric summed over the workers' metrics listeners (worker i serves
    on ``metrics_port + i``)."""
    total = 0.0
    for i in range(workers):
        for line in httpx.get(f"http://127.0.0.1:{metrics_port + i}/metrics").text.splitlines():
            if line.startswith(name + " "):
                total += float(line.split()[1])
    return total


def cluster_workers() -> int:
    """``BASTION_TEST_WORKERS=3`` runs every test server as 3 workers + Redis + nginx."""
    return int(os.environ.get("BASTION_TEST_WORKERS", "1") or "1")


# The nginx in front of the workers: one template, shared with the benchmarks; it
# includes the production proxy snippet, so the suite runs through those settings.
NGINX_TEMPLATE = REPO / "deploy" / "nginx" / "local-cluster.conf.in"
NGINX_PROXY_CONF = REPO / "deploy" / "nginx" / "bastion-proxy.conf"


class ClusterProcess(ServerProcess):
    """Several ``bastion serve`` workers on one PostgreSQL, with Redis and nginx in front.

    nginx round-robins every *request* over the workers, so each client's requests
    land on different workers all the time — stricter than spreading clients. ``port``
    (and so ``base_url``) is nginx's; ``process`` is the first worker.
    """

    worker_ports: list[int]
    worker_procs: list[subprocess.Popen[bytes] | None]
    redis_port: int
    redis_proc: subprocess.Popen[bytes] | None = None
    nginx_proc: subprocess.Popen[bytes] | None = None

    def setup(self, config: dict[str, Any], workers: int) -> None:
        self.worker_ports = [free_port() for _ in range(workers)]
        self.worker_procs = [None] * workers
        self.redis_port = free_port()
        config = _merge(config, {"redis": {"url": f"redis://127.0.0.1:{self.redis_port}/0"}})
        self.config_path.write_text(yaml.safe_dump(config))
        tmp = self.directory / "nginx-tmp"
        tmp.mkdir(exist_ok=True)
        servers = "\n".join(f"        server 127.0.0.1:{p} max_fails=0;" for p in self.worker_ports)
        (self.directory / "nginx.conf").write_text(NGINX_TEMPLATE.read_text().format(
            user="user root;\n" if os.geteuid() == 0 else "", dir=self.directory, servers=servers, port=self.port,
            proxy_conf=NGINX_PROXY_CONF,
        ))

    def _spawn_worker(self, index: int) -> None:
        log = open(self.log_path, "ab")
        self.worker_procs[index] = subprocess.Popen(
            [sys.executable, "-m", "bastion", "serve", "--config", str(self.config_path),
             "--port", str(self.worker_ports[index]), "--worker-index", str(index)],
            stdout=log, stderr=subprocess.STDOUT, cwd=self.directory, env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )

    def _wait_healthy(self, url: str, proc: subprocess.Popen[bytes] | None) -> None:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if proc is not None and proc.poll() is not None:
                raise RuntimeError(f"process exited with {proc.returncode}:\n{self.log()}")
            try:
                if httpx.get(url, timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
        raise RuntimeError(f"{url} did not become healthy:\n{self.log()}")

    def start_redis(self) -> None:
        if self.redis_proc is None or self.redis_proc.poll() is not None:
            self.redis_proc = subprocess.Popen(
                ["redis-server", "--port", str(self.redis_port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            )
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                with socket.socket() as sock:
                    if sock.connect_ex(("127.0.0.1", self.redis_port)) == 0:
                        return
                time.sleep(0.02)
            raise RuntimeError("redis-server did not start")

    def stop_redis(self) -> None:
        if self.redis_proc is not None and self.redis_proc.poll() is None:
            self.redis_proc.terminate()
            self.redis_proc.wait(10)

    def start_worker(self, index: int) -> None:
        self._spawn_worker(index)
        self._wait_healthy(f"http://127.0.0.1:{self.worker_ports[index]}/health", self.worker_procs[index])

    def kill_worker(self, index: int) -> None:
        proc = self.worker_procs[index]
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()

    def start(self) -> None:
        self.start_redis()
        # The first worker migrates the database; the others start once it is up.
        self.start_worker(0)
        for index in range(1, len(self.worker_ports)):
            self._spawn_worker(index)
        for index in range(1, len(self.worker_ports)):
            self._wait_healthy(f"http://127.0.0.1:{self.worker_ports[index]}/health", self.worker_procs[index])
        self.process = self.worker_procs[0]
        if self.nginx_proc is None or self.nginx_proc.poll() is not None:
            self.nginx_proc = subprocess.Popen(
                ["nginx", "-p", str(self.directory), "-c", str(self.directory / "nginx.conf")],
                stdout=subprocess.DEVNULL, stderr=open(self.directory / "nginx-error.log", "ab"),
            )
        self._wait_healthy(self.base_url + "/health", self.nginx_proc)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20) -> int | None:
        codes = []
        for proc in self.worker_procs:
            if proc is not None and proc.poll() is None:
                proc.send_signal(sig)
        for proc in self.worker_procs:
            if proc is None:
                continue
            try:
                codes.append(proc.wait(timeout))
            except subprocess.TimeoutExpired:
                proc.kill()
                codes.append(proc.wait())
        if self.nginx_proc is not None and self.nginx_proc.poll() is None:
            self.nginx_proc.terminate()
            self.nginx_proc.wait(10)
        self.stop_redis()
        return next((c for c in codes if c), codes[0] if codes else None)


class MatrixError(Exception):
    def __init__(self, status: int, body: Any) -> None:
        super().__init__(f"{status}: {body}")
        self.status = status
        self.body = body

    @property
    def errcode(self) -> str | None:
        return self.body.get("errcode") if isinstance(self.body, dict) else None


class MatrixHttp:
    """A tiny synchronous Matrix client over httpx for tests that need raw HTTP."""

    def __init__(self, base_url: str, server_name: str, token: str | None = None) -> None:
        self.base_url = base_url
        self.server_name = server_name
        self.token = token
        self.user_id: str | None = None
        self.device_id: str | None = None
        self.password: str | None = None
        self._http = httpx.Client(base_url=base_url, timeout=60)

    def raw(self, method: str, path: str, *, json: Any = None, content: bytes | None = None,
            params: dict[str, Any] | None = None, token: bool = True, headers: dict[str, str] | None = None) -> httpx.Response:
        hdrs = dict(headers or {})
        if token and self.token:
            hdrs["Authorization"] = f"Bearer {self.token}"
        return self._http.request(method, path, json=json, content=content, params=params, headers=hdrs)

    def call(self, method: str, path: str, json: Any = None, **kwargs: Any) -> Any:
        resp = self.raw(method, path, json=json, **kwargs)
        try:
            body = resp.json()
        except ValueError:
            body = resp.text
        if resp.status_code != 200:
            raise MatrixError(resp.status_code, body)
        return body

    def register(self, username: str | None = None, password: str = "correct horse battery") -> MatrixHttp:
        username = username or "u" + uuid.uuid4().hex[:10]
        first = self.raw("POST", "/_matrix/client/v3/register", json={"username": username, "password": password}, token=False)
        assert first.status_code == 401, first.text
        session = first.json()["session"]
        body = self.call(
            "POST",
            "/_matrix/client/v3/register",
            {"username": username, "password": password, "auth": {"type": "m.login.dummy", "session": session}},
            token=False,
        )
        self.token = body["access_token"]
        self.user_id = body["user_id"]
        self.device_id = body["device_id"]
        self.password = password
        return self

    def new_user(self, username: str | None = None) -> MatrixHttp:
        return MatrixHttp(self.base_url, self.server_name).register(username)

    def create_room(self, **body: Any) -> str:
        return self.call("POST", "/_matrix/client/v3/createRoom", body)["room_id"]

    def send(self, room_id: str, body: str | dict[str, Any], event_type: str = "m.room.message", txn: str | None = None) -> str:
        content = {"msgtype": "m.text", "body": body} if isinstance(body, str) else body
        txn = txn or uuid.uuid4().hex
        return self.call("PUT", f"/_matrix/client/v3/rooms/{room_id}/send/{event_type}/{txn}", content)["event_id"]

    def sync(self, since: str | None = None, timeout: int = 0, **params: Any) -> dict[str, Any]:
        query = {"timeout": timeout, **params}
        if since:
            query["since"] = since
        return self.call("GET", "/_matrix/client/v3/sync", params=query)

    def join(self, room_id: str) -> None:
        self.call("POST", f"/_matrix/client/v3/join/{room_id}", {})

    def invite(self, room_id: str, user_id: str) -> None:
        self.call("POST", f"/_matrix/client/v3/rooms/{room_id}/invite", {"user_id": user_id})

    def close(self) -> None:
        self._http.close()


def hold_reads(db: Any) -> tuple[asyncio.Event, asyncio.Event]:
    """Make the next ``db.read`` run its query at once but return only when ``release``
    is set. Returns (``read_done``: the query has run, ``release``). Later reads pass
    straight through."""
    read_done, release = asyncio.Event(), asyncio.Event()
    real_read = db.read

    async def held_read(fn: Any, *args: Any) -> Any:
        result = await real_read(fn, *args)
        if read_done.is_set():
            return result
        read_done.set()
        await release.wait()
        return result

    db.read = held_read  # type: ignore[method-assign]
    return read_done, release
