"""A token bucket capping backend calls per second (the seed's ``taskapi_requests_per_sec``).
Pure: the caller passes ``now``.

Two processes of a tree call the backend: the leaser (lease, extend) and the reaper (ack, release,
dead letter). ``requests_per_sec`` is a budget for the whole host, as the seed's flag was for its
one process, so each gets an equal share (``host_share``) rather than each the whole rate."""

from __future__ import annotations

CALLERS = 2  # the leaser and the reaper


def host_share(requests_per_sec: float) -> TokenBucket:
    """The bucket of one of the ``CALLERS`` processes that share the host's budget (0 = unlimited)."""
    return TokenBucket(requests_per_sec / CALLERS)


class TokenBucket:
    def __init__(self, rate: float, burst: float | None = None) -> None:
        self.rate = rate  # 0 = unlimited
        self.capacity = burst if burst is not None else max(1.0, rate)
        self.tokens = self.capacity
        self.updated: float | None = None

    def wait_secs(self, now: float) -> float:
        """Seconds until one call may be made (0 = now)."""
        if self.rate <= 0:
            return 0.0
        self._refill(now)
        return 0.0 if self.tokens >= 1.0 else (1.0 - self.tokens) / self.rate

    def take(self, now: float) -> None:
        """Record one call made at ``now``."""
        if self.rate <= 0:
            return
        self._refill(now)
        self.tokens -= 1.0

    def _refill(self, now: float) -> None:
        if self.updated is not None:
            self.tokens = min(self.capacity, self.tokens + (now - self.updated) * self.rate)
        self.updated = now
