"""Prometheus metrics of a running tree, served by the root (``[metrics] listen = "host:port"``).

The root's loop publishes a snapshot (its ``status()``: children rows, aggregated stats, rates) by
swapping one reference; the HTTP server runs in threads of its own (``prometheus_client``'s WSGI
server) and only reads the latest snapshot, so a slow scrape never holds the loop up. Counters come
from the root's aggregation, so they survive child restarts. The queue depth is asked of the
backend by the scraping thread, at most once a second, on a connection of its own.

Metrics (all prefixed ``leasetree_``):

    task_runs_total{outcome}              succeeded | failed (as the leaser recorded them)
    task_settlements_total{outcome}       acked | released | dead_lettered | lost
    tasks_leased_total
    child_restarts_total{child}           per child path, e.g. root/executors/executor.0
    backend_calls_total{child,call}       lease, extend, ack, release, dead_letter, stats, ...
    backend_errors_total{child,call,error}
    task_duration_seconds{outcome}        histogram, from the executors
    backend_call_seconds{child,call}      histogram, from the leaser and the reaper
    tasks_in_flight                       held by the leaser (leased, not yet settled)
    tasks_running                         running on executors now
    queue_tasks{state}                    ready | leased | delayed | dead (backend stats)
    queue_oldest_age_seconds
    children_up                           worker processes running
    child_up{child}                       1 running, 0 not
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from supervisor.instrument import BUCKETS

log = logging.getLogger("root")  # the root process: its place in the tree

PREFIX = "leasetree_"
QUEUE_STATS_MAX_AGE = 1.0


class MetricsError(Exception):
    """The metrics server cannot start (prometheus_client missing, address unusable); one line."""


# -- decoding what the children report --------------------------------------------------------------
def histograms(stats: dict[str, Any], metric: str) -> dict[str, tuple[list[float], float]]:
    """label -> (per-bucket counts, NOT cumulative, +Inf last; sum) of ``metric`` in one child's stats."""
    size = len(BUCKETS[metric]) + 1
    out: dict[str, tuple[list[float], float]] = {}
    prefix = f"hist:{metric}:"
    for key, value in stats.items():
        if not key.startswith(prefix):
            continue
        label, _, slot = key[len(prefix):-len("_total")].rpartition(":")
        counts, total = out.get(label, ([0.0] * size, 0.0))
        if slot == "sum":
            total += value
        elif slot.isdigit() and int(slot) < size:
            counts[int(slot)] += value
        out[label] = (counts, total)
    return out


def backend_counts(stats: dict[str, Any]) -> tuple[dict[str, float], dict[tuple[str, str], float]]:
    """(call -> calls, (call, error class) -> errors) from one child's stats."""
    calls: dict[str, float] = {}
    errors: dict[tuple[str, str], float] = {}
    for key, value in stats.items():
        if not key.startswith("backend:") or not key.endswith("_total"):
            continue
        parts = key[len("backend:"):-len("_total")].split(":")
        if len(parts) == 2 and parts[1] == "calls":
            calls[parts[0]] = calls.get(parts[0], 0) + value
        elif len(parts) == 3 and parts[1] == "errors":
            errors[(parts[0], parts[2])] = errors.get((parts[0], parts[2]), 0) + value
    return calls, errors


def _cumulative(counts: list[float], bounds: tuple[float, ...]) -> list[tuple[str, float]]:
    out, running = [], 0.0
    for bound, value in zip([*map(_le, bounds), "+Inf"], counts, strict=True):
        running += value
        out.append((bound, running))
    return out


def _le(bound: float) -> str:
    return repr(float(bound))


# -- the collector ------------------------------------------------------------------------------------
class TreeCollector:
    """A prometheus_client collector over the snapshot ``source()`` returns (the root's status) and
    the queue stats ``queue_stats()`` returns (None when unavailable)."""

    def __init__(self, source: Callable[[], dict[str, Any]],
                 queue_stats: Callable[[], Any] | None = None) -> None:
        self.source = source
        self.queue_stats = queue_stats

    def describe(self) -> list[Any]:
        return []  # families are built per scrape; nothing to check against at registration

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

        snapshot = self.source() or {}
        stats: dict[str, dict[str, Any]] = snapshot.get("stats", {})
        rows: list[dict[str, Any]] = snapshot.get("children", [])
        leaser, reaper = stats.get("leaser", {}), stats.get("reaper", {})
        executors = [v for k, v in stats.items() if k.startswith("executor.")]

        runs = CounterMetricFamily(PREFIX + "task_runs", "Task runs finished, by outcome.",
                                   labels=["outcome"])
        runs.add_metric(["succeeded"], leaser.get("succeeded_total", 0))
        runs.add_metric(["failed"], leaser.get("failed_total", 0))
        yield runs
        settled = CounterMetricFamily(PREFIX + "task_settlements",
                                      "Tasks settled in the backend, by outcome.", labels=["outcome"])
        settled.add_metric(["acked"], reaper.get("acked_total", 0))
        settled.add_metric(["released"], reaper.get("released_total", 0))
        settled.add_metric(["dead_lettered"],
                           reaper.get("dead_total", 0) + leaser.get("dead_lettered_total", 0))
        settled.add_metric(["lost"], reaper.get("lost_total", 0))
        yield settled
        yield CounterMetricFamily(PREFIX + "tasks_leased", "Task deliveries leased from the backend.",
                                  value=leaser.get("leased_total", 0))

        restarts = CounterMetricFamily(PREFIX + "child_restarts", "Restarts of each child.", labels=["child"])
        up = GaugeMetricFamily(PREFIX + "child_up", "1 while the child runs, else 0.", labels=["child"])
        workers_up = 0
        for row in rows:
            path = row.get("path") or row.get("id", "?")
            restarts.add_metric([path], row.get("restarts", 0))
            running = row.get("state") == "running"
            up.add_metric([path], 1 if running else 0)
            workers_up += running and row.get("type") == "worker"
        yield restarts
        yield up
        yield GaugeMetricFamily(PREFIX + "children_up", "Worker processes running.", value=workers_up)

        calls = CounterMetricFamily(PREFIX + "backend_calls", "Backend calls, by child and call.",
                                    labels=["child", "call"])
        errors = CounterMetricFamily(PREFIX + "backend_errors", "Backend calls that failed, by error class.",
                                     labels=["child", "call", "error"])
        latency = HistogramMetricFamily(PREFIX + "backend_call_seconds", "Backend call latency.",
                                        labels=["child", "call"])
        for child in ("leaser", "reaper"):
            child_calls, child_errors = backend_counts(stats.get(child, {}))
            for call, value in sorted(child_calls.items()):
                calls.add_metric([child, call], value)
            for (call, error), value in sorted(child_errors.items()):
                errors.add_metric([child, call, error], value)
            for call, (counts, total) in sorted(histograms(stats.get(child, {}), "backend_seconds").items()):
                latency.add_metric([child, call], _cumulative(counts, BUCKETS["backend_seconds"]), total)
        yield calls
        yield errors
        yield latency

        durations = HistogramMetricFamily(PREFIX + "task_duration_seconds", "Task run time, by outcome.",
                                          labels=["outcome"])
        merged: dict[str, tuple[list[float], float]] = {}
        for one in executors:
            for label, (counts, total) in histograms(one, "task_seconds").items():
                old_counts, old_total = merged.get(label, ([0.0] * len(counts), 0.0))
                merged[label] = ([a + b for a, b in zip(old_counts, counts, strict=True)], old_total + total)
        for label, (counts, total) in sorted(merged.items()):
            durations.add_metric([label], _cumulative(counts, BUCKETS["task_seconds"]), total)
        yield durations

        yield GaugeMetricFamily(PREFIX + "tasks_in_flight", "Tasks the leaser holds (leased, not settled).",
                                value=leaser.get("in_flight", 0))
        yield GaugeMetricFamily(PREFIX + "tasks_running", "Tasks running on executors now.",
                                value=sum(int(e.get("running", 0)) for e in executors))
        queue = self.queue_stats() if self.queue_stats else None
        if queue is not None:
            depth = GaugeMetricFamily(PREFIX + "queue_tasks", "Tasks in the queue, by state (backend stats).",
                                      labels=["state"])
            for state in ("ready", "leased", "delayed", "dead"):
                depth.add_metric([state], getattr(queue, state))
            yield depth
            if queue.oldest_age_secs is not None:
                yield GaugeMetricFamily(PREFIX + "queue_oldest_age_seconds", "Age of the oldest ready task.",
                                        value=queue.oldest_age_secs)


class QueueProbe:
    """Backend stats for the scraping threads: a fresh connection per look (backends' connections
    belong to one thread), at most one look per ``max_age`` seconds, None when the backend fails."""

    def __init__(self, url: str, name: str, base_dir: Path | str,
                 max_age: float = QUEUE_STATS_MAX_AGE) -> None:
        self.url, self.name, self.base_dir, self.max_age = url, name, base_dir, max_age
        self._lock = threading.Lock()
        self._at = float("-inf")
        self._value: Any = None

    def __call__(self) -> Any:
        from children.backends import BackendError, open_backend

        with self._lock:
            now = time.monotonic()
            if now - self._at < self.max_age:
                return self._value
            try:
                with open_backend(self.url, self.name, self.base_dir) as backend:
                    self._value = backend.stats()
            except BackendError as exc:
                log.warning("metrics: queue stats unavailable: %s", exc)
                self._value = None
            self._at = time.monotonic()
            return self._value


class MetricsServer:
    """The HTTP endpoint: ``start()`` binds ``listen`` ("host:port") and serves from daemon threads;
    ``close()`` stops it. Raises MetricsError with one line when it cannot."""

    def __init__(self, listen: str, collector: TreeCollector) -> None:
        self.listen = listen
        self.collector = collector
        self._server: Any = None

    def start(self) -> None:
        try:
            from prometheus_client import CollectorRegistry, start_http_server
        except ImportError:
            raise MetricsError(f"metrics.listen = {self.listen!r}: prometheus_client is not installed "
                               "(pip install 'leasetree[metrics]')") from None
        host, _, port = self.listen.rpartition(":")
        registry = CollectorRegistry(auto_describe=False)
        registry.register(self.collector)
        try:
            self._server, _thread = start_http_server(int(port), host or "0.0.0.0", registry)
        except OSError as exc:
            raise MetricsError(f"metrics.listen = {self.listen!r}: cannot listen there: "
                               f"{exc.strerror or exc}") from None
        log.info("metrics: serving Prometheus text on http://%s/metrics", self.listen)

    @property
    def port(self) -> int:
        return int(self._server.server_address[1]) if self._server else 0

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None


def check_available() -> str | None:
    """None when prometheus_client imports, else the line to print."""
    try:
        import prometheus_client  # noqa: F401
    except ImportError:
        return "prometheus_client is not installed (pip install 'leasetree[metrics]')"
    return None
