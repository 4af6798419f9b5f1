#!/usr/bin/env python3
"""Adjust a freshly generated Synapse homeserver.yaml for the benchmark.

Run with Synapse's own interpreter (it has PyYAML). Changes, and why:

* one plain-HTTP client listener on 127.0.0.1:PORT (no federation resource: the
  benchmark is one server talking to its own clients);
* SQLite in the data directory, as generated (the comparison is SQLite against SQLite);
* ``registration_shared_secret`` for ``/_synapse/admin/v1/register``;
* every ``rc_*`` rate limiter opened wide — Bastion has no rate limiting, and a
  limiter would measure the limit, not the server;
* logging at WARNING — Synapse logs every request at INFO, Bastion logs none;
* no trusted key servers — nothing may be fetched from outside this machine.

* presence off (``--presence on`` keeps it) — off on Bastion too by default in the
  benchmark: presence is not what is measured, and with it on Synapse spends about
  40% more CPU per message and misses the latency bound at any rate.

Options used by the other benchmarks (defaults leave the config as above):

* ``--database-url postgresql://user:pass@host:port/db`` — PostgreSQL (psycopg2, a pool
  of ``cp_min``..``cp_max`` connections) instead of SQLite (scale-out benchmark);
* ``--max-upload-size 200M`` — Synapse's default (50M) refuses a 50 MiB file plus
  nothing to spare (media benchmark);
* ``--bcrypt-rounds N`` — cheaper password hashing for benchmarks that register
  thousands of users (only the setup gets faster; no password is checked while
  measuring).

Everything else stays at Synapse's defaults (caches, push rules, database settings).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import yaml

WIDE_OPEN = {"per_second": 1_000_000, "burst_count": 1_000_000}

# Every limiter in synapse/config/ratelimiting.py that a client request can hit.
FLAT_LIMITERS = (
    "rc_message",
    "rc_registration",
    "rc_registration_token_validity",
    "rc_joins_per_room",
    "rc_3pid_validation",
    "rc_third_party_invite",
    "rc_media_create",
    "rc_key_requests",
    "rc_admin_redaction",
    "rc_delayed_event_mgmt",
    "rc_room_creation",
    "rc_reports",
    "rc_user_directory",
    "rc_profile",
)
NESTED_LIMITERS = {
    "rc_login": ("address", "account", "failed_attempts"),
    "rc_joins": ("local", "remote"),
    "rc_invites": ("per_room", "per_user", "per_issuer"),
    "rc_presence": ("per_user",),
}


def postgres_database(url: str, cp_max: int = 10) -> dict[str, Any]:
    """Synapse's ``database`` section for a postgresql:// URL."""
    parts = urlsplit(url)
    if parts.scheme not in ("postgres", "postgresql"):
        raise SystemExit(f"not a PostgreSQL URL: {url}")
    args: dict[str, Any] = {
        "dbname": unquote(parts.path.lstrip("/")),
        "host": parts.hostname or "localhost",
        "port": parts.port or 5432,
        "cp_min": 5,
        "cp_max": cp_max,
    }
    if parts.username:
        args["user"] = unquote(parts.username)
    if parts.password:
        args["password"] = unquote(parts.password)
    return {"name": "psycopg2", "args": args}


def patch_config(
    config: dict[str, Any], port: int, shared_secret: str, presence: bool = False
) -> dict[str, Any]:
    config["listeners"] = [
        {
            "port": port,
            "bind_addresses": ["127.0.0.1"],
            "type": "http",
            "tls": False,
            "x_forwarded": False,
            "resources": [{"names": ["client"], "compress": False}],
        }
    ]
    if config.get("database", {}).get("name") != "sqlite3":
        raise SystemExit("expected the generated config to use SQLite")
    config["registration_shared_secret"] = shared_secret
    config["enable_registration"] = False
    config["report_stats"] = False
    config["trusted_key_servers"] = []
    config["suppress_key_server_warning"] = True
    config["presence"] = {"enabled": presence}
    for key in FLAT_LIMITERS:
        config[key] = dict(WIDE_OPEN)
    for key, parts in NESTED_LIMITERS.items():
        config[key] = {part: dict(WIDE_OPEN) for part in parts}
    return config


def quiet_logging(log_config_path: Path) -> None:
    log_config = yaml.safe_load(log_config_path.read_text())
    log_config.setdefault("root", {})["level"] = "WARNING"
    for logger in log_config.get("loggers", {}).values():
        logger["level"] = "WARNING"
    log_config_path.write_text(yaml.safe_dump(log_config, sort_keys=False))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config", type=Path, help="homeserver.yaml written by --generate-config")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--shared-secret", required=True)
    parser.add_argument("--presence", choices=("on", "off"), default="off")
    parser.add_argument("--database-url", help="postgresql://... instead of the generated SQLite")
    parser.add_argument("--max-upload-size", help="e.g. 200M (Synapse's default is 50M)")
    parser.add_argument("--bcrypt-rounds", type=int, help="password hashing cost (default 12)")
    args = parser.parse_args()
    config = yaml.safe_load(args.config.read_text())
    patch_config(config, args.port, args.shared_secret, presence=args.presence == "on")
    if args.database_url:
        config["database"] = postgres_database(args.database_url)
    if args.max_upload_size:
        config["max_upload_size"] = args.max_upload_size
    if args.bcrypt_rounds:
        config["bcrypt_rounds"] = args.bcrypt_rounds
    args.config.write_text(yaml.safe_dump(config, sort_keys=False))
    quiet_logging(Path(config["log_config"]))


if __name__ == "__main__":
    main()
