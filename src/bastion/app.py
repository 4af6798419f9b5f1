"""Building the server: every service constructed once, in one place, from the settings.

:class:`Homeserver` is the whole object graph — database, caches, streams and
services — with no module-level state, so several can live in one process (tests
do this; App IDs will). :func:`create_app` wraps it in the ASGI application.

Data flows one way: ``api`` -> ``services`` -> ``storage``; the persister publishes
to the caches and the notifier only after a commit.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import secrets
from pathlib import Path
from typing import Any

from bastion import gc_tuning
from bastion.api.http import MatrixApp, Request, RouteTable
from bastion.cluster.bus import RedisBus
from bastion.cluster.replication import Replicator, StreamHandler
from bastion.cluster.single import claim_single_process, release_single_process
from bastion.core.ids import is_valid_room_alias
from bastion.core.signing import SigningKey
from bastion.errors import BadJson, ConfigError, MatrixError
from bastion.security.crypto import (
    CommandKeyProvider,
    EnvKeyProvider,
    FileKeyProvider,
    IntegrityError,
    KeyProvider,
    suite_available,
)
from bastion.security.keyring import Keyring
from bastion.security.passwords import PasswordHasher
from bastion.services.account_data import AccountDataService
from bastion.services.accounts import AccountService
from bastion.services.aliases import AliasService
from bastion.services.auth import AuthService, PasswordChecker, UiaService
from bastion.services.caches import EventCache, MembershipIndex, RoomCache
from bastion.services.deactivation import DeactivationService
from bastion.services.devices import DeviceService
from bastion.services.directory import DirectoryService
from bastion.services.e2ee import KeysService
from bastion.services.filters import FilterService
from bastion.services.key_backup import KeyBackupService
from bastion.services.media import MediaConfig, MediaService
from bastion.services.media_store import LocalMediaStore
from bastion.services.persister import EventPersister
from bastion.services.presence import PresenceService
from bastion.services.profiles import ProfileService
from bastion.services.purge import PurgeService
from bastion.services.push import PusherService, PushRulesService
from bastion.services.receipts import ReceiptsService
from bastion.services.relations import Bundler, RelationsService
from bastion.services.room_events import EventService
from bastion.services.room_reads import RoomReadService
from bastion.services.rooms import RoomService
from bastion.services.search import SearchService
from bastion.services.signals import SignalPoller
from bastion.services.sync import SyncService
from bastion.services.sync_pacing import SyncPacer
from bastion.services.typing import TypingService
from bastion.services.url_preview import UrlPreviewService
from bastion.settings import Settings
from bastion.storage import accounts as accounts_store
from bastion.storage import events as events_store
from bastion.storage import invalidations as invalidations_store
from bastion.storage import push_actions as push_actions_store
from bastion.storage import streams as streams_store
from bastion.storage.database import Database, open_database
from bastion.storage.migrate import migrate
from bastion.streams.notifier import Notifier
from bastion.streams.tokens import StreamToken, durable_positions

log = logging.getLogger(__name__)


LAST_SEEN_FLUSH_S = 30.0


def load_signing_key(settings: Settings) -> SigningKey:
    try:
        return SigningKey.load(settings.signing_key_path)
    except FileNotFoundError:
        raise ConfigError(
            f"config key 'signing_key_path': {settings.signing_key_path} does not exist (run 'bastion init')"
        ) from None
    except (OSError, ValueError) as exc:
        raise ConfigError(f"config key 'signing_key_path': cannot read the signing key: {exc}") from None


def password_hasher(settings: Settings) -> PasswordHasher:
    cost = settings.password_hashing
    return PasswordHasher(cost.time_cost, cost.memory_kib, cost.parallelism)


def key_provider(settings: Settings) -> KeyProvider:
    enc = settings.encryption
    if enc.key_provider == "file":
        if enc.key_file is None:
            raise ConfigError("config key 'encryption.key_file': required (bastion init writes one), or set encryption.enabled: false")
        return FileKeyProvider(enc.key_file)
    if enc.key_provider == "env":
        return EnvKeyProvider(enc.key_env)
    return CommandKeyProvider(list(enc.key_command))


def build_keyring(settings: Settings) -> Keyring | None:
    enc = settings.encryption
    if not enc.enabled:
        return None
    if not suite_available(enc.cipher):
        raise ConfigError(f"config key 'encryption.cipher': {enc.cipher} is not available in this OpenSSL build")
    provider = key_provider(settings)
    return Keyring(provider.load(), enc.cipher, provider=provider)


def _check_keys(txn: Any, keyring: Keyring | None) -> None:
    """Refuse to start with the wrong key: never serve garbage, never mix keys."""
    check = txn.fetchval("SELECT value FROM server_meta WHERE key = 'kek_check'")
    encrypted = txn.fetchval("SELECT value FROM server_meta WHERE key = 'encryption'")
    if keyring is None:
        if encrypted == "on":
            raise ConfigError("config key 'encryption.enabled': this database holds encrypted data; encryption must stay enabled")
        return
    if check is None:
        txn.execute("INSERT INTO server_meta (key, value) VALUES ('kek_check', ?)", (keyring.kek_check_value(),))
        txn.execute(
            "INSERT INTO server_meta (key, value) VALUES ('encryption', 'on') ON CONFLICT (key) DO UPDATE SET value = 'on'"
        )
        return
    if not keyring.matches_check(check):
        raise ConfigError(
            "encryption key mismatch: the configured key-encryption key is not the one this database's data keys "
            "are wrapped with (wrong key file, or a key rotated away); refusing to start"
        )
    row = txn.fetchone(
        "SELECT id, scope, scope_id, version, suite, wrapped, kek_id FROM encryption_keys "
        "WHERE state <> 'destroyed' ORDER BY id DESC LIMIT 1"
    )
    if row is not None:
        try:
            keyring._unwrap(row)
        except IntegrityError as exc:
            raise ConfigError(f"encryption key mismatch: {exc}; refusing to start") from None
    if encrypted != "on":
        txn.execute(
            "INSERT INTO server_meta (key, value) VALUES ('encryption', 'on') ON CONFLICT (key) DO UPDATE SET value = 'on'"
        )


def media_root(settings: Settings) -> Path:
    """Where uploads live: ``media.store_path``, else ``<data_dir>/media``."""
    return settings.media.store_path or settings.data_dir / "media"


def media_store_for(settings: Settings) -> LocalMediaStore:
    return LocalMediaStore(media_root(settings))


def open_migrated_database(settings: Settings) -> Database:
    url = settings.database.resolved_url()
    keyring = build_keyring(settings)
    migrate(url)
    db = open_database(
        url,
        pool_size=settings.database.pool_size,
        connect_timeout=settings.database.connect_timeout,
        sqlite_synchronous=settings.database.sqlite_synchronous,
        sqlite_readers=settings.database.sqlite_readers,
    )
    try:
        db.run_sync(_check_keys, keyring)
    except BaseException:
        import asyncio as _asyncio

        _asyncio.run(db.close())
        raise
    db.crypto = keyring
    return db


def _load_remote_events(txn: Any, after: int, upto: int) -> tuple[Any, Any, Any]:
    """Events other workers committed in ``(after, upto]`` and what their push rules decided."""
    events, replacing = events_store.events_in_range(txn, after, upto)
    return events, replacing, push_actions_store.staged_decisions(txn, after, upto)


def _initial_positions(durable: dict[str, int]) -> StreamToken:
    from bastion.clock import now_ms

    ephemeral = now_ms()  # typing and presence positions are clock-based (shared by workers)
    return StreamToken(
        events=durable["events"],
        account_data=durable["account_data"],
        receipts=durable["receipts"],
        typing=ephemeral,
        presence=ephemeral,
        to_device=durable["to_device"],
        device_lists=durable["device_lists"],
    )


class Homeserver:
    """All services of one server, built from one :class:`Settings`."""

    def __init__(self, settings: Settings, db: Database, signing_key: SigningKey, positions: StreamToken) -> None:
        self.settings = settings
        self.db = db
        self.signing_key = signing_key
        server_name = settings.server_name
        self.instance_id = secrets.token_hex(8)
        self.notifier = Notifier(positions)
        self.replicator = Replicator(db, durable_positions(positions), clustered=settings.redis.resolved_url() is not None)
        self.bus: RedisBus | None = None
        self._single_lock: Any = None
        self.event_cache = EventCache(db)
        self.room_cache = RoomCache(db, self.event_cache)
        self.memberships = MembershipIndex(db)
        self.persister = EventPersister(db, self.event_cache, self.room_cache, self.memberships, self.notifier, self.replicator)
        self.events = EventService(
            server_name=server_name,
            signing_key=signing_key,
            db=db,
            rooms=self.room_cache,
            events=self.event_cache,
            persister=self.persister,
        )
        self.events.replicator = self.replicator
        self.aliases = AliasService(server_name, db, self.events)
        self.events.validators.append(self._validate_canonical_alias)
        self.directory = DirectoryService(
            db,
            self.room_cache,
            server_name,
            publishers=settings.room_directory.publishers,
            search_all_users=settings.user_directory.search_all_users,
        )
        self.rooms = RoomService(
            server_name=server_name,
            db=db,
            events=self.events,
            memberships=self.memberships,
            aliases=self.aliases,
            directory=self.directory,
            default_room_version=settings.default_room_version,
            encrypt_by_default=settings.encryption_enabled_by_default_for_room_type,
        )
        self.bundler = Bundler(db, self.event_cache)
        self.reads = RoomReadService(
            db=db,
            events=self.events,
            event_cache=self.event_cache,
            notifier=self.notifier,
            bundler=self.bundler,
            max_limit=settings.limits.messages_limit_max,
            ignored_users=self._ignored_users,
        )
        self.relations = RelationsService(db, self.event_cache, self.reads, self.bundler)
        self.events.validators.append(self.relations.validate_new_event)
        self.search = SearchService(db, self.room_cache, self.event_cache, self.memberships, self.reads, self.bundler)
        self.account_data = AccountDataService(db, self.notifier, self.replicator)
        self.receipts = ReceiptsService(db, self.room_cache, self.event_cache, self.notifier, self.account_data, self.replicator)
        self.typing = TypingService(self.room_cache, self.notifier)
        self.keys = KeysService(db, server_name, self.room_cache, self.memberships, self.notifier, self.replicator)
        self.key_backup = KeyBackupService(db)
        self.push_rules = PushRulesService(db, self.room_cache, self.memberships, self.receipts, self.account_data)
        self.events.persist_hooks.append(self.push_rules.decide)  # push actions, in the event's transaction
        self.pushers = PusherService(db, self.push_rules, self.room_cache, list(settings.push.gateway_url_prefixes),
                                     full_notifications=settings.push.full_notifications)
        self.persister.listeners.append(self.pushers.on_persisted)
        self.presence = PresenceService(
            enabled=settings.presence.enabled,
            rooms=self.room_cache,
            memberships=self.memberships,
            notifier=self.notifier,
            idle_after_s=settings.presence.idle_after_s,
            offline_after_s=settings.presence.offline_after_s,
        )
        self.sync_pacer = SyncPacer(
            settings.limits.sync_pacing_ms / 1000, settings.limits.sync_pacing_busy_lag_ms / 1000
        )
        self.sync = SyncService(
            db=db,
            rooms=self.room_cache,
            event_cache=self.event_cache,
            memberships=self.memberships,
            notifier=self.notifier,
            account_data=self.account_data,
            receipts=self.receipts,
            typing=self.typing,
            presence=self.presence,
            bundler=self.bundler,
            push=self.push_rules,
            keys=self.keys,
            max_timeout_ms=settings.limits.sync_max_timeout_ms,
            pacer=self.sync_pacer,
            timeline_limit_max=settings.limits.timeline_limit_max,
        )
        self.filters = FilterService(db)
        self.passwords = PasswordChecker(password_hasher(settings))
        self.auth = AuthService(db, server_name, self.passwords)
        self.uia = UiaService(db, self.auth)
        self.accounts = AccountService(
            server_name=server_name,
            db=db,
            auth=self.auth,
            uia=self.uia,
            min_password_length=settings.password_hashing.min_length,
            registration_enabled=settings.registration.enabled,
            registration_requires_token=settings.registration.require_token,
            shared_secret=settings.registration.resolved_shared_secret(),
        )
        self.profiles = ProfileService(
            db, self.events, self.memberships,
            limit_to_visible=settings.user_directory.limit_profiles,
            search_all_users=settings.user_directory.search_all_users,
        )
        self.devices = DeviceService(db, self.auth, self.uia)
        media = settings.media
        self.media = MediaService(
            db,
            media_store_for(settings),
            server_name,
            MediaConfig(
                max_upload_bytes=media.max_upload_bytes,
                user_quota_bytes=media.user_quota_bytes,
                uploads_per_minute=media.uploads_per_minute,
                max_image_pixels=media.max_image_pixels,
                legacy_unauthenticated=media.legacy_unauthenticated,
            ),
        )
        previews = settings.url_preview
        self.url_preview = UrlPreviewService(
            enabled=previews.enabled,
            blocked_networks=previews.blocked_networks,
            allowed_networks=previews.allowed_networks,
            allowed_ports=previews.allowed_ports,
            max_bytes=previews.max_bytes,
            timeout_s=previews.timeout_s,
        )
        self.deactivation = DeactivationService(db, self.auth, self.rooms, self.memberships)
        self.signals = SignalPoller(db)
        self.purge = PurgeService(db, self.rooms, self.room_cache, self.event_cache, self.memberships, settings.server_name)
        self.deactivation.erase_hooks.append(self.purge.erase_user)
        self.deactivation.erase_hooks.append(self.media.delete_user_media)
        self.signals.on("room_purged", self.purge.room_purged_elsewhere)
        self.signals.on("user_erased", self._user_erased_elsewhere)
        self.auth.device_hooks.append(self.keys.device_deleted)
        self.signals.on("deactivated", self._user_logged_out_elsewhere)
        self.signals.on("user_tokens", self._user_logged_out_elsewhere)
        self.signals.on("keys_rotated", self._keys_rotated)
        self.signals.on("kek_rotated", self._kek_rotated)
        self.persister.listeners.append(self._after_persist)
        self._tasks: list[asyncio.Task[Any]] = []
        self._trusted = [ipaddress.ip_network(n, strict=False) for n in settings.trusted_proxies]

    async def _user_logged_out_elsewhere(self, user_id: str) -> None:
        """The CLI ended a user's sessions (password change, deactivation)."""
        self.auth.forget_user(user_id)
        await self.keys.device_deleted(user_id, [])
        if await self.db.read(accounts_store.is_pending_deactivation, user_id):
            await self.deactivation.finish(user_id)

    def _keys_rotated(self, _scope: str) -> None:
        """``bastion keys rotate`` started new data keys: encrypt new data with them."""
        if self.db.crypto is not None:
            self.db.crypto.forget_active()

    async def _kek_rotated(self, _kek_id: str) -> None:
        keyring = self.db.crypto
        if keyring is not None and keyring.provider is not None:
            keyring.reload(await asyncio.to_thread(keyring.provider.load))

    def _user_erased_elsewhere(self, user_id: str) -> None:
        if self.db.crypto is not None:
            self.db.crypto.forget_scope("user", user_id)
            self.db.crypto.forget_destroyed()

    async def _ignored_users(self, user_id: str) -> frozenset[str]:
        return await self.account_data.ignored_users(user_id)

    def _after_persist(self, unit: Any) -> None:
        """Side effects of committed events on ephemeral state."""
        for event in unit.events:
            if event.type == "m.room.member" and event.state_key is not None and event.membership != "join":
                self.typing.stop_user(event.room_id, event.state_key)

    async def _validate_canonical_alias(self, event: Any, state: Any) -> None:
        """m.room.canonical_alias may only name aliases that point to the room (spec: M_BAD_ALIAS)."""
        if event.type != "m.room.canonical_alias" or event.state_key != "":
            return
        aliases: list[Any] = []
        if event.content.get("alias") is not None:
            aliases.append(event.content["alias"])
        alt = event.content.get("alt_aliases")
        if alt is not None:
            if not isinstance(alt, list):
                raise BadJson("'alt_aliases' must be a list of aliases")
            aliases.extend(alt)
        for alias in aliases:
            if not isinstance(alias, str) or not is_valid_room_alias(alias):
                raise MatrixError(f"{alias!r} is not a valid room alias", errcode="M_INVALID_PARAM", status=400)
            if not await self.aliases.alias_points_to(alias, event.room_id):
                raise MatrixError(f"{alias} does not point to this room", errcode="M_BAD_ALIAS", status=400)

    @classmethod
    async def start(cls, settings: Settings) -> Homeserver:
        loop = asyncio.get_running_loop()
        signing_key = load_signing_key(settings)
        db = await loop.run_in_executor(None, open_migrated_database, settings)
        single_lock = await loop.run_in_executor(None, claim_single_process, settings, db)
        durable = await db.read(streams_store.positions)
        positions = _initial_positions(durable)
        hs = cls(settings, db, signing_key, positions)
        hs._single_lock = single_lock
        hs._register_streams(durable[invalidations_store.STREAM])
        redis_url = settings.redis.resolved_url()
        if redis_url is not None:
            hs.bus = RedisBus(redis_url, hs.instance_id)
            hs.replicator.attach_bus(hs.bus)
            hs._attach_bus(hs.bus)
            await hs.bus.start()
        await hs.replicator.start()
        await hs.signals.start()
        hs._register_metrics()
        gc_tuning.install()
        hs._tasks.append(asyncio.create_task(gc_tuning.periodic_full_collection(), name="gc"))
        hs._tasks.append(asyncio.create_task(hs._periodic(), name="periodic"))
        hs._tasks.append(asyncio.create_task(hs.sync_pacer.run(), name="sync-pacing"))
        hs._tasks.append(asyncio.create_task(hs.deactivation.finish_pending(), name="pending-deactivations"))
        hs._tasks.append(asyncio.create_task(hs.push_rules.move_staged_rows(), name="push-actions"))
        hs.presence.start()
        await hs.pushers.start()
        log.info("Bastion ready for %s (stream position %d)", settings.server_name, positions.events)
        return hs

    def _register_metrics(self) -> None:
        from bastion import metrics

        metrics.SYNC_WAITING.set_function(lambda: self.notifier.waiting_count)
        metrics.LOOP_LAG_SECONDS.set_function(lambda: self.sync_pacer.lag)
        stats = getattr(self.db, "pool_stats", None)
        if stats is not None:
            metrics.DB_POOL_IN_USE.set_function(lambda: stats().get("in_use", 0))
            metrics.DB_POOL_SIZE.set_function(lambda: stats().get("size", 0))

    def _register_streams(self, invalidations_position: int) -> None:
        """How each durable stream's changes by other workers reach this worker's views."""
        self.replicator.register("events", StreamHandler(_load_remote_events, self._apply_remote_events))
        self.account_data.remote_change_hooks.append(self._account_data_changed_elsewhere)
        self.replicator.register("account_data", StreamHandler(AccountDataService.load_changes, self.account_data.apply_remote))
        self.replicator.register("receipts", StreamHandler(ReceiptsService.load_changes, self.receipts.apply_remote))
        self.replicator.register("to_device", StreamHandler(KeysService.load_to_device, self.keys.apply_remote_to_device))
        self.replicator.register(
            "device_lists", StreamHandler(KeysService.load_device_list_changes, self.keys.apply_remote_device_lists)
        )
        self.replicator.register(
            invalidations_store.STREAM, StreamHandler(invalidations_store.load, self._apply_invalidations),
            invalidations_position,
            applied_first=True,
        )

    async def _apply_remote_events(self, loaded: Any, upto: int) -> None:
        events, replacing, decisions = loaded
        if decisions is not None:  # before the events wake anyone: their unread counts need them
            self.push_rules.remember_remote(events, decisions)
        await self.persister.apply_remote((events, replacing), upto)

    async def _apply_invalidations(self, rows: list[tuple[str, str, str | None]] | None, upto: int) -> None:
        """Drop cache entries that writes on other workers (or the CLI) made stale."""
        if rows is None:  # this worker fell behind the pruned rows: drop the whole caches
            self.auth.forget_all()
            self.keys.forget_counts()
            return
        for kind, user_id, device_id in rows:
            if kind == invalidations_store.TOKENS:
                self.auth.forget_user(user_id, publish=False)
            elif kind == invalidations_store.KEYS and device_id is not None:
                self.keys.forget_counts((user_id, device_id))

    def _attach_bus(self, bus: RedisBus) -> None:
        """Ephemeral state and cache invalidations that travel only on the bus."""
        self.typing.bus = bus
        self.presence.bus = bus
        self.auth.bus = bus
        self.pushers.bus = bus
        self.rooms.bus = bus
        self.media.limiter.bus = bus
        bus.on_message(self.typing.on_bus)
        bus.on_message(self.presence.on_bus)
        bus.on_message(self.auth.on_bus)
        bus.on_message(self._on_bus)

    async def _on_bus(self, kind: str, data: dict[str, Any]) -> None:
        if kind == "signals":
            await self.signals.poll_once()  # the CLI changed something
        elif kind == "pushers":
            await self.pushers.start()  # reload who has pushers
        elif kind == "forgotten" and isinstance(data.get("u"), str) and isinstance(data.get("r"), str):
            self.memberships.set_forgotten(data["u"], data["r"])

    def _account_data_changed_elsewhere(self, user_id: str, room_id: str, data_type: str) -> None:
        if data_type == "m.push_rules" and not room_id:
            self.push_rules.forget_user(user_id)

    async def _periodic(self) -> None:
        from bastion.clock import now_ms

        while True:
            await asyncio.sleep(LAST_SEEN_FLUSH_S)
            try:
                await self.auth.flush_last_seen()
                await self.db.write(accounts_store.expire_uia_sessions, now_ms() - 3600 * 1000)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("periodic maintenance failed: %s", exc)

    def trusts_proxy(self, req: Request) -> bool:
        client = req.scope.get("client")
        if not client or not self._trusted:
            return False
        try:
            return any(ipaddress.ip_address(client[0]) in net for net in self._trusted)
        except ValueError:
            return False

    def begin_shutdown(self) -> None:
        """Release long-polls so in-flight requests can finish quickly."""
        self.notifier.shutdown()

    async def close(self) -> None:
        self.notifier.shutdown()
        await self.persister.flush()
        await self.replicator.close()
        if self.bus is not None:
            await self.bus.close()
        await self.presence.stop()
        await self.pushers.close()
        self.media.close()
        self.typing.close()
        await self.signals.stop()
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        with contextlib.suppress(Exception):
            await self.auth.flush_last_seen()
        self.passwords.close()
        gc_tuning.uninstall()
        release_single_process(self._single_lock)
        await self.db.close()


def build_routes() -> RouteTable:
    from bastion.api.admin import media as admin_media
    from bastion.api.admin import register as admin_register
    from bastion.api.admin import rooms as admin_rooms
    from bastion.api.client import (
        account,
        directory,
        discovery,
        ephemeral,
        keys,
        media,
        profile,
        push,
        relations,
        rooms,
        sync,
    )

    routes = RouteTable()
    modules = (
        discovery, account, rooms, sync, profile, ephemeral, directory, relations, push, keys, media,
        admin_register, admin_media, admin_rooms,
    )
    for module in modules:
        module.register(routes)
    return routes


def create_app(settings: Settings) -> MatrixApp:
    """The ASGI application for ``settings``; services are built at lifespan start-up."""

    async def factory() -> Homeserver:
        return await Homeserver.start(settings)

    return MatrixApp(build_routes(), factory, settings)
