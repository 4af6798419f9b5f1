"""Keep Python's cycle collector from pausing the event loop for long.

A full (generation-2) collection walks every tracked object. A homeserver keeps a
large, slowly changing heap (event and room caches), so full collections took
70 to 250 ms at 100k to 300k objects and freed nothing — a latency spike every few seconds
under load (measured with bench/gc_trace.py; docs/performance.md).

So: objects that survive a full collection are *frozen* (``gc.freeze()``: moved to the
permanent generation, which collections skip). Frozen objects are still freed by
reference counting as soon as nothing refers to them — evicted cache entries go as
before; only reference *cycles* among frozen objects would wait. Every
``UNFREEZE_INTERVAL_S`` everything is unfrozen and collected once, so such cycles do not
accumulate: one full pause every quarter of an hour instead of every few seconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import time
from typing import Any

log = logging.getLogger(__name__)

UNFREEZE_INTERVAL_S = 900.0


def _after_collection(phase: str, info: dict[str, Any]) -> None:
    if phase == "stop" and info.get("generation") == 2:
        gc.freeze()


def install() -> None:
    """Freeze what start-up built, and every full collection's survivors from now on."""
    gc.collect()
    gc.freeze()
    if _after_collection not in gc.callbacks:
        gc.callbacks.append(_after_collection)


async def periodic_full_collection(interval_s: float = UNFREEZE_INTERVAL_S) -> None:
    while True:
        await asyncio.sleep(interval_s)
        started = time.perf_counter()
        gc.unfreeze()
        found = gc.collect()
        gc.freeze()
        log.info("periodic full garbage collection: %d unreachable objects, %.0f ms",
                 found, (time.perf_counter() - started) * 1000)


def uninstall() -> None:
    with contextlib.suppress(ValueError):
        gc.callbacks.remove(_after_collection)
    gc.unfreeze()
