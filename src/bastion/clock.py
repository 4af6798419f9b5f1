"""Wall-clock time in milliseconds, the unit Matrix uses everywhere."""

from __future__ import annotations

import time


def now_ms() -> int:
    return int(time.time() * 1000)
