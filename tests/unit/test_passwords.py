"""Password hashes made with weaker settings than today's: no faster to check."""

from __future__ import annotations

from bastion.security.passwords import PasswordHasher

TODAY = {"time_cost": 2, "memory_kib": 2048, "parallelism": 1}
BEFORE = {"time_cost": 1, "memory_kib": 1024, "parallelism": 1}


def _counting(hasher: PasswordHasher) -> list[int]:
    calls = [0]
    real = hasher.verify_dummy

    def counted(password: str) -> None:
        calls[0] += 1
        real(password)

    hasher.verify_dummy = counted  # type: ignore[method-assign]
    return calls


def test_a_hash_weaker_than_todays_settings_also_costs_a_check_at_todays_cost() -> None:
    """An account whose hash predates a cost increase used to answer a wrong password
    ~70x faster than any other (measured over HTTP): it told an attacker the account
    exists and is cheap to guess. The check now spends today's cost as well, right
    password or wrong, and only then."""
    hasher = PasswordHasher(**TODAY)
    old = PasswordHasher(**BEFORE).hash("correct horse")
    current = hasher.hash("correct horse")
    calls = _counting(hasher)
    assert hasher.verify(old, "wrong") is False and calls[0] == 1
    assert hasher.verify(old, "correct horse") is True and calls[0] == 2
    assert hasher.verify(current, "wrong") is False and calls[0] == 2  # already today's cost
    assert hasher.verify(current, "correct horse") is True and calls[0] == 2
    assert hasher.verify(None, "anything") is False and calls[0] == 3  # no such user
    assert hasher.needs_rehash(old) and not hasher.needs_rehash(current)
