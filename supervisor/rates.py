"""Tasks per second over sliding windows, from samples of monotonic counters. Pure: time is an
argument.

The root samples its aggregated counters (they survive child restarts, so they only grow) at most
once per ``every`` seconds and keeps what the longest window needs. A rate over ``w`` seconds is
``(value now - value then) / (now - then)`` against the oldest sample inside the window; before the
tree has run ``w`` seconds it covers what there is.
"""

from __future__ import annotations

from collections import deque

WINDOWS: dict[str, float] = {"10s": 10.0, "60s": 60.0}


class Rates:
    def __init__(self, windows: dict[str, float] | None = None, every: float = 0.5) -> None:
        self.windows = dict(windows or WINDOWS)
        self.every = every
        self._keep = max(self.windows.values())
        self._samples: deque[tuple[float, dict[str, float]]] = deque()

    def due(self, now: float) -> bool:
        """True when a new sample should be taken (sampling costs a stats snapshot)."""
        return not self._samples or now - self._samples[-1][0] >= self.every

    def sample(self, now: float, counters: dict[str, float]) -> None:
        """Record ``counters`` (name -> total so far) as seen at ``now``."""
        self._samples.append((now, dict(counters)))
        # keep one sample older than the longest window, so that window is always covered
        while len(self._samples) > 2 and now - self._samples[1][0] >= self._keep:
            self._samples.popleft()

    def rates(self) -> dict[str, float]:
        """``<counter>_<window>`` -> per second, e.g. ``{"done_10s": 12.5, "done_60s": 11.9}``,
        measured up to the latest sample; zero while there are fewer than two samples."""
        out: dict[str, float] = {}
        if not self._samples:
            return out
        now, latest = self._samples[-1]
        for label, window in self.windows.items():
            then, old = self._oldest_within(now, window)
            span = now - then
            for name, value in latest.items():
                rate = (value - old.get(name, 0.0)) / span if span > 0 else 0.0
                out[f"{name}_{label}"] = round(max(0.0, rate), 3)
        return out

    def _oldest_within(self, now: float, window: float) -> tuple[float, dict[str, float]]:
        for at, values in self._samples:
            if now - at <= window + 1e-9:
                return at, values
        return self._samples[-1]
