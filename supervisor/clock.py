"""The one clock the tree reads: monotonic seconds, read once per loop turn and passed down."""

from __future__ import annotations

import time
from typing import Protocol


class Clock(Protocol):
    def monotonic(self) -> float:
        """Seconds on a clock that never goes backwards (unaffected by setting the wall clock)."""
        ...


class SystemClock:
    def monotonic(self) -> float:
        return time.monotonic()
