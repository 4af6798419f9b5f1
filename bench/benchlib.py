"""Shared pieces of the one-command benchmarks: servers to start and stop, reports.

Used by ``encryption_compare.py``, ``todevice_fanout.py``, ``scaleout.py``,
``large_scenario.py`` and ``media_compare.py``. Nothing here is run on its own.

Servers
    :class:`Bastion` — ``bastion init`` + ``bastion serve`` in a temporary directory,
    on SQLite or on a fresh PostgreSQL database, one process or several workers with
    Redis and nginx in front (the layout of ``docs/deployment.md``).
    :class:`Synapse` — Synapse from ``bench/.venv-synapse`` (installed on first use,
    as ``run_synapse.sh`` does), configured by ``synapse_config.py``, on SQLite or
    PostgreSQL.

Both switch presence off unless ``BENCH_PRESENCE=on`` (as ``run_*.sh`` do), open every
rate limit, and honour ``BENCH_NICE`` / ``BENCH_RT`` like ``lib.sh``. Processes are
started by this module and stopped by their recorded PIDs only.

Environment: ``BASTION_PYTHON``, ``SYNAPSE_VENV``, ``SYNAPSE_SPEC``, ``BENCH_PG_URL``
(an administrative PostgreSQL URL whose role may CREATE DATABASE; default
``postgresql://bastion:bastion@localhost/postgres``), ``KEEP_WORKDIR=1``.
"""

from __future__ import annotations

import json
import math
import os
import platform
import re
import secrets
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import yaml

BENCH_DIR = Path(__file__).resolve().parent
REPO_DIR = BENCH_DIR.parent
sys.path.insert(0, str(BENCH_DIR))

from loadgen import machine_busy_seconds, process_cpu_seconds, process_memory_kib  # noqa: E402

BASTION_PYTHON = os.environ.get("BASTION_PYTHON", str(REPO_DIR / ".venv" / "bin" / "python"))
SYNAPSE_VENV = Path(os.environ.get("SYNAPSE_VENV", str(BENCH_DIR / ".venv-synapse")))
SYNAPSE_SPEC = os.environ.get("SYNAPSE_SPEC", "matrix-synapse==1.163.2")
PG_ADMIN_URL = os.environ.get("BENCH_PG_URL", "postgresql://bastion:bastion@localhost/postgres")
PRESENCE = os.environ.get("BENCH_PRESENCE", "off") == "on"
# Bastion's password hashing made cheap where only a set-up logs in (no measured request
# checks a password): large_scenario.py's 2,000 registrations, request_costs.py's logins.
CHEAP_PASSWORD_HASHING = {"time_cost": 1, "memory_kib": 8192, "parallelism": 1}

__all__ = [
    "BENCH_DIR",
    "CHEAP_PASSWORD_HASHING",
    "Bastion",
    "PgDatabase",
    "Server",
    "Synapse",
    "machine_busy_seconds",
    "process_cpu_seconds",
    "process_memory_kib",
]


# -- small helpers -----------------------------------------------------------------------------


def log(message: str) -> None:
    name = Path(sys.argv[0]).name
    print(f"[{name} {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def prio_server() -> list[str]:
    """The command prefix for servers: ``chrt -r 1`` with BENCH_RT=1, ``nice`` with BENCH_NICE."""
    if os.environ.get("BENCH_RT"):
        return ["chrt", "-r", "1"]
    if os.environ.get("BENCH_NICE"):
        return ["nice", "-n", os.environ["BENCH_NICE"]]
    return []


def prio_client() -> list[str]:
    if os.environ.get("BENCH_RT"):
        return ["chrt", "-r", "2"]
    if os.environ.get("BENCH_NICE"):
        return ["nice", "-n", os.environ["BENCH_NICE"]]
    return []


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def results_dir(name: str, given: Path | None) -> Path:
    """``given``, else $RESULTS_DIR, else bench/results/<name>-<timestamp>/."""
    if given is None:
        env = os.environ.get("RESULTS_DIR")
        given = (
            Path(env) if env else BENCH_DIR / "results" / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}"
        )
    given.mkdir(parents=True, exist_ok=True)
    return given


def machine_info(load_average: bool = True) -> dict[str, Any]:
    model = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_gib = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem_gib = round(int(line.split()[1]) / 1024 / 1024, 1)
    except OSError:
        pass
    return {
        "cpu_model": model,
        "cores": os.cpu_count(),
        "memory_gib": mem_gib,
        "kernel": platform.release(),
        "python": platform.python_version(),
        **({"load_average": [round(x, 2) for x in os.getloadavg()]} if load_average else {}),
    }


def bastion_version() -> str:
    out = subprocess.run(
        [BASTION_PYTHON, "-m", "bastion", "--version"], capture_output=True, text=True
    )
    version = out.stdout.strip().split()[-1] if out.stdout.strip() else "unknown"
    commit = subprocess.run(
        ["git", "-C", str(REPO_DIR), "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    ).stdout.strip()
    dirty = subprocess.run(
        ["git", "-C", str(REPO_DIR), "status", "--porcelain", "--", "src"],
        capture_output=True,
        text=True,
    ).stdout.strip()
    return f"{version}@{commit or 'unknown'}{'+dirty' if dirty else ''}"


def md_table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    def cell(v: Any) -> str:
        if v is None:
            return "n/a"
        if isinstance(v, float):
            return f"{v:g}"
        return str(v)

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def median(values: Iterable[float | None]) -> float | None:
    vals = [v for v in values if v is not None]
    return round(statistics.median(vals), 3) if vals else None


def percentile(sorted_values: Sequence[float], pct: float) -> float | None:
    """Nearest-rank percentile (same rule as loadgen.py)."""
    if not sorted_values:
        return None
    rank = max(1, math.ceil(pct / 100 * len(sorted_values)))
    return sorted_values[rank - 1]


def write_outputs(out_dir: Path, result: dict[str, Any], markdown: str) -> None:
    """result.json and summary.md in ``out_dir``; the markdown also on stdout."""
    result = {**result, "machine": machine_info()}
    (out_dir / "result.json").write_text(json.dumps(result, indent=2) + "\n")
    (out_dir / "summary.md").write_text(markdown)
    sys.stdout.write(markdown)
    sys.stdout.flush()
    log(f"wrote {out_dir / 'result.json'} and {out_dir / 'summary.md'}")


def wait_idle(pids: Sequence[int], max_wait: float = 60.0, threshold: float = 0.05) -> float:
    """Wait until ``pids`` use under ``threshold`` cores over a second; returns seconds waited."""
    t = time.monotonic()
    while time.monotonic() - t < max_wait:
        before = process_cpu_seconds(pids)
        time.sleep(1.0)
        if process_cpu_seconds(pids) - before < threshold:
            break
    return time.monotonic() - t


def reset_peak_rss(pids: Sequence[int]) -> bool:
    """Reset the kernel's peak-RSS counter (VmHWM) of ``pids`` (writes 5 to clear_refs)."""
    ok = True
    for pid in pids:
        try:
            Path(f"/proc/{pid}/clear_refs").write_text("5")
        except OSError:
            ok = False
    return ok


def rss_mib(pids: Sequence[int]) -> float:
    return round(process_memory_kib(pids)["VmRSS"] / 1024, 1)


def _deep_merge(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1) as resp:
            return bool(resp.status == 200)
    except (OSError, urllib.error.URLError):
        return False


def _wait_healthy(url: str, proc: subprocess.Popen[bytes], log_path: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = log_path.read_text(errors="replace")[-4000:] if log_path.exists() else ""
            raise RuntimeError(f"process {proc.args!r} exited with {proc.returncode}:\n{tail}")
        if _healthy(url):
            return
        time.sleep(0.1)
    raise RuntimeError(f"{url} did not answer within {timeout:.0f}s (log: {log_path})")


def _stop(proc: subprocess.Popen[bytes] | None, timeout: float = 20.0) -> None:
    """SIGTERM the process we started (by its PID), SIGKILL after ``timeout``."""
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        log(f"pid {proc.pid} ignored SIGTERM for {timeout:.0f}s; killing it")
        proc.kill()
        proc.wait()


# -- PostgreSQL --------------------------------------------------------------------------------


class PgDatabase:
    """A fresh database on the administrative connection, dropped by :meth:`drop`."""

    def __init__(
        self, prefix: str, c_locale: bool = False, settings: dict[str, str] | None = None
    ) -> None:
        """``settings``: per-database defaults (``ALTER DATABASE ... SET``), e.g.
        ``{"synchronous_commit": "off"}``."""
        import psycopg

        self.name = f"{prefix}_{secrets.token_hex(4)}"
        opts = " TEMPLATE template0 ENCODING 'UTF8' LC_COLLATE 'C' LC_CTYPE 'C'" if c_locale else ""
        with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{self.name}"{opts}')
            for key, value in (settings or {}).items():
                if not re.fullmatch(r"[a-z_]+", key) or not re.fullmatch(r"[A-Za-z0-9_]+", value):
                    raise ValueError(f"unexpected PostgreSQL setting {key}={value}")
                conn.execute(f'ALTER DATABASE "{self.name}" SET {key} = {value}')
        base, _, _ = PG_ADMIN_URL.rpartition("/")
        self.url = f"{base}/{self.name}"

    def backend_pids(self) -> list[int]:
        """PostgreSQL backends connected to this database (their CPU is the database's share)."""
        import psycopg

        with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
            rows = conn.execute(
                "SELECT pid FROM pg_stat_activity WHERE datname = %s", (self.name,)
            ).fetchall()
        return [int(r[0]) for r in rows if Path(f"/proc/{r[0]}").exists()]

    def drop(self) -> None:
        import psycopg

        try:
            with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
                conn.execute(f'DROP DATABASE IF EXISTS "{self.name}" WITH (FORCE)')
        except psycopg.Error as exc:
            log(f"could not drop database {self.name}: {exc}")


# -- servers -----------------------------------------------------------------------------------


class Server:
    """A homeserver started by a benchmark; subclasses fill in start/stop."""

    kind = "server"

    def __init__(self, name: str, work_root: Path) -> None:
        self.name = name
        self.work = Path(tempfile.mkdtemp(prefix=f"{name}-", dir=work_root))
        self.port = free_port()
        self.shared_secret = secrets.token_hex(24)
        self.label = name
        self.db: PgDatabase | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def server_pids(self) -> list[int]:
        raise NotImplementedError

    def aux_pids(self) -> list[int]:
        """Helper processes whose cost is reported apart: nginx, Redis, database backends."""
        return self.db.backend_pids() if self.db is not None else []

    def start(self) -> None:
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError

    def restart(self) -> None:
        self.stop()
        self.start()

    def log_files(self) -> list[Path]:
        return []

    def cleanup(self, results: Path | None = None) -> None:
        """Stop, copy the logs into ``results``, drop the database, remove the work dir."""
        try:
            self.stop()
        finally:
            if results is not None:
                for path in self.log_files():
                    if path.exists():
                        shutil.copy(path, results / f"{self.name}-{path.name}")
            if self.db is not None:
                self.db.drop()
            if os.environ.get("KEEP_WORKDIR"):
                log(f"kept {self.work}")
            else:
                shutil.rmtree(self.work, ignore_errors=True)

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "label": self.label, "base_url": self.base_url}


# The nginx in front of several workers: one template, shared with the test suite.
NGINX_TEMPLATE = REPO_DIR / "deploy" / "nginx" / "local-cluster.conf.in"
NGINX_PROXY_CONF = REPO_DIR / "deploy" / "nginx" / "bastion-proxy.conf"


class Bastion(Server):
    """``bastion init`` + ``bastion serve``.

    ``database``: ``"sqlite"`` (the default from init) or ``"postgresql"`` (a fresh
    database on BENCH_PG_URL). ``workers`` > 1: that many ``bastion serve --port P_i
    --worker-index i`` processes on PostgreSQL, a private ``redis-server`` and nginx
    round-robining over them (``port`` is nginx's). ``overrides`` are merged into the
    YAML written by init.
    """

    kind = "bastion"

    def __init__(
        self,
        name: str,
        work_root: Path,
        *,
        database: str = "sqlite",
        encryption: bool = True,
        workers: int = 1,
        overrides: dict[str, Any] | None = None,
        pg_settings: dict[str, str] | None = None,
    ) -> None:
        super().__init__(name, work_root)
        self.workers = workers
        self.database = database
        self.encryption = encryption
        self.config_path = self.work / "bastion.yaml"
        self.log_path = self.work / "server.log"
        self.procs: list[subprocess.Popen[bytes] | None] = [None] * workers
        self.worker_ports = [self.port] if workers == 1 else [free_port() for _ in range(workers)]
        self.redis_port = free_port()
        self.redis: subprocess.Popen[bytes] | None = None
        self.nginx: subprocess.Popen[bytes] | None = None
        if workers > 1 and database != "postgresql":
            raise ValueError("several Bastion workers need PostgreSQL")
        init = [
            BASTION_PYTHON,
            "-m",
            "bastion",
            "init",
            "--config",
            str(self.config_path),
            "--server-name",
            "localhost",
            "--data-dir",
            str(self.work / "data"),
            "--port",
            str(self.worker_ports[0]),
            "--registration-shared-secret",
            self.shared_secret,
        ]
        if database == "postgresql":
            self.db = PgDatabase("bastion_bench", settings=pg_settings)
            init += ["--database-url", self.db.url]
        elif database != "sqlite":
            raise ValueError(f"unknown database {database!r}")
        subprocess.run(init, check=True, capture_output=True)
        config = yaml.safe_load(self.config_path.read_text())
        config.setdefault("presence", {})["enabled"] = PRESENCE
        config["encryption"]["enabled"] = encryption
        if os.environ.get("BASTION_SQLITE_SYNCHRONOUS") and database == "sqlite":
            config["database"]["sqlite_synchronous"] = os.environ["BASTION_SQLITE_SYNCHRONOUS"]
        if workers > 1:
            config["redis"] = {"url": f"redis://127.0.0.1:{self.redis_port}/0"}
            config["trusted_proxies"] = ["127.0.0.1/32"]
        config = _deep_merge(config, overrides or {})
        self.config_path.write_text(yaml.safe_dump(config, sort_keys=False))
        if workers > 1:
            (self.work / "nginx-tmp").mkdir()
            servers = "\n".join(
                f"        server 127.0.0.1:{p} max_fails=0;" for p in self.worker_ports
            )
            (self.work / "nginx.conf").write_text(
                NGINX_TEMPLATE.read_text().format(
                    user="user root;\n" if os.geteuid() == 0 else "",
                    dir=self.work,
                    servers=servers,
                    port=self.port,
                    proxy_conf=NGINX_PROXY_CONF,
                )
            )
        db = "SQLite" if database == "sqlite" else "PostgreSQL"
        layout = f", {workers} workers + Redis + nginx" if workers > 1 else ""
        if pg_settings:
            layout += ", " + ", ".join(f"{k}={v}" for k, v in pg_settings.items())
        enc = "" if encryption else ", encryption at rest off"
        self.label = f"Bastion {bastion_version()} ({db}{layout}{enc})"

    def _spawn(self, index: int) -> subprocess.Popen[bytes]:
        cmd = [*prio_server(), BASTION_PYTHON, "-m", "bastion", "serve", "--config"]
        cmd += [str(self.config_path), "--port", str(self.worker_ports[index])]
        if self.workers > 1:
            cmd += ["--worker-index", str(index)]
        with open(self.log_path, "ab") as out:
            return subprocess.Popen(
                cmd,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=self.work,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
            )

    def start(self) -> None:
        if self.workers > 1:
            self.redis = start_redis(self.redis_port)
        # The first worker migrates the database; the others start once it is up.
        self.procs[0] = self._spawn(0)
        url = f"http://127.0.0.1:{self.worker_ports[0]}/_matrix/client/versions"
        _wait_healthy(url, self.procs[0], self.log_path, 120)
        for i in range(1, self.workers):
            self.procs[i] = self._spawn(i)
        for i in range(1, self.workers):
            url = f"http://127.0.0.1:{self.worker_ports[i]}/_matrix/client/versions"
            proc = self.procs[i]
            assert proc is not None
            _wait_healthy(url, proc, self.log_path, 120)
        if self.workers > 1:
            self.nginx = start_nginx(self.work, self.base_url)

    def stop(self) -> None:
        for proc in self.procs:
            if proc is not None and proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs:
            _stop(proc)
        _stop(self.nginx)
        _stop(self.redis)
        self.procs = [None] * self.workers
        self.nginx = self.redis = None

    def server_pids(self) -> list[int]:
        return [p.pid for p in self.procs if p is not None]

    def aux_pids(self) -> list[int]:
        pids = [p.pid for p in (self.nginx, self.redis) if p is not None]
        return pids + super().aux_pids()

    def log_files(self) -> list[Path]:
        return [self.log_path, self.work / "nginx-error.log"]

    def describe(self) -> dict[str, Any]:
        return {
            **super().describe(),
            "database": self.database,
            "workers": self.workers,
            "encryption_at_rest": self.encryption,
            "presence": PRESENCE,
        }


def ensure_synapse(postgres: bool = False, redis: bool = False) -> str:
    """Synapse's interpreter; installs SYNAPSE_SPEC (and psycopg2-binary, and Synapse's
    ``redis`` extra for its workers) on first use."""
    py = SYNAPSE_VENV / "bin" / "python"
    pip = [str(SYNAPSE_VENV / "bin" / "pip"), "install", "-q"]
    if not py.exists() or subprocess.run([str(py), "-c", "import synapse"], capture_output=True).returncode != 0:
        log(f"installing {SYNAPSE_SPEC} into {SYNAPSE_VENV}")
        subprocess.run(
            [os.environ.get("PYTHON", "python3"), "-m", "venv", str(SYNAPSE_VENV)], check=True
        )
        subprocess.run([*pip, "--upgrade", "pip"], check=True)
        subprocess.run([*pip, SYNAPSE_SPEC], check=True)
    if (
        postgres
        and subprocess.run([str(py), "-c", "import psycopg2"], capture_output=True).returncode
    ):
        log(f"installing psycopg2-binary into {SYNAPSE_VENV} (Synapse on PostgreSQL)")
        subprocess.run([*pip, "psycopg2-binary"], check=True)
    has_redis_extra = (
        "import importlib.metadata as m, hiredis; v = m.version('txredisapi').split('.');"
        " raise SystemExit(not ((1, 4, 12) <= tuple(map(int, v[:3])) < (1, 6)))"
    )
    if redis and subprocess.run([str(py), "-c", has_redis_extra], capture_output=True).returncode:
        log(f"installing txredisapi and hiredis into {SYNAPSE_VENV} (Synapse's workers)")
        subprocess.run([*pip, "txredisapi>=1.4.12,<1.6.0", "hiredis"], check=True)
    return str(py)


class Synapse(Server):
    """Synapse, single process, configured by ``synapse_config.py``.

    ``database``: ``"sqlite"`` (as generated) or ``"postgresql"`` (a fresh C-locale
    database on BENCH_PG_URL, psycopg2). ``extra_args`` go to ``synapse_config.py``.
    """

    kind = "synapse"

    def __init__(
        self,
        name: str,
        work_root: Path,
        *,
        database: str = "sqlite",
        extra_args: Sequence[str] = (),
        pg_settings: dict[str, str] | None = None,
        redis: bool = False,
    ) -> None:
        super().__init__(name, work_root)
        self.database = database
        self.py = ensure_synapse(postgres=database == "postgresql", redis=redis)
        self.config_path = self.work / "homeserver.yaml"
        self.proc: subprocess.Popen[bytes] | None = None
        subprocess.run(
            [
                self.py,
                "-m",
                "synapse.app.homeserver",
                "--server-name",
                "localhost",
                "--config-path",
                str(self.config_path),
                "--data-directory",
                str(self.work / "data"),
                "--generate-config",
                "--report-stats=no",
            ],
            check=True,
            capture_output=True,
            cwd=self.work,
        )
        patch = [self.py, str(BENCH_DIR / "synapse_config.py"), str(self.config_path)]
        patch += ["--port", str(self.port), "--shared-secret", self.shared_secret]
        patch += ["--presence", "on" if PRESENCE else "off", *extra_args]
        if database == "postgresql":
            self.db = PgDatabase("synapse_bench", c_locale=True, settings=pg_settings)
            patch += ["--database-url", self.db.url]
        elif database != "sqlite":
            raise ValueError(f"unknown database {database!r}")
        subprocess.run(patch, check=True)
        version = subprocess.run(
            [self.py, "-c", "import synapse; print(synapse.__version__.split()[0])"],
            capture_output=True,
            text=True,
        ).stdout.strip()
        self.label = f"Synapse {version} ({'SQLite' if database == 'sqlite' else 'PostgreSQL'})"
        if pg_settings:
            self.label = self.label[:-1] + ", " + ", ".join(f"{k}={v}" for k, v in pg_settings.items()) + ")"

    def start(self) -> None:
        with open(self.work / "stdout.log", "ab") as out:
            self.proc = subprocess.Popen(
                [
                    *prio_server(),
                    *(self.py, "-m", "synapse.app.homeserver"),
                    *("--config-path", str(self.config_path)),
                ],
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=self.work,
            )
        _wait_healthy(
            self.base_url + "/_matrix/client/versions", self.proc, self.work / "stdout.log", 180
        )

    def stop(self) -> None:
        _stop(self.proc)
        self.proc = None

    def server_pids(self) -> list[int]:
        return [self.proc.pid] if self.proc is not None else []

    def log_files(self) -> list[Path]:
        return [self.work / "homeserver.log", self.work / "stdout.log"]

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "database": self.database, "presence": PRESENCE}


SYNAPSE_NGINX = """\
{user}worker_processes 1;
daemon off;
pid {dir}/nginx.pid;
error_log {dir}/nginx-error.log warn;
events {{ worker_connections 16384; }}
http {{
    access_log off;
    client_body_temp_path {dir}/nginx-tmp/body;
    proxy_temp_path {dir}/nginx-tmp/proxy;
    fastcgi_temp_path {dir}/nginx-tmp/fastcgi;
    uwsgi_temp_path {dir}/nginx-tmp/uwsgi;
    scgi_temp_path {dir}/nginx-tmp/scgi;
    upstream synapse_main {{ server 127.0.0.1:{main_port}; keepalive 256; }}
    upstream synapse_sync {{
{sync_servers}
        keepalive 256;
    }}
    server {{
        listen 127.0.0.1:{port};
        client_max_body_size 200m;
        location ~ ^/_matrix/client/(r0|v3)/sync$ {{
            proxy_pass http://synapse_sync;
            include {proxy_conf};
        }}
        location / {{
            proxy_pass http://synapse_main;
            include {proxy_conf};
        }}
    }}
}}
"""


class SynapseWorkers(Synapse):
    """Synapse with its own workers: the main process (event persistence, everything
    but /sync) and ``sync_workers`` generic workers serving /sync, Redis between them,
    nginx routing /sync to the workers (round robin) and the rest to the main process —
    the split Synapse's worker documentation starts with.
    """

    def __init__(
        self,
        name: str,
        work_root: Path,
        *,
        sync_workers: int = 1,
        pg_settings: dict[str, str] | None = None,
    ) -> None:
        super().__init__(name, work_root, database="postgresql", pg_settings=pg_settings, redis=True)
        self.main_port = free_port()
        self.replication_port = free_port()
        self.redis_port = free_port()
        self.worker_ports = [free_port() for _ in range(sync_workers)]
        self.workers: list[subprocess.Popen[bytes] | None] = [None] * sync_workers
        self.redis: subprocess.Popen[bytes] | None = None
        self.nginx: subprocess.Popen[bytes] | None = None
        config = yaml.safe_load(self.config_path.read_text())
        for listener in config["listeners"]:
            if listener.get("port") == self.port:
                listener["port"] = self.main_port
                listener["x_forwarded"] = True
        config["listeners"].append({
            "port": self.replication_port,
            "bind_addresses": ["127.0.0.1"],
            "type": "http",
            "resources": [{"names": ["replication"]}],
        })
        config["instance_map"] = {"main": {"host": "127.0.0.1", "port": self.replication_port}}
        config["redis"] = {"enabled": True, "host": "127.0.0.1", "port": self.redis_port}
        self.config_path.write_text(yaml.safe_dump(config, sort_keys=False))
        log_config = Path(config["log_config"])
        for i, port in enumerate(self.worker_ports):
            worker_log = self.work / f"sync{i}.log.config"
            worker_log.write_text(log_config.read_text().replace("homeserver.log", f"sync{i}.log"))
            (self.work / f"sync{i}.yaml").write_text(yaml.safe_dump({
                "worker_app": "synapse.app.generic_worker",
                "worker_name": f"sync{i}",
                "worker_listeners": [{
                    "type": "http",
                    "port": port,
                    "bind_addresses": ["127.0.0.1"],
                    "x_forwarded": True,
                    "resources": [{"names": ["client"]}],
                }],
                "worker_log_config": str(worker_log),
            }, sort_keys=False))
        (self.work / "nginx-tmp").mkdir()
        (self.work / "nginx.conf").write_text(SYNAPSE_NGINX.format(
            user="user root;\n" if os.geteuid() == 0 else "",
            dir=self.work,
            main_port=self.main_port,
            sync_servers="\n".join(f"        server 127.0.0.1:{p} max_fails=0;" for p in self.worker_ports),
            port=self.port,
            proxy_conf=NGINX_PROXY_CONF,
        ))
        self.label = self.label[:-1] + f", main + {sync_workers} sync worker{'s' if sync_workers > 1 else ''} + Redis + nginx)"

    def start(self) -> None:
        self.redis = start_redis(self.redis_port)
        with open(self.work / "stdout.log", "ab") as out:
            self.proc = subprocess.Popen(
                [*prio_server(), self.py, "-m", "synapse.app.homeserver", "--config-path", str(self.config_path)],
                stdout=out, stderr=subprocess.STDOUT, cwd=self.work,
            )
        _wait_healthy(f"http://127.0.0.1:{self.main_port}/_matrix/client/versions", self.proc,
                      self.work / "stdout.log", 180)
        for i in range(len(self.worker_ports)):
            with open(self.work / f"sync{i}-stdout.log", "ab") as out:
                self.workers[i] = subprocess.Popen(
                    [*prio_server(), self.py, "-m", "synapse.app.generic_worker",
                     "--config-path", str(self.config_path), "--config-path", str(self.work / f"sync{i}.yaml")],
                    stdout=out, stderr=subprocess.STDOUT, cwd=self.work,
                )
        for i, port in enumerate(self.worker_ports):
            proc = self.workers[i]
            assert proc is not None
            _wait_healthy(f"http://127.0.0.1:{port}/_matrix/client/versions", proc,
                          self.work / f"sync{i}-stdout.log", 180)
        self.nginx = start_nginx(self.work, self.base_url)

    def stop(self) -> None:
        for proc in self.workers:
            _stop(proc)
        self.workers = [None] * len(self.worker_ports)
        super().stop()
        _stop(self.nginx)
        _stop(self.redis)
        self.nginx = self.redis = None

    def server_pids(self) -> list[int]:
        return super().server_pids() + [p.pid for p in self.workers if p is not None]

    def aux_pids(self) -> list[int]:
        return [p.pid for p in (self.nginx, self.redis) if p is not None] + super().aux_pids()

    def log_files(self) -> list[Path]:
        return [*super().log_files(), *(self.work / f"sync{i}.log" for i in range(len(self.worker_ports))),
                *(self.work / f"sync{i}-stdout.log" for i in range(len(self.worker_ports))),
                self.work / "nginx-error.log"]

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "sync_workers": len(self.worker_ports)}


def start_redis(port: int) -> subprocess.Popen[bytes]:
    """A private redis-server on 127.0.0.1:port, no persistence; returns once it accepts."""
    proc = subprocess.Popen(
        [
            "redis-server",
            *("--port", str(port), "--bind", "127.0.0.1"),
            *("--save", "", "--appendonly", "no"),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 10
    while True:
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return proc
        if time.monotonic() > deadline or proc.poll() is not None:
            raise RuntimeError("redis-server did not start")
        time.sleep(0.05)


def start_nginx(work: Path, base_url: str) -> subprocess.Popen[bytes]:
    """nginx with ``work/nginx.conf``; returns once ``base_url`` answers through it."""
    with open(work / "nginx-error.log", "ab") as err:
        proc = subprocess.Popen(
            ["nginx", "-p", str(work), "-c", str(work / "nginx.conf")],
            stdout=subprocess.DEVNULL,
            stderr=err,
        )
    _wait_healthy(base_url + "/_matrix/client/versions", proc, work / "nginx-error.log", 30)
    return proc


def work_root() -> Path:
    """Parent directory for the servers' temporary directories."""
    return Path(tempfile.mkdtemp(prefix="bastion-bench-", dir=os.environ.get("TMPDIR")))


# -- running loadgen / find_max_rate -----------------------------------------------------------


def pid_args(server: Server, aux: bool = True) -> list[str]:
    out: list[str] = []
    for pid in server.server_pids():
        out += ["--server-pid", str(pid)]
    if aux:
        for pid in server.aux_pids():
            out += ["--aux-pid", str(pid)]
    return out


def loadgen_cmd(server: Server, *args: str) -> list[str]:
    return [
        *prio_client(),
        sys.executable,
        str(BENCH_DIR / "loadgen.py"),
        "--base-url",
        server.base_url,
        "--shared-secret",
        server.shared_secret,
        *pid_args(server),
        *args,
    ]


def find_max_rate_cmd(server: Server, *args: str) -> list[str]:
    return [
        *prio_client(),
        sys.executable,
        str(BENCH_DIR / "find_max_rate.py"),
        "--label",
        server.label,
        "--base-url",
        server.base_url,
        "--shared-secret",
        server.shared_secret,
        *pid_args(server),
        *args,
    ]


def run_logged(cmd: Sequence[str], log_path: Path) -> int:
    """Run ``cmd``, its output both to the terminal (stderr) and to ``log_path``."""
    shown = list(cmd)
    for i, arg in enumerate(shown[:-1]):
        if arg == "--shared-secret":
            shown[i + 1] = "***"
    log("$ " + " ".join(shown))
    with open(log_path, "ab") as out:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        assert proc.stdout is not None
        for line in proc.stdout:
            out.write(line)
            sys.stderr.buffer.write(line)
            sys.stderr.flush()
        return proc.wait()


def search_summary(result: dict[str, Any] | None) -> dict[str, Any]:
    """The figures a table needs from a find_max_rate.py result."""
    if not result:
        return {"max_rate": None}
    best = result.get("best")
    out: dict[str, Any] = {
        "max_rate": result.get("max_rate"),
        "steps": len(result.get("steps", [])),
        "search_seconds": result.get("search_seconds"),
    }
    if best:
        d, s, srv = best["deliveries"], best["sends"], best["server"]
        out.update(
            delivery_p50_ms=d["latency_ms"]["p50"],
            delivery_p99_ms=d["latency_ms"]["p99"],
            send_p99_ms=s["latency_ms"]["p99"],
            deliveries_per_s=best["throughput"]["deliveries_per_s"],
            server_cpu_cores=srv.get("cpu_cores"),
            server_cpu_ms_per_msg=(
                round(srv["cpu_seconds"] * 1000 / s["ok"], 2)
                if s["ok"] and srv.get("cpu_seconds") is not None
                else None
            ),
            rss_mib=srv.get("rss_mib"),
            peak_rss_mib=srv.get("peak_rss_mib"),
            aux_cpu_cores=srv.get("aux", {}).get("cpu_cores"),
            aux_rss_mib=srv.get("aux", {}).get("rss_mib"),
            client_cpu_cores=best["client"]["cpu_cores"],
            other_cores=best["machine"]["other_cores"],
        )
    return out
