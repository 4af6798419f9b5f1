"""Accounts: registration, login, logout, password changes, deactivation.

Security properties (see docs/security.md):

* Passwords are hashed with argon2id and never truncated; a minimum length is
  enforced (``password_hashing.min_length``).
* Access tokens are 256 random bits, returned once and stored only as SHA-256.
* A failed login says only "Invalid username or password", costs the same time for
  unknown and known users, and deactivated accounts look like unknown ones.
* Registration is closed unless the operator opens it; then it requires a
  registration token unless the operator says otherwise.
"""

from __future__ import annotations

import hmac
import secrets
from dataclasses import dataclass
from typing import Any

from bastion.clock import now_ms
from bastion.core.ids import (
    MAX_DEVICE_ID_LENGTH,
    generate_device_id,
    is_valid_localpart,
    is_valid_opaque_id,
    is_valid_user_id,
    random_string,
)
from bastion.errors import BadJson, Forbidden, InvalidParam, MatrixError, MissingParam
from bastion.security.tokens import generate_access_token, hash_token
from bastion.services.auth import AuthService, UiaService
from bastion.services.requester import current_client
from bastion.storage import accounts as accounts_store
from bastion.storage import e2e as e2e_store
from bastion.storage.database import Database, Txn

NONCE_LIFETIME_S = 60


class UserInUse(MatrixError):
    errcode = "M_USER_IN_USE"


class InvalidUsername(MatrixError):
    errcode = "M_INVALID_USERNAME"


class WeakPassword(MatrixError):
    errcode = "M_WEAK_PASSWORD"


@dataclass(frozen=True)
class LoginResult:
    user_id: str
    device_id: str
    access_token: str

    def to_dict(self, server_name: str) -> dict[str, Any]:
        return {
            "user_id": self.user_id,
            "device_id": self.device_id,
            "access_token": self.access_token,
            "home_server": server_name,
        }


def _device_id(body: dict[str, Any]) -> str | None:
    device_id = _opt_str(body, "device_id", MAX_DEVICE_ID_LENGTH)
    if device_id == "":
        raise BadJson("'device_id' must not be empty")
    return device_id


def _opt_str(body: dict[str, Any], key: str, max_len: int = 1024) -> str | None:
    value = body.get(key)
    if value is None:
        return None
    if not isinstance(value, str):
        raise BadJson(f"'{key}' must be a string")
    if len(value) > max_len:
        raise BadJson(f"'{key}' is too long")
    if "\x00" in value:
        raise BadJson(f"'{key}' contains a NUL character")
    return value


class AccountService:
    def __init__(
        self,
        *,
        server_name: str,
        db: Database,
        auth: AuthService,
        uia: UiaService,
        min_password_length: int,
        registration_enabled: bool,
        registration_requires_token: bool,
        shared_secret: str | None,
    ) -> None:
        self.server_name = server_name
        self._db = db
        self._auth = auth
        self._uia = uia
        self._min_password = min_password_length
        self.registration_enabled = registration_enabled
        self.registration_requires_token = registration_requires_token
        self._shared_secret = shared_secret
        self.on_tokens_revoked: list[Any] = []

    # -- helpers ------------------------------------------------------------------------------

    def user_id_for(self, localpart: str) -> str:
        return f"@{localpart}:{self.server_name}"

    def validate_localpart(self, localpart: str) -> str:
        if not localpart or not is_valid_localpart(localpart):
            raise InvalidUsername("User IDs may only contain a-z, 0-9, and the characters ._=-/+")
        user_id = self.user_id_for(localpart)
        if len(user_id.encode()) > 255:
            raise InvalidUsername("User ID is too long")
        return user_id

    def check_password_policy(self, password: Any) -> str:
        if not isinstance(password, str):
            raise BadJson("'password' must be a string")
        if len(password) < self._min_password:
            raise WeakPassword(f"Passwords must be at least {self._min_password} characters long")
        if len(password.encode("utf-8", "surrogatepass")) > 4096:
            raise BadJson("Passwords are limited to 4096 bytes")
        return password

    async def _new_session(self, user_id: str, device_id: str | None, display_name: str | None) -> LoginResult:
        if device_id is None:
            device_id = generate_device_id()
        token = generate_access_token()
        token_hash = hash_token(token)
        ts = now_ms()

        ip, user_agent = current_client.get()

        def txn_fn(txn: Txn) -> list[bytes]:
            if e2e_store.is_cross_signing_key(txn, user_id, device_id):
                # spec (login): a device ID may not be a cross-signing key's ID; the two
                # would be indistinguishable in signatures ("ed25519:<id>").
                raise Forbidden("The device ID is the ID of one of your cross-signing keys")
            old = accounts_store.delete_device_tokens(txn, user_id, device_id)
            accounts_store.upsert_device(txn, user_id, device_id, display_name, ts)
            accounts_store.insert_access_token(txn, token_hash, user_id, device_id, ts)
            if ip is not None:
                # The session's first "last seen" (any worker listing devices shows it).
                accounts_store.touch_devices(txn, [(ts, ip, user_agent, user_id, device_id)])
            return old

        revoked = await self._db.write(txn_fn)
        self._auth.forget_tokens(revoked)
        return LoginResult(user_id, device_id, token)

    # -- creating accounts ------------------------------------------------------------------------

    async def create_account(
        self,
        localpart: str,
        password: str | None,
        *,
        admin: bool = False,
        displayname: str | None = None,
        registration_token: str | None = None,
    ) -> str:
        """Create an account (no session). Raises :class:`UserInUse` if taken."""
        user_id = self.validate_localpart(localpart)
        password_hash = await self._auth.passwords.hash(password) if password is not None else None
        ts = now_ms()

        def txn_fn(txn: Txn) -> None:
            if registration_token is not None and not accounts_store.consume_registration_token(txn, registration_token, ts):
                raise Forbidden("The registration token is no longer valid")
            if not accounts_store.insert_user(txn, user_id, password_hash, admin, ts, displayname or localpart):
                raise UserInUse("User ID already taken")

        await self._db.write(txn_fn)
        return user_id

    async def check_username_available(self, localpart: str) -> None:
        if not self.registration_enabled:
            raise Forbidden("Registration is disabled on this server")
        user_id = self.validate_localpart(localpart)
        if await self._db.read(accounts_store.user_exists, user_id):
            raise UserInUse("User ID already taken")

    async def register(self, body: dict[str, Any], kind: str, fingerprint: str) -> dict[str, Any]:
        if kind == "guest":
            raise Forbidden("Guest access is disabled on this server")
        if kind != "user":
            raise InvalidParam("'kind' must be 'user' or 'guest'")
        if not self.registration_enabled:
            raise Forbidden("Registration is disabled on this server")
        username = _opt_str(body, "username", 255)
        if username is None:
            username = random_string(12).lower()
        localpart = username
        self.validate_localpart(localpart)
        password = body.get("password")
        if password is None:
            raise MissingParam("'password' is required")
        self.check_password_policy(password)
        device_id = _device_id(body)
        display_name = _opt_str(body, "initial_device_display_name")
        inhibit_login = body.get("inhibit_login", False)
        if not isinstance(inhibit_login, bool):
            raise BadJson("'inhibit_login' must be a boolean")
        if await self._db.read(accounts_store.user_exists, self.user_id_for(localpart)):
            raise UserInUse("User ID already taken")

        token_holder: dict[str, str] = {}

        async def check_token(auth: dict[str, Any]) -> None:
            token = auth.get("token")
            if not isinstance(token, str) or not is_valid_opaque_id(token, 64):
                raise Forbidden("Missing or malformed registration token")
            row = await self._db.read(accounts_store.get_registration_token, token)
            if row is None or not row.usable(now_ms()):
                raise Forbidden("Invalid registration token")
            token_holder["token"] = token

        flows = [["m.login.registration_token"]] if self.registration_requires_token else [["m.login.dummy"]]
        await self._uia.authenticate(
            body,
            flows=flows,
            fingerprint=fingerprint,
            user_id=None,
            stage_handlers={"m.login.registration_token": check_token},
        )
        # The token is spent in the same transaction that creates the account, so the
        # request that completes the flow must carry it.
        token = token_holder.get("token")
        if token is None and self.registration_requires_token:
            raise Forbidden("Send the registration token in the request that completes registration")
        user_id = await self.create_account(localpart, password, registration_token=token)
        if inhibit_login:
            return {"user_id": user_id, "home_server": self.server_name}
        session = await self._new_session(user_id, device_id, display_name)
        return session.to_dict(self.server_name)

    async def registration_token_valid(self, token: str) -> bool:
        if not self.registration_enabled:
            raise Forbidden("Registration is disabled on this server")
        if not self.registration_requires_token:
            return False  # tokens are not in use, so none is valid
        if not is_valid_opaque_id(token, 64):
            return False
        row = await self._db.read(accounts_store.get_registration_token, token)
        return row is not None and row.usable(now_ms())

    # -- shared-secret registration (Synapse-compatible admin API) -------------------------------

    @property
    def shared_secret_enabled(self) -> bool:
        return self._shared_secret is not None

    async def new_nonce(self) -> str:
        """A single-use nonce, kept in the database so any worker can accept it."""
        nonce = secrets.token_hex(32)
        if not await self._db.write(accounts_store.add_registration_nonce, nonce, now_ms(), int(NONCE_LIFETIME_S * 1000)):
            raise MatrixError("Too many outstanding nonces", errcode="M_LIMIT_EXCEEDED", status=429)
        return nonce

    async def register_with_shared_secret(self, body: dict[str, Any]) -> dict[str, Any]:
        assert self._shared_secret is not None
        nonce, username, password, mac = (body.get(k) for k in ("nonce", "username", "password", "mac"))
        admin = body.get("admin", False)
        user_type = body.get("user_type")
        displayname = body.get("displayname")
        if not (isinstance(nonce, str) and isinstance(username, str) and isinstance(password, str) and isinstance(mac, str)):
            raise BadJson("nonce, username, password and mac are required strings")
        if not isinstance(admin, bool):
            raise BadJson("'admin' must be a boolean")
        if user_type is not None and not isinstance(user_type, str):
            raise BadJson("'user_type' must be a string")
        if displayname is not None and not isinstance(displayname, str):
            raise BadJson("'displayname' must be a string")
        if not isinstance(nonce, str) or not await self._db.write(
            accounts_store.use_registration_nonce, nonce, now_ms() - int(NONCE_LIFETIME_S * 1000)
        ):
            raise Forbidden("Unrecognised or expired nonce")
        want = hmac.new(self._shared_secret.encode(), digestmod="sha1")
        for part in (nonce, username, password):
            want.update(part.encode())
            want.update(b"\x00")
        want.update(b"admin" if admin else b"notadmin")
        if user_type is not None:
            want.update(b"\x00")
            want.update(user_type.encode())
        if not hmac.compare_digest(want.hexdigest().encode(), mac.encode()):
            raise Forbidden("HMAC incorrect")
        localpart = username.lower()
        self.check_password_policy(password)
        user_id = await self.create_account(localpart, password, admin=admin, displayname=displayname)
        session = await self._new_session(user_id, None, None)
        return session.to_dict(self.server_name)

    # -- login and logout ---------------------------------------------------------------------------

    async def login(self, body: dict[str, Any]) -> dict[str, Any]:
        login_type = body.get("type")
        if login_type != "m.login.password":
            raise MatrixError("Unsupported login type", errcode="M_UNKNOWN", status=400)
        user_id = self._auth.parse_identifier(body)
        password = body.get("password")
        if not isinstance(password, str):
            raise BadJson("'password' must be a string")
        device_id = _device_id(body)
        display_name = _opt_str(body, "initial_device_display_name")
        if not await self._auth.check_password(user_id, password):
            raise Forbidden("Invalid username or password")
        session = await self._new_session(user_id, device_id, display_name)
        return session.to_dict(self.server_name)

    async def logout(self, user_id: str, device_id: str | None) -> None:
        if device_id is None:
            return
        revoked = await self._db.write(accounts_store.delete_device, user_id, device_id)
        self._auth.forget_tokens(revoked)
        await self._auth.devices_removed(user_id, [device_id])

    async def logout_all(self, user_id: str) -> None:
        revoked = await self._db.write(accounts_store.delete_all_devices, user_id, None)
        self._auth.forget_tokens(revoked)
        self._auth.forget_user(user_id)
        await self._auth.devices_removed(user_id, [])

    async def change_password(self, user_id: str, device_id: str | None, body: dict[str, Any], fingerprint: str) -> None:
        new_password = body.get("new_password")
        if new_password is None:
            raise MissingParam("'new_password' is required")
        self.check_password_policy(new_password)
        logout_devices = body.get("logout_devices", True)
        if not isinstance(logout_devices, bool):
            raise BadJson("'logout_devices' must be a boolean")
        await self._uia.authenticate(body, flows=[["m.login.password"]], fingerprint=fingerprint, user_id=user_id)
        password_hash = await self._auth.passwords.hash(new_password)

        def txn_fn(txn: Txn) -> list[bytes]:
            accounts_store.set_password_hash(txn, user_id, password_hash)
            if logout_devices:
                return accounts_store.delete_all_devices(txn, user_id, device_id)
            return []

        revoked = await self._db.write(txn_fn)
        self._auth.forget_tokens(revoked)
        if logout_devices:
            await self._auth.devices_removed(user_id, [])

    async def set_password_admin(self, user_id: str, password: str) -> None:
        self.check_password_policy(password)
        password_hash = await self._auth.passwords.hash(password)
        if not await self._db.write(accounts_store.set_password_hash, user_id, password_hash):
            raise MatrixError("No such user", errcode="M_NOT_FOUND", status=404)

    async def user_is_valid(self, user_id: str) -> bool:
        return is_valid_user_id(user_id) and await self._db.read(accounts_store.user_exists, user_id)
