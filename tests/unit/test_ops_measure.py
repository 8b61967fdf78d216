"""Rates, histogram encoding, backend timing and the Prometheus exposition, without processes."""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from children.backends.base import BackendUnavailable
from children.backends.memory import MemoryBackend
from supervisor.instrument import BUCKETS, TimedBackend, observe
from supervisor.metrics import TreeCollector, backend_counts, histograms
from supervisor.rates import Rates

pytestmark = pytest.mark.timeout(10)


def test_rates_over_10s_and_60s_windows():
    rates = Rates(every=1.0)
    for second in range(0, 121):
        if rates.due(float(second)):
            # 5 tasks/s for the first 60 s, then 20 tasks/s
            done = 5 * min(second, 60) + 20 * max(0, second - 60)
            rates.sample(float(second), {"tasks": done})
    got = rates.rates()
    assert got["tasks_10s"] == pytest.approx(20.0)
    assert got["tasks_60s"] == pytest.approx(20.0)
    rates.sample(125.0, {"tasks": 5 * 60 + 20 * 60})  # nothing new for 5 s
    assert rates.rates()["tasks_10s"] == pytest.approx(10.0)


def test_rates_cover_what_there_is_before_the_window_fills_and_keep_little():
    rates = Rates(every=0.5)
    assert rates.rates() == {}
    rates.sample(0.0, {"tasks": 0})
    assert rates.rates() == {"tasks_10s": 0.0, "tasks_60s": 0.0}
    rates.sample(2.0, {"tasks": 8})
    assert rates.rates() == {"tasks_10s": 4.0, "tasks_60s": 4.0}
    for second in range(3, 1000):
        rates.sample(float(second), {"tasks": 8})
    assert len(rates._samples) <= 62


def test_histogram_keys_are_counters_and_decode_per_bucket():
    stats: dict = {}
    for value in (0.0005, 0.001, 0.002, 99999.0):
        observe(stats, "task_seconds", "ok", value)
    assert all(k.endswith("_total") for k in stats)
    counts, total = histograms(stats, "task_seconds")["ok"]
    assert len(counts) == len(BUCKETS["task_seconds"]) + 1
    assert counts[0] == 2  # 0.0005 and 0.001 (le: the bound itself is in)
    assert counts[1] == 1 and counts[-1] == 1
    assert total == pytest.approx(99999.0035)


class Flaky(MemoryBackend):
    fail = False

    def ack(self, receipts):
        if self.fail:
            raise BackendUnavailable("down")
        return super().ack(receipts)


def test_timed_backend_counts_calls_errors_and_latency_by_call():
    stats: dict = {}
    backend = TimedBackend(Flaky(), stats)
    backend.enqueue([b"a", b"b"])
    leased = backend.lease(2, 30.0)
    backend.ack([leased[0].receipt])
    backend._backend.fail = True
    with pytest.raises(BackendUnavailable):
        backend.ack([leased[1].receipt])
    assert backend.limits.max_ack_batch >= 1  # everything else passes through
    calls, errors = backend_counts(stats)
    assert calls == {"enqueue": 1, "lease": 1, "ack": 2}
    assert errors == {("ack", "BackendUnavailable"): 1}
    assert sum(histograms(stats, "backend_seconds")["ack"][0]) == 2


def scrape(snapshot, queue=None):
    registry = CollectorRegistry(auto_describe=False)
    registry.register(TreeCollector(lambda: snapshot, (lambda: queue) if queue else None))
    text = generate_latest(registry).decode()
    return {s.name + repr(sorted(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def test_collector_exposes_counters_histograms_and_gauges_from_a_status():
    executor: dict = {"tasks_total": 3, "running": 1}
    for value in (0.01, 0.02, 5.0):
        observe(executor, "task_seconds", "ok", value)
    leaser = {"succeeded_total": 3, "failed_total": 1, "leased_total": 5, "in_flight": 2,
              "backend:lease:calls_total": 7, "backend:lease:errors:BackendUnavailable_total": 2}
    observe(leaser, "backend_seconds", "lease", 0.003)
    snapshot = {
        "children": [{"id": "leaser", "path": "root/leaser", "state": "running", "type": "worker",
                      "restarts": 2},
                     {"id": "executor.0", "path": "root/executors/executor.0", "state": "restarting",
                      "type": "worker", "restarts": 4}],
        "stats": {"leaser": leaser, "reaper": {"acked_total": 3, "dead_total": 1}, "executor.0": executor},
    }

    class Queue:
        ready, leased, delayed, dead, oldest_age_secs = 7, 2, 1, 0, 3.5

    got = scrape(snapshot, Queue())
    assert got["leasetree_task_runs_total[('outcome', 'succeeded')]"] == 3
    assert got["leasetree_task_settlements_total[('outcome', 'dead_lettered')]"] == 1
    assert got["leasetree_child_restarts_total[('child', 'root/executors/executor.0')]"] == 4
    assert got["leasetree_child_up[('child', 'root/executors/executor.0')]"] == 0
    assert got["leasetree_children_up[]"] == 1
    assert got["leasetree_backend_calls_total[('call', 'lease'), ('child', 'leaser')]"] == 7
    assert got["leasetree_backend_errors_total[('call', 'lease'), ('child', 'leaser'), "
               "('error', 'BackendUnavailable')]"] == 2
    assert got["leasetree_task_duration_seconds_count[('outcome', 'ok')]"] == 3
    assert got["leasetree_task_duration_seconds_bucket[('le', '0.05'), ('outcome', 'ok')]"] == 2
    assert got["leasetree_task_duration_seconds_bucket[('le', '+Inf'), ('outcome', 'ok')]"] == 3
    assert got["leasetree_backend_call_seconds_bucket[('call', 'lease'), ('child', 'leaser'), "
               "('le', '0.005')]"] == 1
    assert got["leasetree_tasks_in_flight[]"] == 2 and got["leasetree_tasks_running[]"] == 1
    assert got["leasetree_queue_tasks[('state', 'ready')]"] == 7
    assert got["leasetree_queue_oldest_age_seconds[]"] == 3.5


def test_collector_copes_with_an_empty_snapshot():
    got = scrape({})
    assert got["leasetree_children_up[]"] == 0
    assert not any(k.startswith("leasetree_queue_tasks") for k in got)
