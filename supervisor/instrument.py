"""Measurements children put in their heartbeat stats, for the root's Prometheus metrics.

Histograms travel as plain counters, so they ride on the stats machinery that already exists: a
key ending in ``_total`` is a counter, and the root's ``StatsBook`` adds up the incarnations of a
child, so buckets survive restarts like every other counter. The encoding (one key per bucket,
NOT cumulative; ``+Inf`` is the last index)::

    hist:<metric>:<label>:<bucket index>_total    observations that fell in that bucket
    hist:<metric>:<label>:sum_total               sum of the observed values

``TimedBackend`` wraps a backend and records, per call kind (lease, extend, ack, ...)::

    backend:<call>:calls_total
    backend:<call>:errors:<ErrorClass>_total
    hist:backend_seconds:<call>:...

``supervisor/metrics.py`` decodes both (``histograms()``, ``backend_counts()``).
"""

from __future__ import annotations

import bisect
import time
from collections.abc import Sequence
from typing import Any

from children.backends.base import Backend, BackendError

# Upper bounds (seconds) of each histogram's buckets; +Inf is implied after the last.
BUCKETS: dict[str, tuple[float, ...]] = {
    "task_seconds": (0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 300.0, 1800.0,
                     3600.0),
    "backend_seconds": (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
                        5.0, 10.0),
}

Stats = dict[str, Any]


def observe(stats: Stats, metric: str, label: str, value: float) -> None:
    """Count ``value`` in histogram ``metric`` (a key of BUCKETS) under ``label``, in place."""
    bounds, keys, total = _histogram_keys(metric, label)
    key = keys[bisect.bisect_left(bounds, value)]  # le semantics: value == bound is in it
    stats[key] = stats.get(key, 0) + 1
    stats[total] = stats.get(total, 0.0) + value


_KEYS: dict[tuple[str, str], tuple[tuple[float, ...], tuple[str, ...], str]] = {}


def _histogram_keys(metric: str, label: str) -> tuple[tuple[float, ...], tuple[str, ...], str]:
    """The bucket bounds, the key of each bucket and the sum's key: built once per histogram, as
    ``observe`` runs once per task."""
    found = _KEYS.get((metric, label))
    if found is None:
        bounds = BUCKETS[metric]
        found = _KEYS[metric, label] = (
            bounds, tuple(f"hist:{metric}:{label}:{index}_total" for index in range(len(bounds) + 1)),
            f"hist:{metric}:{label}:sum_total")
    return found


def count(stats: Stats, key: str, by: int = 1) -> None:
    stats[key] = stats.get(key, 0) + by


class TimedBackend:
    """A backend that records every call's latency, count and errors into ``stats`` (the dict
    the child reports). Everything else is passed through untouched."""

    _TIMED = ("lease", "extend", "ack", "release", "dead_letter", "enqueue", "stats")

    def __init__(self, backend: Backend, stats: Stats) -> None:
        self._backend = backend
        self._stats = stats

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._backend, name)
        if name not in self._TIMED:
            return attr

        def timed(*args: Any, **kwargs: Any) -> Any:
            started = time.perf_counter()
            try:
                return attr(*args, **kwargs)
            except BackendError as exc:
                count(self._stats, f"backend:{name}:errors:{type(exc).__name__}_total")
                raise
            finally:
                count(self._stats, f"backend:{name}:calls_total")
                observe(self._stats, "backend_seconds", name, time.perf_counter() - started)
        setattr(self, name, timed)  # later calls skip __getattr__
        return timed

    def __enter__(self) -> TimedBackend:
        return self

    def __exit__(self, *exc: object) -> None:
        self._backend.close()


def instrument(backend: Backend, stats: Stats) -> Backend:
    """``backend`` timed into ``stats`` (typed as a Backend: it answers the same calls)."""
    return TimedBackend(backend, stats)  # type: ignore[return-value]


__all__: Sequence[str] = ("BUCKETS", "observe", "count", "TimedBackend", "instrument")
