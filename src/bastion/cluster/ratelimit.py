"""Sliding-window rate limits, shared by all workers when Redis is there.

One process counts in memory. With several workers the window lives in Redis (a
sorted set of attempt times per key, trimmed on each attempt), so a user cannot get
N times the limit by spreading requests over N workers. If Redis cannot be reached
the worker falls back to counting locally — a limit per worker rather than none.
"""

from __future__ import annotations

import secrets
import time
from collections import deque
from typing import Any


class RateLimiter:
    def __init__(self) -> None:
        self._local: dict[str, deque[float]] = {}
        self.bus: Any = None  # a connected RedisBus makes the window shared

    async def attempt(self, key: str, limit: int, window_s: float = 60.0) -> int | None:
        """Count an attempt; None if allowed, else milliseconds until one would be."""
        bus = self.bus
        if bus is not None and bus.connected and bus.client is not None:
            try:
                return await self._redis(bus.client, key, limit, window_s)
            except Exception:  # fall back to this worker's own count
                pass
        return self._memory(key, limit, window_s)

    def _memory(self, key: str, limit: int, window_s: float) -> int | None:
        now = time.monotonic()
        window = self._local.setdefault(key, deque())
        while window and now - window[0] > window_s:
            window.popleft()
        if len(window) >= limit:
            return int((window_s - (now - window[0])) * 1000) + 1
        window.append(now)
        return None

    async def _redis(self, client: Any, key: str, limit: int, window_s: float) -> int | None:
        name = f"bastion:rl:{key}"
        now = time.time()
        async with client.pipeline(transaction=True) as pipe:
            pipe.zremrangebyscore(name, 0, now - window_s)
            pipe.zcard(name)
            pipe.zrange(name, 0, 0, withscores=True)
            _, count, oldest = await pipe.execute()
        if count >= limit:
            first = oldest[0][1] if oldest else now
            return int((window_s - (now - first)) * 1000) + 1
        async with client.pipeline(transaction=True) as pipe:
            pipe.zadd(name, {f"{now}:{secrets.token_hex(4)}": now})
            pipe.expire(name, int(window_s) + 1)
            await pipe.execute()
        return None
