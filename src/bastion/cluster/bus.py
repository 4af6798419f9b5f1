"""The bus between worker processes: Redis publish/subscribe.

What travels on it is a *hint* ("stream X is at position N", "these tokens were
revoked") or ephemeral state that has no other home (typing, presence). The database
stays the source of truth: a worker that misses a message — Redis restarting, a
network blip — still finds every change by polling the stream positions, just later.
So the bus never raises into the caller: publishing while disconnected is dropped
(and counted), and the subscriber reconnects by itself with back-off.

``redis`` (redis-py, the maintained official client, with asyncio support) does the
protocol.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

import orjson

from bastion import metrics

log = logging.getLogger(__name__)

CHANNEL = "bastion:bus"

Handler = Callable[[str, dict[str, Any]], Awaitable[None] | None]


class RedisBus:
    def __init__(self, url: str, instance_id: str) -> None:
        self.url = url
        self.instance_id = instance_id
        self.connected = False
        self._handlers: list[Handler] = []
        self._on_reconnect: list[Callable[[], Awaitable[None]]] = []
        self._task: asyncio.Task[None] | None = None
        self._client: Any = None
        self._closing = False
        self.dropped = 0

    @property
    def client(self) -> Any:
        """The Redis client (for shared counters), or None before start."""
        return self._client

    def on_message(self, handler: Handler) -> None:
        self._handlers.append(handler)

    def on_reconnect(self, callback: Callable[[], Awaitable[None]]) -> None:
        self._on_reconnect.append(callback)

    async def start(self) -> None:
        import redis.asyncio as aioredis

        self._client = aioredis.from_url(
            self.url, socket_connect_timeout=2, socket_timeout=5, health_check_interval=5, retry_on_timeout=False
        )
        self._task = asyncio.create_task(self._run(), name="redis-bus")
        # Give the first connection a moment so a healthy start-up is connected at once.
        for _ in range(40):
            if self.connected:
                break
            await asyncio.sleep(0.05)

    async def publish(self, kind: str, payload: dict[str, Any]) -> None:
        if not self.connected or self._client is None:
            self.dropped += 1
            return
        message = orjson.dumps({"i": self.instance_id, "k": kind, "t": time.time(), **payload})
        try:
            await asyncio.wait_for(self._client.publish(CHANNEL, message), timeout=2)
        except Exception as exc:  # the poller will carry the change; never fail the request
            self.dropped += 1
            self._lost(exc)

    def _lost(self, exc: BaseException) -> None:
        if self.connected:
            log.warning("lost the Redis bus (%s); falling back to polling until it is back", exc)
        self.connected = False
        metrics.BUS_CONNECTED.set(0)

    async def _run(self) -> None:
        delay = 0.2
        while not self._closing:
            pubsub = None
            try:
                pubsub = self._client.pubsub(ignore_subscribe_messages=True)
                await pubsub.subscribe(CHANNEL)
                first = not self.connected
                self.connected = True
                metrics.BUS_CONNECTED.set(1)
                delay = 0.2
                if first:
                    log.info("connected to the Redis bus")
                for callback in self._on_reconnect:
                    await callback()
                while not self._closing:
                    message = await pubsub.get_message(timeout=1.0)
                    if message is None:
                        continue
                    await self._dispatch(message.get("data"))
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self._lost(exc)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)
            finally:
                if pubsub is not None:
                    with contextlib.suppress(Exception):
                        await pubsub.aclose()

    async def _dispatch(self, raw: Any) -> None:
        try:
            data = orjson.loads(raw)
        except (orjson.JSONDecodeError, TypeError):
            return
        if not isinstance(data, dict) or data.get("i") == self.instance_id:
            return
        sent = data.get("t")
        if isinstance(sent, (int, float)):
            metrics.BUS_LAG_SECONDS.observe(max(0.0, time.time() - sent))
        kind = str(data.get("k"))
        for handler in self._handlers:
            try:
                result = handler(kind, data)
                if asyncio.iscoroutine(result):
                    await result
            except Exception:
                log.exception("bus handler failed for %s", kind)

    async def close(self) -> None:
        self._closing = True
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
        if self._client is not None:
            with contextlib.suppress(Exception):
                await self._client.aclose()
        metrics.BUS_CONNECTED.set(0)
