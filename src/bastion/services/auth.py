"""Access-token authentication and user-interactive authentication (UIA).

Token lookups are cached in memory (every request needs one) and the cache is
invalidated wherever tokens die: logout, password change, device deletion,
deactivation — including by the CLI in another process, through the
``server_signals`` table that :mod:`bastion.services.signals` tails.

UIA sessions are stored in the database (so any worker can continue one) and bound
to the request they started with (method, path and user): a session opened to
change a password cannot be replayed to authorise something else.
"""

from __future__ import annotations

import asyncio
import hashlib
import secrets
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from bastion.clock import now_ms
from bastion.core.ids import is_valid_user_id
from bastion.errors import BadJson, Forbidden, InteractiveAuthRequired, MatrixError, UnknownToken
from bastion.security.passwords import PasswordHasher
from bastion.security.tokens import hash_token
from bastion.services.requester import Requester
from bastion.storage import accounts as accounts_store
from bastion.storage.accounts import TokenOwner
from bastion.storage.database import Database

UIA_SESSION_LIFETIME_MS = 15 * 60 * 1000


class PasswordChecker:
    """Runs argon2 on a small dedicated pool: hashing is CPU- and memory-heavy by design,
    and bounding its concurrency bounds the memory an attacker can make us use."""

    def __init__(self, hasher: PasswordHasher, threads: int = 2) -> None:
        self.hasher = hasher
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="argon2")

    async def hash(self, password: str) -> str:
        return await asyncio.get_running_loop().run_in_executor(self._pool, self.hasher.hash, password)

    async def verify(self, stored: str | None, password: str) -> bool:
        return await asyncio.get_running_loop().run_in_executor(self._pool, self.hasher.verify, stored, password)

    def close(self) -> None:
        self._pool.shutdown(wait=False)


class AuthService:
    def __init__(self, db: Database, server_name: str, passwords: PasswordChecker, cache_size: int = 100_000) -> None:
        self._db = db
        self.server_name = server_name
        self.passwords = passwords
        self._cache: OrderedDict[bytes, TokenOwner] = OrderedDict()
        # Bumped whenever cached tokens are dropped: a lookup that started before a drop
        # must not cache what it read (the token may have been revoked since).
        self._generation = 0
        # With several workers a token revoked on another one is dropped from this cache
        # by the bus at once and, durably, by the cache-invalidation stream that every
        # worker reads before each authenticated request (cluster/replication.py).
        self.bus: Any = None
        self._background: set[asyncio.Task[Any]] = set()
        self._by_user: dict[str, set[bytes]] = {}
        self._max = cache_size
        self._seen: dict[tuple[str, str], tuple[int, str | None, str | None]] = {}
        # Called after devices are deleted (user, device IDs; [] when not known):
        # the encryption service records a device-list change.
        self.device_hooks: list[Callable[[str, list[str]], Awaitable[None]]] = []

    # -- access tokens ---------------------------------------------------------------------

    async def authenticate(self, token: str, ip: str | None, user_agent: str | None) -> Requester:
        token_hash = hash_token(token)
        owner = self._cache.get(token_hash)
        if owner is None:
            generation = self._generation
            owner = await self._db.read(accounts_store.get_token_owner, token_hash)
            if owner is None or owner.is_deactivated:
                self.forget_tokens([token_hash], publish=False)
                raise UnknownToken("Unknown access token", soft_logout=False)
            if generation == self._generation:
                self._cache[token_hash] = owner
                self._by_user.setdefault(owner.user_id, set()).add(token_hash)
                if len(self._cache) > self._max:
                    old_hash, old_owner = self._cache.popitem(last=False)
                    self._by_user.get(old_owner.user_id, set()).discard(old_hash)
        self._seen[(owner.user_id, owner.device_id)] = (now_ms(), ip, user_agent)
        return Requester(owner.user_id, owner.device_id, owner.is_admin, ip, user_agent)

    def last_seen(self, user_id: str, device_id: str) -> tuple[int, str | None] | None:
        """Activity seen since the last flush to the database, if any."""
        seen = self._seen.get((user_id, device_id))
        return (seen[0], seen[1]) if seen is not None else None

    async def devices_removed(self, user_id: str, device_ids: list[str]) -> None:
        for hook in self.device_hooks:
            await hook(user_id, device_ids)

    def forget_tokens(self, hashes: Iterable[bytes], publish: bool = True) -> None:
        hashes = list(hashes)
        self._generation += 1
        for token_hash in hashes:
            cached = self._cache.pop(token_hash, None)
            if cached is not None:
                self._by_user.get(cached.user_id, set()).discard(token_hash)
        if publish and hashes:
            self._publish({"h": [h.hex() for h in hashes]})

    def forget_user(self, user_id: str, publish: bool = True) -> None:
        self._generation += 1
        for token_hash in self._by_user.pop(user_id, set()):
            self._cache.pop(token_hash, None)
        if publish:
            self._publish({"user": user_id})

    def forget_all(self) -> None:
        self._generation += 1
        self._cache.clear()
        self._by_user.clear()

    def _publish(self, payload: dict[str, Any]) -> None:
        if self.bus is None:
            return
        task = asyncio.get_running_loop().create_task(self.bus.publish("tokens", payload))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def on_bus(self, kind: str, data: dict[str, Any]) -> None:
        """Tokens revoked on another worker."""
        if kind != "tokens":
            return
        if isinstance(data.get("user"), str):
            self.forget_user(data["user"], publish=False)
        hashes = data.get("h")
        if isinstance(hashes, list):
            try:
                parsed = [bytes.fromhex(h) for h in hashes if isinstance(h, str)]
            except ValueError:
                return
            self.forget_tokens(parsed, publish=False)

    async def flush_last_seen(self) -> None:
        """Write device last-seen data gathered since the previous flush (batched)."""
        if not self._seen:
            return
        seen, self._seen = self._seen, {}
        rows = [(ts, ip, ua, user, device) for (user, device), (ts, ip, ua) in seen.items()]
        await self._db.write(accounts_store.touch_devices, rows)

    # -- passwords ----------------------------------------------------------------------------

    def parse_identifier(self, body: dict[str, Any]) -> str:
        """The user ID named by a login/UIA body (``identifier`` or legacy ``user``)."""
        identifier = body.get("identifier")
        user: Any
        if identifier is not None:
            if not isinstance(identifier, dict):
                raise BadJson("'identifier' must be an object")
            id_type = identifier.get("type")
            if id_type != "m.id.user":
                raise MatrixError("Only the m.id.user identifier type is supported", errcode="M_UNKNOWN", status=400)
            user = identifier.get("user")
        else:
            user = body.get("user")
        if not isinstance(user, str) or not user:
            raise BadJson("Missing user identifier")
        if user.startswith("@"):
            user_id = user
        else:
            user_id = f"@{user}:{self.server_name}"
        local, _, server = user_id[1:].partition(":")
        return f"@{local.lower()}:{server}"

    async def check_password(self, user_id: str, password: Any) -> bool:
        """True if ``password`` is right for ``user_id``; same cost whether or not the user exists."""
        if not isinstance(password, str):
            raise BadJson("'password' must be a string")
        if not is_valid_user_id(user_id) or not user_id.endswith(":" + self.server_name):
            await self.passwords.verify(None, password)
            return False
        user = await self._db.read(accounts_store.get_user, user_id)
        stored = user.password_hash if user is not None and not user.is_deactivated else None
        ok = await self.passwords.verify(stored, password)
        if ok and stored is not None and self.passwords.hasher.needs_rehash(stored):
            # The hash predates today's cost settings: replace it now that the password is
            # known (unless it changed meanwhile).
            fresh = await self.passwords.hash(password)
            await self._db.write(accounts_store.replace_password_hash, user_id, stored, fresh)
        return ok


class UiaService:
    """User-interactive authentication for one endpoint call at a time."""

    def __init__(self, db: Database, auth: AuthService) -> None:
        self._db = db
        self._auth = auth

    @staticmethod
    def fingerprint(method: str, path: str, user_id: str | None) -> str:
        return hashlib.sha256(f"{method} {path} {user_id or ''}".encode()).hexdigest()

    def _challenge(self, session: str, flows: list[list[str]], completed: list[str], params: dict[str, Any]) -> dict[str, Any]:
        return {
            "flows": [{"stages": f} for f in flows],
            "params": params,
            "session": session,
            "completed": completed,
        }

    async def authenticate(
        self,
        body: dict[str, Any],
        *,
        flows: list[list[str]],
        fingerprint: str,
        user_id: str | None,
        stage_handlers: dict[str, Callable[[dict[str, Any]], Any]] | None = None,
        params: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        """Return the completed ``auth`` dict once a flow is complete; else raise 401.

        ``user_id`` is the account the password stage must match (None during
        registration). ``stage_handlers`` validate extra stage types (e.g. tokens).
        """
        params = params or {}
        auth = body.get("auth")
        ts = now_ms()
        if auth is None:
            session = secrets.token_urlsafe(24)
            await self._db.write(accounts_store.create_uia_session, session, user_id, fingerprint, ts)
            raise InteractiveAuthRequired(self._challenge(session, flows, [], params))
        if not isinstance(auth, dict):
            raise BadJson("'auth' must be an object")
        given = auth.get("session")
        completed: list[str] = []
        if given is None:
            session = secrets.token_urlsafe(24)
            await self._db.write(accounts_store.create_uia_session, session, user_id, fingerprint, ts)
        else:
            if not isinstance(given, str) or "\x00" in given or len(given) > 255:
                raise BadJson("'auth.session' must be a session ID string")
            session = given
            stored = await self._db.read(accounts_store.get_uia_session, session)
            if stored is None or stored[3] < ts - UIA_SESSION_LIFETIME_MS:
                raise MatrixError("Unknown or expired UIA session", errcode="M_UNRECOGNIZED", status=400)
            if stored[1] != fingerprint:
                raise Forbidden("This UIA session was started for a different request")
            completed = stored[2]

        stage = auth.get("type")
        if stage is not None:
            allowed = {s for f in flows for s in f}
            if not isinstance(stage, str) or stage not in allowed:
                raise InteractiveAuthRequired(
                    self._challenge(session, flows, completed, params), "Unsupported authentication type", "M_UNRECOGNIZED"
                )
            try:
                await self._run_stage(stage, auth, user_id, stage_handlers or {})
            except Forbidden as exc:
                raise InteractiveAuthRequired(self._challenge(session, flows, completed, params), exc.message, exc.errcode) from None
            if stage not in completed:
                completed = [*completed, stage]
                await self._db.write(accounts_store.set_uia_completed, session, completed)

        for flow in flows:
            if all(s in completed for s in flow):
                await self._db.write(accounts_store.delete_uia_session, session)
                return auth
        raise InteractiveAuthRequired(self._challenge(session, flows, completed, params))

    async def _run_stage(
        self, stage: str, auth: dict[str, Any], user_id: str | None, handlers: dict[str, Callable[[dict[str, Any]], Any]]
    ) -> None:
        if stage == "m.login.dummy":
            return
        if stage == "m.login.password":
            if user_id is None:
                raise Forbidden("Password authentication needs an existing account")
            claimed = self._auth.parse_identifier(auth)
            if claimed != user_id or not await self._auth.check_password(user_id, auth.get("password")):
                raise Forbidden("Invalid password")
            return
        handler = handlers.get(stage)
        if handler is None:
            raise Forbidden("Unsupported authentication stage")
        result = handler(auth)
        if asyncio.iscoroutine(result):
            await result
