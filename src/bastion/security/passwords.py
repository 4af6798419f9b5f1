"""Password hashing with argon2id (argon2-cffi).

Passwords are hashed whole — argon2 takes input of any length, so nothing is ever
truncated (unlike bcrypt's 72-byte limit). Hashing costs tens of milliseconds on
purpose, so callers run it on a thread, never on the event loop.

When a login names a user that does not exist, :meth:`PasswordHasher.verify_dummy`
spends the same time as a real check, so response timing does not reveal which
accounts exist.
"""

from __future__ import annotations

from argon2 import PasswordHasher as _Argon2
from argon2 import Type
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError

MAX_PASSWORD_BYTES = 4096


class PasswordHasher:
    def __init__(self, time_cost: int = 3, memory_kib: int = 65536, parallelism: int = 4) -> None:
        self._hasher = _Argon2(
            time_cost=time_cost, memory_cost=memory_kib, parallelism=parallelism, type=Type.ID
        )
        self._dummy_hash = self._hasher.hash("bastion-dummy-password-for-timing")

    def hash(self, password: str) -> str:
        return self._hasher.hash(password)

    def verify(self, stored_hash: str | None, password: str) -> bool:
        if not stored_hash:
            self.verify_dummy(password)
            return False
        try:
            ok: bool = self._hasher.verify(stored_hash, password)
        except (VerifyMismatchError, VerificationError, InvalidHashError):
            ok = False
        if self.needs_rehash(stored_hash):
            # Made with weaker settings than today's (the operator raised the cost since):
            # it checks faster, which would tell an attacker that the account exists and
            # is cheap to guess. Spend today's cost too; a login replaces the hash.
            self.verify_dummy(password)
        return ok

    def verify_dummy(self, password: str) -> None:
        try:
            self._hasher.verify(self._dummy_hash, password)
        except (VerifyMismatchError, VerificationError, InvalidHashError):
            pass

    def needs_rehash(self, stored_hash: str) -> bool:
        try:
            return self._hasher.check_needs_rehash(stored_hash)
        except InvalidHashError:
            return True
