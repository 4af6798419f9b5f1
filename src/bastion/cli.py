"""The ``bastion`` command: init, serve, user and registration-token management.

Built with click (well-kept, gives help text, prompts and clean errors for free).
Every command that needs a configuration takes ``--config`` (or ``BASTION_CONFIG``).
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import sys
from pathlib import Path
from typing import Any

import click
import yaml

from bastion import __version__
from bastion.errors import ConfigError

CONFIG_OPTION = click.option(
    "--config",
    "config_path",
    envvar="BASTION_CONFIG",
    required=True,
    type=click.Path(dir_okay=False, path_type=Path),
    help="Path to the YAML configuration file (or set BASTION_CONFIG).",
)


def _load(config_path: Path) -> Any:
    from bastion.settings import load_settings

    try:
        return load_settings(config_path)
    except ConfigError as exc:
        raise click.ClickException(f"bad configuration in {config_path}:\n{exc}") from None


def _setup_logging(level: str) -> None:
    logging.basicConfig(level=getattr(logging, level), format="%(asctime)s %(levelname)s %(name)s: %(message)s")


@click.group()
@click.version_option(__version__, prog_name="bastion")
def main() -> None:
    """Bastion: a self-hosted, security-first Matrix homeserver."""
    # Files Bastion creates (database, WAL, keys, config) are private to its user.
    os.umask(0o077)


# -- init ------------------------------------------------------------------------------------


@main.command()
@CONFIG_OPTION
@click.option("--server-name", required=True, help="The server name in user IDs, e.g. example.org.")
@click.option("--data-dir", required=True, type=click.Path(file_okay=False, path_type=Path), help="Where Bastion keeps its data.")
@click.option("--port", default=8008, show_default=True, type=click.IntRange(1, 65535))
@click.option("--bind", "bind_host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--database-url", default=None, help="postgresql://user:pass@host/db (default: SQLite in the data dir).")
@click.option("--registration-shared-secret", default=None, help="Enable Synapse-style shared-secret registration.")
@click.option(
    "--key-file",
    default=None,
    type=click.Path(dir_okay=False, path_type=Path),
    help="Where to keep the key-encryption key (default: kek.json next to the config file, outside the data dir).",
)
@click.option("--force", is_flag=True, help="Overwrite an existing config file (an existing key file is kept).")
def init(
    config_path: Path,
    server_name: str,
    data_dir: Path,
    port: int,
    bind_host: str,
    database_url: str | None,
    registration_shared_secret: str | None,
    key_file: Path | None,
    force: bool,
) -> None:
    """Write a complete configuration with fresh secrets, the signing key and the encryption key."""
    from bastion.core.signing import SigningKey
    from bastion.security.crypto import FileKeyProvider, KeySet, new_kek
    from bastion.settings import parse_settings

    if config_path.exists() and not force:
        raise click.ClickException(f"{config_path} already exists; use --force to overwrite it")
    data_dir = data_dir.resolve()
    signing_key_path = data_dir / "signing.key"
    key_path = (key_file or config_path.parent / "kek.json").resolve()
    config: dict[str, Any] = {
        "server_name": server_name,
        "data_dir": str(data_dir),
        "signing_key_path": str(signing_key_path),
        "listen": {"host": bind_host, "port": port},
        "database": {"url": database_url or f"sqlite:///{data_dir / 'bastion.db'}"},
        "registration": {"enabled": False, "require_token": True},
        "encryption": {"enabled": True, "cipher": "aes-256-gcm", "key_provider": "file", "key_file": str(key_path)},
    }
    if registration_shared_secret is not None:
        config["registration"]["shared_secret"] = registration_shared_secret
    try:
        parse_settings(config)
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from None
    data_dir.mkdir(parents=True, exist_ok=True)
    os.chmod(data_dir, 0o700)
    if not signing_key_path.exists():
        SigningKey.generate().write(signing_key_path)
    if not key_path.exists():
        # Never replaced by init: losing the KEK makes every encrypted row unreadable.
        FileKeyProvider(key_path).store(KeySet(new_kek()))
        click.echo(f"Wrote the key-encryption key to {key_path} (mode 0600). Back it up apart from the database.")
    if key_path.is_relative_to(data_dir):
        click.echo(
            "Warning: the key file is inside the data directory; a copy of that directory then holds both "
            "the ciphertext and its key.",
            err=True,
        )
    config_path.parent.mkdir(parents=True, exist_ok=True)
    text = (
        "# Bastion configuration, written by 'bastion init'. Every key: docs/configuration.md\n"
        + yaml.safe_dump(config, sort_keys=False)
    )
    fd = os.open(config_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(text)
    click.echo(f"Wrote {config_path} (server name {server_name}, data in {data_dir}).")
    click.echo("Registration is closed; create accounts with 'bastion user add'.")


# -- serve -----------------------------------------------------------------------------------


@main.command()
@CONFIG_OPTION
@click.option("--host", default=None, help="Override listen.host.")
@click.option("--port", default=None, type=click.IntRange(1, 65535), help="Override listen.port.")
@click.option(
    "--workers", default=1, show_default=True, type=click.IntRange(1, 256),
    help="Worker processes sharing the listening socket (more than 1 needs PostgreSQL and redis.url).",
)
@click.option("--fd", default=None, type=int, hidden=True, help="Serve on this inherited socket (used by --workers).")
@click.option("--worker-index", default=0, type=click.IntRange(0, 255), help="This worker's number (its metrics port is metrics.listen.port + index).")
def serve(config_path: Path, host: str | None, port: int | None, workers: int, fd: int | None, worker_index: int) -> None:
    """Run the server in the foreground until SIGTERM or SIGINT."""
    import uvicorn

    from bastion.app import create_app, load_signing_key

    settings = _load(config_path)
    _setup_logging(settings.logging.level)
    try:
        load_signing_key(settings)
        if workers > 1:
            if settings.database.dialect != "postgres":
                raise ConfigError("--workers: several workers need PostgreSQL (database.url); SQLite serves one process")
            if settings.redis.resolved_url() is None:
                raise ConfigError("--workers: several workers need redis.url (the bus between them)")
    except ConfigError as exc:
        raise click.ClickException(f"bad configuration in {config_path}:\n{exc}") from None
    if workers > 1:
        from bastion.cluster.supervisor import supervise

        raise SystemExit(supervise(config_path, host or settings.listen.host, port or settings.listen.port, workers,
                                   settings.shutdown_grace_seconds))
    if settings.metrics.enabled:
        from bastion import metrics

        try:
            metrics.serve(settings.metrics.listen.host, settings.metrics.listen.port + worker_index)
        except OSError as exc:
            raise click.ClickException(f"cannot listen for metrics on port {settings.metrics.listen.port + worker_index}: {exc}") from None
    app = create_app(settings)

    class Server(uvicorn.Server):
        def handle_exit(self, sig: int, frame: Any) -> None:
            loop = getattr(self, "_bastion_loop", None)
            if loop is not None and app.hs is not None:
                loop.call_soon_threadsafe(app.hs.begin_shutdown)
            super().handle_exit(sig, frame)
            # A graceful stop is a clean exit (status 0); uvicorn would otherwise
            # re-raise the signal once shut down.
            self._captured_signals.clear()

    config = uvicorn.Config(
        app,
        host=host or settings.listen.host,
        port=port or settings.listen.port,
        loop="uvloop" if sys.platform != "win32" else "asyncio",
        http="httptools",
        lifespan="on",
        access_log=False,
        log_level=settings.logging.level.lower(),
        timeout_graceful_shutdown=int(settings.shutdown_grace_seconds) or None,
        timeout_keep_alive=75,
        server_header=False,
        date_header=True,
        # Bastion decides itself whose X-Forwarded-For to believe (``trusted_proxies``).
        # Left on, uvicorn would rewrite the client address of every connection from
        # 127.0.0.1 from that header first, so anything local that passes the header on
        # would let a client pick its address (admin networks, last_seen_ip).
        proxy_headers=False,
    )
    server = Server(config)

    async def run() -> None:
        server._bastion_loop = asyncio.get_running_loop()  # type: ignore[attr-defined]
        if fd is not None:
            import socket

            # The supervisor's listening socket, shared by every worker (the kernel spreads connections).
            await server.serve(sockets=[socket.socket(fileno=fd)])
        else:
            await server.serve()

    if config.loop == "uvloop":
        import uvloop

        uvloop.run(run())
    else:  # pragma: no cover
        asyncio.run(run())
    if not server.started:
        raise SystemExit(1)


# -- users ----------------------------------------------------------------------------------------


def _read_password(password_file: str | None, confirm: bool = True) -> tuple[str, bool]:
    """(password, generated). ``-`` reads one line from stdin."""
    if password_file == "-":
        line = sys.stdin.readline().rstrip("\n")
        if not line:
            raise click.ClickException("no password on standard input")
        return line, False
    if password_file is not None:
        return Path(password_file).read_text().rstrip("\n"), False
    if sys.stdin.isatty():
        return click.prompt("Password", hide_input=True, confirmation_prompt=confirm), False
    return secrets.token_urlsafe(18), True


def _run_with_db(config_path: Path, fn: Any) -> Any:
    from bastion.app import open_migrated_database

    settings = _load(config_path)
    db = open_migrated_database(settings)
    try:
        return fn(settings, db)
    finally:
        asyncio.run(db.close())
        _nudge_workers(settings)


def _nudge_workers(settings: Any) -> None:
    """Running workers poll for CLI changes every second; with Redis, tell them at once."""
    url = settings.redis.resolved_url()
    if url is None:
        return
    try:
        import redis

        client = redis.Redis.from_url(url, socket_connect_timeout=1, socket_timeout=1)
        client.publish("bastion:bus", b'{"i": "cli", "k": "signals"}')
        client.close()
    except Exception:  # the workers' own polling still picks the change up
        pass


@main.group()
def user() -> None:
    """Create and manage accounts."""


@user.command("add")
@CONFIG_OPTION
@click.argument("name")
@click.option("--admin", is_flag=True, help="Make the account a server administrator.")
@click.option("--password-file", default=None, help="Read the password from a file ('-' for stdin). Default: prompt, or generate one.")
@click.option("--displayname", default=None)
def user_add(config_path: Path, name: str, admin: bool, password_file: str | None, displayname: str | None) -> None:
    """Create the account NAME (a localpart such as 'alice')."""
    from bastion.app import password_hasher
    from bastion.clock import now_ms
    from bastion.core.ids import is_valid_localpart
    from bastion.storage import accounts as accounts_store

    if not is_valid_localpart(name):
        raise click.ClickException("user names may only contain a-z, 0-9 and ._=-/+")
    password, generated = _read_password(password_file)

    def create(settings: Any, db: Any) -> str:
        if len(password) < settings.password_hashing.min_length:
            raise click.ClickException(f"passwords must be at least {settings.password_hashing.min_length} characters")
        user_id = f"@{name}:{settings.server_name}"
        password_hash = password_hasher(settings).hash(password)
        if not db.run_sync(accounts_store.insert_user, user_id, password_hash, admin, now_ms(), displayname or name):
            raise click.ClickException(f"{user_id} already exists")
        return user_id

    user_id = _run_with_db(config_path, create)
    click.echo(f"Created {user_id}{' (administrator)' if admin else ''}.")
    if generated:
        click.echo(f"Password (shown once, store it now): {password}")


@user.command("passwd")
@CONFIG_OPTION
@click.argument("name")
@click.option("--password-file", default=None, help="Read the new password from a file ('-' for stdin).")
@click.option("--logout/--no-logout", default=True, show_default=True, help="End every session of the user.")
def user_passwd(config_path: Path, name: str, password_file: str | None, logout: bool) -> None:
    """Set a new password for NAME."""
    from bastion.app import password_hasher
    from bastion.clock import now_ms
    from bastion.storage import accounts as accounts_store

    password, generated = _read_password(password_file)

    def change(settings: Any, db: Any) -> str:
        if len(password) < settings.password_hashing.min_length:
            raise click.ClickException(f"passwords must be at least {settings.password_hashing.min_length} characters")
        user_id = name if name.startswith("@") else f"@{name}:{settings.server_name}"
        password_hash = password_hasher(settings).hash(password)

        def txn_fn(txn: Any) -> bool:
            row = accounts_store.get_user(txn, user_id)
            if row is None or row.is_deactivated:
                return False
            accounts_store.set_password_hash(txn, user_id, password_hash)
            if logout:
                accounts_store.delete_all_devices(txn, user_id)
                accounts_store.add_signal(txn, "user_tokens", user_id, now_ms())
            return True

        if not db.run_sync(txn_fn):
            raise click.ClickException(f"no active account {user_id}")
        return user_id

    user_id = _run_with_db(config_path, change)
    click.echo(f"Password changed for {user_id}.")
    if generated:
        click.echo(f"New password (shown once): {password}")


@user.command("deactivate")
@CONFIG_OPTION
@click.argument("name")
@click.confirmation_option(prompt="Deactivate this account? It cannot be undone.")
def user_deactivate(config_path: Path, name: str) -> None:
    """Deactivate NAME: sessions end now, and the user leaves every room."""
    from bastion.clock import now_ms
    from bastion.services.deactivation import record_deactivation
    from bastion.storage import accounts as accounts_store

    def deactivate(settings: Any, db: Any) -> str:
        user_id = name if name.startswith("@") else f"@{name}:{settings.server_name}"

        def txn_fn(txn: Any) -> bool:
            row = accounts_store.get_user(txn, user_id)
            if row is None or row.is_deactivated:
                return False
            record_deactivation(txn, user_id, now_ms())
            return True

        if not db.run_sync(txn_fn):
            raise click.ClickException(f"no active account {user_id}")
        return user_id

    user_id = _run_with_db(config_path, deactivate)
    click.echo(f"Deactivated {user_id}. A running server removes it from its rooms within seconds; otherwise the next start does.")


# -- registration tokens ------------------------------------------------------------------------


@main.group("registration-token")
def registration_token() -> None:
    """Tokens that let people register when registration requires one."""


@registration_token.command("create")
@CONFIG_OPTION
@click.option("--uses", type=click.IntRange(1), default=None, help="How many registrations it allows (default: unlimited).")
@click.option("--expires-in-hours", type=click.FloatRange(0, min_open=True), default=None)
def token_create(config_path: Path, uses: int | None, expires_in_hours: float | None) -> None:
    """Create a registration token and print it."""
    from bastion.clock import now_ms
    from bastion.storage import accounts as accounts_store

    token = secrets.token_urlsafe(12)
    expiry = now_ms() + int(expires_in_hours * 3600 * 1000) if expires_in_hours else None
    _run_with_db(config_path, lambda s, db: db.run_sync(accounts_store.insert_registration_token, token, uses, expiry))
    click.echo(token)


@registration_token.command("list")
@CONFIG_OPTION
def token_list(config_path: Path) -> None:
    """List registration tokens and their use."""
    from bastion.storage import accounts as accounts_store

    tokens = _run_with_db(config_path, lambda s, db: db.run_sync(accounts_store.list_registration_tokens))
    for t in tokens:
        click.echo(f"{t.token}\tuses_allowed={t.uses_allowed}\tcompleted={t.completed}\texpiry_ts={t.expiry_ts}")


@registration_token.command("delete")
@CONFIG_OPTION
@click.argument("token")
def token_delete(config_path: Path, token: str) -> None:
    """Delete a registration token."""
    from bastion.storage import accounts as accounts_store

    if not _run_with_db(config_path, lambda s, db: db.run_sync(accounts_store.delete_registration_token, token)):
        raise click.ClickException("no such token")
    click.echo("Deleted.")


@main.command("check-config")
@CONFIG_OPTION
def check_config(config_path: Path) -> None:
    """Validate a configuration file and exit."""
    _load(config_path)
    click.echo("Configuration is valid.")


# -- keys ---------------------------------------------------------------------------------------


@main.group()
def keys() -> None:
    """Encryption-at-rest keys: status, data-key rotation, key-encryption-key rotation."""


def _keys_db(config_path: Path) -> tuple[Any, Any, Any]:
    from bastion.app import key_provider, open_migrated_database

    settings = _load(config_path)
    if not settings.encryption.enabled:
        raise click.ClickException("encryption at rest is disabled in this configuration (encryption.enabled: false)")
    try:
        db = open_migrated_database(settings)
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from None
    return settings, db, key_provider(settings)


@keys.command("status")
@CONFIG_OPTION
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")
def keys_status(config_path: Path, as_json: bool) -> None:
    """Show key versions, ages and how much data each key covers."""
    import json

    from bastion import keytool

    _settings, db, provider = _keys_db(config_path)
    try:
        report = keytool.status(db, provider)
    finally:
        asyncio.run(db.close())
    if as_json:
        click.echo(json.dumps(report, indent=2))
        return
    kek = report["kek"]
    click.echo(f"Cipher: {report['cipher']}")
    click.echo(f"Key-encryption key: {kek['primary']} ({kek['provider']}); older keys still configured: {len(kek['others'])}")
    click.echo(f"KEKs wrapping data keys: {', '.join(kek['wrapping_keks_in_use']) or '-'}")
    for scope, states in sorted(report["deks"].items()):
        age = report["oldest_active_dek_age_days"].get(scope)
        parts = ", ".join(f"{n} {state}" for state, n in sorted(states.items()))
        click.echo(f"Data keys ({scope}): {parts}" + (f"; oldest active {age} days" if age is not None else ""))
    click.echo(f"{'column':34} {'rows':>9} {'newest key':>11} {'older key':>10} {'plaintext':>10} {'unreadable':>10}")
    for c in report["columns"]:
        click.echo(
            f"{c['column']:34} {c['rows']:>9} {c['active_key']:>11} {c['old_key']:>10} {c['plaintext']:>10} {c['unreadable']:>10}"
        )
    job = report["rotation_in_progress"]
    if job:
        click.echo(f"Rotation in progress ({job['scope']} {job.get('scope_id') or ''}); resume with 'bastion keys rotate'.")


@keys.command("rotate")
@CONFIG_OPTION
@click.option("--room", "room_id", default=None, help="Rotate one room's data key.")
@click.option("--user", "user_id", default=None, help="Rotate one user's data key.")
@click.option("--all", "all_scopes", is_flag=True, help="Rotate every room's and user's data key.")
@click.option("--batch", default=500, show_default=True, type=click.IntRange(1, 100_000))
def keys_rotate(config_path: Path, room_id: str | None, user_id: str | None, all_scopes: bool, batch: int) -> None:
    """Start new data keys and re-encrypt old data under them, while the server runs.

    Without --room/--user/--all, resumes an interrupted rotation.
    """
    from bastion import keytool

    chosen = [x for x in (room_id, user_id, all_scopes or None) if x]
    if len(chosen) > 1:
        raise click.ClickException("choose one of --room, --user and --all")
    from bastion.app import media_root, media_store_for
    from bastion.storage import media as media_store

    settings, db, _provider = _keys_db(config_path)
    media = media_store_for(settings) if media_root(settings).is_dir() else None
    if media is None and db.run_sync(media_store.count_uploaded, None):
        asyncio.run(db.close())
        raise click.ClickException(
            f"the media store {media_root(settings)} is not here: run this where the server's media directory is (and as its user)"
        )
    try:
        job = keytool.pending_job(db)
        if chosen:
            if job is not None:
                raise click.ClickException("a rotation is already in progress; run 'bastion keys rotate' alone to resume it")
            scope = "room" if room_id else "user" if user_id else "all"
            job = keytool.start_rotation(db, scope, room_id or user_id)
            click.echo(f"New data keys are active for {room_id or user_id or 'every room and user'}; re-encrypting old data.")
        elif job is None:
            raise click.ClickException("nothing to resume; choose --room ID, --user ID or --all")
        else:
            click.echo(f"Resuming the rotation of {job.scope_id or job.scope} (pass {job.passes + 1}).")
        total = keytool.rows_to_scan(db, job, media=media is not None)
        with click.progressbar(length=total, label="Re-encrypting", file=sys.stderr) as bar:
            rewritten = keytool.run_rotation(db, job, batch=batch, progress=bar.update, media=media)
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from None
    finally:
        asyncio.run(db.close())
    files = rewritten.pop(keytool.MEDIA_FILES, 0)
    unreadable = rewritten.pop(keytool.MEDIA_UNREADABLE, 0)
    click.echo(f"Done: {sum(rewritten.values())} values and {files} media files re-encrypted; "
               "old key versions are kept for reading backups of this database.")
    if unreadable:
        click.echo(f"Warning: {unreadable} media files failed their integrity check or are missing and were left as "
                   "they are (listed above).", err=True)
        sys.exit(2)


@keys.command("rotate-kek")
@CONFIG_OPTION
def keys_rotate_kek(config_path: Path) -> None:
    """Re-wrap every data key under a new key-encryption key, while the server runs."""
    from bastion import keytool

    _settings, db, provider = _keys_db(config_path)
    try:
        if not provider.can_store() and not provider.load().others:
            raise click.ClickException(
                "this key provider cannot be changed by Bastion: configure the new KEK as primary and the old one as "
                "previous (see docs/security/encryption-at-rest.md), then run rotate-kek again"
            )
        with click.progressbar(length=0, label="Re-wrapping data keys", file=sys.stderr) as bar:
            new_id = keytool.rotate_kek(db, provider, progress=bar.update)
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from None
    finally:
        asyncio.run(db.close())
    click.echo(f"Every data key is now wrapped by key-encryption key {new_id}.")
    if provider.can_store():
        click.echo("The old key-encryption key was removed from the key file; back up the new key file now.")
    else:
        click.echo("You may now remove the previous key from the key provider.")
