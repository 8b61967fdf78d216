"""Cases every backend with a server (Redis, PostgreSQL) must pass beyond the conformance suite:
two hosts fencing each other, blocking waits woken by another connection, and a connection killed
under the backend. A test module subclasses ``ServerBackendCases`` and provides four fixtures:

- ``open_host()``: a new backend instance on the test's queue (a simulated host; closed afterwards);
- ``blocked(backend)``: True once ``backend`` sits in its blocking wait on the server;
- ``kill(backend)``: kill ``backend``'s connection from the server side;
- ``unreachable_url``: a URL with password ``s3cret`` where nothing listens.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from children.backends import BackendUnavailable, Outcome, QueueStats, TaskState, open_backend
from children.backends.base import Backend


def _in_thread(call: Callable[[], object]) -> tuple[threading.Thread, list[object]]:
    """Start ``call`` in a thread; the list receives its result or the exception it raised."""
    out: list[object] = []

    def run() -> None:
        try:
            out.append(call())
        except BaseException as exc:  # noqa: BLE001 - handed to the test to inspect
            out.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    return thread, out


@pytest.mark.timeout(60)
class ServerBackendCases:
    def test_stale_receipt_from_another_host_settles_nothing(self, open_host) -> None:
        host_a, host_b = open_host(), open_host()
        [task_id] = host_a.enqueue([b"job"])
        [first] = host_a.lease(1, lease_secs=0.05)
        # host B waits until A's lease expires (its wait is cut to the deadline), then takes it
        [second] = host_b.lease(1, lease_secs=30, wait_secs=10)
        assert (second.task_id, second.attempt) == (task_id, 2)
        assert second.receipt != first.receipt

        assert host_a.extend([first.receipt], 30) == {first.receipt: Outcome.LOST}
        assert host_a.release([first.receipt], 0) == {first.receipt: Outcome.LOST}
        assert host_a.dead_letter([first.receipt], "stale") == {first.receipt: Outcome.LOST}
        assert host_a.ack([first.receipt]) == {first.receipt: Outcome.LOST}
        assert host_b.get(task_id).state is TaskState.LEASED
        assert host_b.ack([second.receipt]) == {second.receipt: Outcome.OK}
        assert host_b.get(task_id) is None

    def test_each_lease_keeps_its_own_deadline(self, open_host) -> None:
        host_a, host_b = open_host(), open_host()
        host_a.enqueue([b"long"])
        [long_lease] = host_a.lease(1, lease_secs=60)
        [short_id] = host_a.enqueue([b"short"])
        [short_lease] = host_a.lease(1, lease_secs=0.05)
        assert [t.task_id for t in host_b.lease(10, lease_secs=30, wait_secs=10)] == [short_id]
        assert host_a.ack([long_lease.receipt, short_lease.receipt]) == {
            long_lease.receipt: Outcome.OK, short_lease.receipt: Outcome.LOST}

    def test_blocked_lease_wakes_on_enqueue_from_another_host(self, open_host, blocked,
                                                              wait_until) -> None:
        waiter, producer = open_host(), open_host()
        started = time.monotonic()
        thread, out = _in_thread(lambda: waiter.lease(5, 30, wait_secs=30))
        wait_until(lambda: blocked(waiter), what="the lease to block on the server")
        [task_id] = producer.enqueue([b"wake up"])
        thread.join(timeout=30)
        # it woke on the enqueue: a missed wake-up returns only when the 30 s wait is over
        assert [t.task_id for t in out[0]] == [task_id]
        assert time.monotonic() - started < 15

    def test_wait_for_work_wakes_on_release_and_on_a_due_delay(self, open_host, blocked,
                                                               wait_until) -> None:
        holder, watcher = open_host(), open_host()
        holder.enqueue([b"job"])
        [leased] = holder.lease(1, 60)
        thread, out = _in_thread(lambda: watcher.wait_for_work(30))
        wait_until(lambda: blocked(watcher), what="wait_for_work to block on the server")
        holder.release([leased.receipt], 0)
        thread.join(timeout=30)
        assert out == [True]

        [again] = holder.lease(1, 60)
        holder.ack([again.receipt])
        holder.enqueue([b"later"], delay_secs=0.2)  # not leasable yet: the wait is cut to its due time
        assert watcher.wait_for_work(20) is True
        assert [t.payload for t in holder.lease(5, 60)] == [b"later"]

    def test_killed_while_blocked_fails_once_then_recovers(self, open_host, blocked, kill,
                                                           wait_until) -> None:
        backend, producer = open_host(), open_host()
        thread, out = _in_thread(lambda: backend.lease(1, 30, wait_secs=30))
        wait_until(lambda: blocked(backend), what="the lease to block on the server")
        kill(backend)
        thread.join(timeout=30)
        assert len(out) == 1 and isinstance(out[0], BackendUnavailable), out
        assert "\n" not in str(out[0])

        ids = producer.enqueue([b"a", b"b"])
        leased = backend.lease(2, 30, wait_secs=5)  # reconnects on this call
        assert sorted(t.task_id for t in leased) == sorted(ids)
        assert backend.ack([t.receipt for t in leased]) == {t.receipt: Outcome.OK for t in leased}

    def test_killed_while_idle_loses_nothing(self, open_host, kill) -> None:
        backend = open_host()
        ids = backend.enqueue([b"%d" % i for i in range(10)])
        leased = backend.lease(10, 30)
        kill(backend)
        receipts = [t.receipt for t in leased]
        failures = 0
        while True:  # the caller's retry loop: the same call again after BackendUnavailable
            try:
                outcomes = backend.ack(receipts)
                break
            except BackendUnavailable:
                failures += 1
                assert failures == 1, "the call after a failure must reconnect"
        assert outcomes == {r: Outcome.OK for r in receipts} and len(outcomes) == len(ids)
        assert backend.stats() == QueueStats(0, 0, 0, 0, None)

    def test_unreachable_server_is_unavailable_in_one_line_without_the_password(
            self, unreachable_url: str) -> None:
        backend: Backend = open_backend(unreachable_url, "nowhere", Path("."))
        with pytest.raises(BackendUnavailable) as info:
            backend.stats()
        message = str(info.value)
        assert "127.0.0.1:1" in message and "s3cret" not in message and "\n" not in message
        backend.close()
