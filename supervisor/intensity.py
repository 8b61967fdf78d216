"""The restart intensity window: OTP's ``add_restart/3`` on a monotonic clock.

Each restart event appends ``now``; entries older than ``now - period`` fall out of the window. The
supervisor gives up when the window holds more than ``intensity`` entries. A group restart
(one_for_all, rest_for_one) is one event; a failed restart retried later is another.
"""

from __future__ import annotations


def add_restart(history: tuple[float, ...], now: float, period: float) -> tuple[float, ...]:
    """The window after a restart at ``now``: the new entry first, then those still within
    ``period`` (an entry exactly ``period`` old still counts, as ``R >= Now - Period`` in OTP)."""
    threshold = now - period
    return (now, *(t for t in history if t >= threshold))


def exceeded(history: tuple[float, ...], intensity: int) -> bool:
    """True when the window holds more restarts than the supervisor tolerates."""
    return len(history) > intensity
