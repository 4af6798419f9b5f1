"""Bastion's configuration: one frozen, typed object loaded from a YAML file.

Every key is declared here with its type, default and constraints (pydantic), so a
bad config fails at start-up with a message that names the key and what is wrong,
for example ``config key 'database.pool_size': Input should be greater than 0``.
Unknown keys are errors too — a typo must not silently fall back to a default.

Secrets can live in separate files (``*_file`` keys) so the main config can be
shared or committed without them. ``docs/configuration.md`` documents every key.
"""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from bastion.core.ids import is_valid_server_name
from bastion.core.room_versions import KNOWN_ROOM_VERSIONS
from bastion.errors import ConfigError


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ListenSettings(_Section):
    host: str = "127.0.0.1"
    port: Annotated[int, Field(ge=1, le=65535)] = 8008


class DatabaseSettings(_Section):
    url: str | None = None
    url_file: Path | None = None
    pool_size: Annotated[int, Field(gt=0, le=200)] = 10
    # How long a request waits for a PostgreSQL connection before it fails with 503.
    connect_timeout: Annotated[float, Field(gt=0, le=300)] = 5.0
    sqlite_synchronous: Literal["normal", "full"] = "normal"
    sqlite_readers: Annotated[int, Field(gt=0, le=32)] = 2

    @model_validator(mode="after")
    def _one_url(self) -> DatabaseSettings:
        if self.url is None and self.url_file is None:
            raise ValueError("set 'url' (or 'url_file')")
        if self.url is not None and self.url_file is not None:
            raise ValueError("set only one of 'url' and 'url_file'")
        return self

    def resolved_url(self) -> str:
        if self.url is not None:
            return self.url
        assert self.url_file is not None
        return self.url_file.read_text().strip()

    @property
    def dialect(self) -> Literal["sqlite", "postgres"]:
        url = self.resolved_url()
        return "sqlite" if url.startswith("sqlite:") else "postgres"


class RegistrationSettings(_Section):
    enabled: bool = False
    require_token: bool = True
    shared_secret: str | None = None
    shared_secret_file: Path | None = None

    @model_validator(mode="after")
    def _secret(self) -> RegistrationSettings:
        if self.shared_secret is not None and self.shared_secret_file is not None:
            raise ValueError("set only one of 'shared_secret' and 'shared_secret_file'")
        if self.shared_secret is not None and len(self.shared_secret) < 16:
            raise ValueError("'shared_secret' must be at least 16 characters")
        return self

    def resolved_shared_secret(self) -> str | None:
        if self.shared_secret_file is not None:
            return self.shared_secret_file.read_text().strip() or None
        return self.shared_secret


class PasswordHashingSettings(_Section):
    """argon2id cost. Defaults are RFC 9106's second recommended option (64 MiB)."""

    time_cost: Annotated[int, Field(ge=1, le=20)] = 3
    memory_kib: Annotated[int, Field(ge=8, le=4 * 1024 * 1024)] = 65536
    parallelism: Annotated[int, Field(ge=1, le=64)] = 4
    min_length: Annotated[int, Field(ge=1, le=256)] = 8


class LimitsSettings(_Section):
    max_request_body_bytes: Annotated[int, Field(ge=1024, le=64 * 1024 * 1024)] = 1024 * 1024
    sync_max_timeout_ms: Annotated[int, Field(ge=0, le=600_000)] = 60_000
    # While this worker's event loop runs timers sync_pacing_busy_lag_ms late or more
    # (mean over 100 ms), a device gets at most one long-poll /sync answer per
    # sync_pacing_ms (0: never paced).
    sync_pacing_ms: Annotated[int, Field(ge=0, le=1000)] = 50
    sync_pacing_busy_lag_ms: Annotated[float, Field(ge=0, le=1000)] = 5
    timeline_limit_default: Annotated[int, Field(ge=1, le=1000)] = 10
    timeline_limit_max: Annotated[int, Field(ge=1, le=1000)] = 100
    messages_limit_max: Annotated[int, Field(ge=1, le=1000)] = 1000


class AdminApiSettings(_Section):
    """The Synapse-compatible admin endpoints (``/_synapse/admin``)."""

    enabled: bool = True
    allowed_networks: list[str] = Field(default_factory=lambda: ["127.0.0.0/8", "::1/128"])

    @field_validator("allowed_networks")
    @classmethod
    def _networks(cls, value: list[str]) -> list[str]:
        for net in value:
            try:
                ipaddress.ip_network(net, strict=False)
            except ValueError as exc:
                raise ValueError(f"{net!r} is not an IP network") from exc
        return value


class PresenceSettings(_Section):
    enabled: bool = True
    idle_after_s: Annotated[float, Field(ge=10, le=86400)] = 300
    offline_after_s: Annotated[float, Field(ge=5, le=3600)] = 30


class RoomDirectorySettings(_Section):
    publishers: Literal["admins", "room_moderators"] = "admins"
    public_without_auth: bool = False


class UserDirectorySettings(_Section):
    search_all_users: bool = False
    # GET /profile of another user only for those this directory would find for the requester.
    limit_profiles: bool = False


class PushSettings(_Section):
    gateway_url_prefixes: list[str] = Field(default_factory=list)
    # Off: every notification leaves in the event_id_only format, whatever the pusher asked.
    full_notifications: bool = False


class MediaSettings(_Section):
    store_path: Path | None = None
    max_upload_bytes: Annotated[int, Field(ge=1024, le=10 * 1024**3)] = 100 * 1024 * 1024
    user_quota_bytes: Annotated[int, Field(ge=0)] = 10 * 1024**3
    uploads_per_minute: Annotated[int, Field(ge=1, le=100_000)] = 60
    max_image_pixels: Annotated[int, Field(ge=1, le=1_000_000_000)] = 32_000_000
    legacy_unauthenticated: bool = False


class UrlPreviewSettings(_Section):
    enabled: bool = False
    blocked_networks: list[str] = Field(default_factory=list)
    allowed_networks: list[str] = Field(default_factory=list)
    allowed_ports: list[int] = Field(default_factory=lambda: [80, 443])
    max_bytes: Annotated[int, Field(ge=1024, le=100 * 1024 * 1024)] = 2 * 1024 * 1024
    timeout_s: Annotated[float, Field(gt=0, le=120)] = 10

    @field_validator("blocked_networks", "allowed_networks")
    @classmethod
    def _nets(cls, value: list[str]) -> list[str]:
        for net in value:
            try:
                ipaddress.ip_network(net, strict=False)
            except ValueError as exc:
                raise ValueError(f"{net!r} is not an IP network") from exc
        return value


class EncryptionSettings(_Section):
    """Encryption at rest (docs/security/encryption-at-rest.md)."""

    enabled: bool = True
    cipher: Literal["aes-256-gcm", "sm4-gcm"] = "aes-256-gcm"
    key_provider: Literal["file", "env", "command"] = "file"
    key_file: Path | None = None
    key_env: str = "BASTION_KEK"
    key_command: list[str] = Field(default_factory=list)

    @model_validator(mode="after")
    def _provider(self) -> EncryptionSettings:
        if self.enabled and self.key_provider == "file" and self.key_file is None:
            raise ValueError("set 'key_file' (bastion init writes one) or choose another key_provider")
        if self.enabled and self.key_provider == "command" and not self.key_command:
            raise ValueError("set 'key_command' for key_provider 'command'")
        return self


class RedisSettings(_Section):
    """The bus between worker processes (docs/deployment.md)."""

    url: str | None = None
    url_file: Path | None = None

    def resolved_url(self) -> str | None:
        if self.url_file is not None:
            return self.url_file.read_text().strip() or None
        return self.url


class MetricsSettings(_Section):
    enabled: bool = False
    listen: ListenSettings = Field(default_factory=lambda: ListenSettings(host="127.0.0.1", port=9108))


class LoggingSettings(_Section):
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    access_log: bool = False


class WellKnownSettings(_Section):
    client_base_url: str | None = None


class Settings(_Section):
    server_name: str
    data_dir: Path
    signing_key_path: Path
    listen: ListenSettings = Field(default_factory=ListenSettings)
    database: DatabaseSettings
    registration: RegistrationSettings = Field(default_factory=RegistrationSettings)
    password_hashing: PasswordHashingSettings = Field(default_factory=PasswordHashingSettings)
    limits: LimitsSettings = Field(default_factory=LimitsSettings)
    admin_api: AdminApiSettings = Field(default_factory=AdminApiSettings)
    logging: LoggingSettings = Field(default_factory=LoggingSettings)
    presence: PresenceSettings = Field(default_factory=PresenceSettings)
    push: PushSettings = Field(default_factory=PushSettings)
    media: MediaSettings = Field(default_factory=MediaSettings)
    encryption: EncryptionSettings = Field(default_factory=EncryptionSettings)
    redis: RedisSettings = Field(default_factory=RedisSettings)
    metrics: MetricsSettings = Field(default_factory=MetricsSettings)
    url_preview: UrlPreviewSettings = Field(default_factory=UrlPreviewSettings)
    room_directory: RoomDirectorySettings = Field(default_factory=RoomDirectorySettings)
    user_directory: UserDirectorySettings = Field(default_factory=UserDirectorySettings)
    well_known: WellKnownSettings = Field(default_factory=WellKnownSettings)
    trusted_proxies: list[str] = Field(default_factory=list)
    default_room_version: str = "10"
    encryption_enabled_by_default_for_room_type: Literal["off", "all", "invite"] = "off"
    shutdown_grace_seconds: Annotated[float, Field(ge=0, le=600)] = 10.0

    @field_validator("server_name")
    @classmethod
    def _server_name(cls, value: str) -> str:
        if not is_valid_server_name(value):
            raise ValueError("must be a hostname with an optional port, e.g. 'example.org'")
        return value

    @field_validator("default_room_version")
    @classmethod
    def _room_version(cls, value: str) -> str:
        if value not in KNOWN_ROOM_VERSIONS:
            raise ValueError(f"supported room versions are {sorted(KNOWN_ROOM_VERSIONS)}")
        return value

    @field_validator("trusted_proxies")
    @classmethod
    def _proxies(cls, value: list[str]) -> list[str]:
        for net in value:
            try:
                ipaddress.ip_network(net, strict=False)
            except ValueError as exc:
                raise ValueError(f"{net!r} is not an IP network") from exc
        return value


def _format_error(exc: ValidationError) -> str:
    lines = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"]) or "(top level)"
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            msg = "unknown key (check the spelling against docs/configuration.md)"
        elif err["type"] == "missing":
            msg = "required key is missing"
        lines.append(f"config key '{loc}': {msg}")
    return "\n".join(lines)


def parse_settings(data: Any, base_dir: Path | None = None) -> Settings:
    if not isinstance(data, dict):
        raise ConfigError("the config file must contain a YAML mapping of keys to values")
    try:
        settings = Settings.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_format_error(exc)) from None
    # Resolve secrets eagerly so a missing secret file fails at start-up, not later.
    try:
        settings.database.resolved_url()
        settings.registration.resolved_shared_secret()
    except OSError as exc:
        raise ConfigError(f"cannot read a secret file: {exc}") from None
    url = settings.database.resolved_url()
    if not (url.startswith("sqlite:") or url.startswith(("postgresql://", "postgres://"))):
        raise ConfigError("config key 'database.url': must start with sqlite:/// or postgresql://")
    return settings


def load_settings(path: Path) -> Settings:
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path} is not valid YAML: {exc}") from None
    return parse_settings(data, path.parent)
