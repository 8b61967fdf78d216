"""The contract of ``children/backends/base.py``, run against every backend in ``tests/backends.py``.

A backend is done when it passes this file unchanged. Short leases are the backend's own
``limits.min_lease_secs`` (at least 0.2 s); every wait is on a condition with a deadline.
"""

from __future__ import annotations

import multiprocessing
import os
import threading
import time
from collections.abc import Callable, Iterator

import pytest

from children.backends.base import Backend, Leased, Outcome, TaskState
from tests.backends import (
    BACKENDS,
    PROCESS_LOCAL,
    available,
    lease_until_empty,
    limitation,
    require_server,
    unique_queue,
)
from tests.integration.harness import wait_until

pytestmark = pytest.mark.timeout(60)

LONG = 300.0  # a lease that never expires during a test


class Queue:
    """One test's queue: ``open()`` gives another handle on it; all are purged and closed after."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self.name = unique_queue("conf")
        self.handles: list[Backend] = []

    def open(self) -> Backend:
        handle = BACKENDS[self.kind](self.name)
        self.handles.append(handle)
        return handle

    def close(self) -> None:
        for handle in self.handles:
            try:
                handle.purge()
            finally:
                handle.close()


@pytest.fixture(params=sorted(BACKENDS))
def queue(request: pytest.FixtureRequest) -> Iterator[Queue]:
    ok, reason = available(request.param)
    if not ok:
        require_server(request.param, reason)
    if expected := limitation(request.param, request.node.originalname):  # a documented limitation
        request.applymarker(pytest.mark.xfail(**expected))
    q = Queue(request.param)
    yield q
    q.close()


@pytest.fixture
def backend(queue: Queue) -> Backend:
    return queue.open()


def short_lease(backend: Backend) -> float:
    return max(backend.limits.min_lease_secs, 0.2)


def lease_within(backend: Backend, count: int, lease_secs: float = LONG, timeout: float = 15.0,
                 tag: str | None = None) -> list[Leased]:
    """Lease until ``count`` tasks are held or ``timeout`` passes (then AssertionError).

    Polled with calls that do not wait: a waiting pull that lapses just as a lease expires can
    cost nats-server 2.9 that redelivery (sent to nobody, and counted: docs/backends.md, NATS),
    and the tests that use this are about what comes back, not about long polls (those have
    tests of their own)."""
    got: list[Leased] = []

    def all_held() -> bool:
        got.extend(backend.lease(count - len(got), lease_secs, tag=tag))
        ids = [t.task_id for t in got]
        assert len(set(ids)) == len(ids), f"a task held twice at once: {ids}"
        return len(got) >= count

    wait_until(all_held, timeout, f"{count} tasks to be leased")
    return got


# -- leasing ---------------------------------------------------------------------------------------
def test_enqueue_then_lease_oldest_first(backend: Backend) -> None:
    ids = [backend.enqueue([p])[0] for p in (b"first", b"second")]
    ids += backend.enqueue([b"third", b"fourth"])
    assert len(set(ids)) == 4
    got = [backend.lease(1, LONG)[0] for _ in range(3)] + backend.lease(5, LONG)
    assert [t.payload for t in got] == [b"first", b"second", b"third", b"fourth"]
    assert [t.task_id for t in got] == ids
    assert all(t.attempt == 1 and t.tag == "" for t in got)
    assert len({t.receipt for t in got}) == 4
    assert backend.lease(5, LONG) == []


def test_lease_batch_is_clamped_to_max_lease_batch(backend: Backend) -> None:
    cap = backend.limits.max_lease_batch
    backend.enqueue([b"x"] * (cap + 5))
    got = backend.lease(cap + 5, LONG)
    assert 0 < len(got) <= cap


def test_long_poll_returns_when_a_task_arrives(queue: Queue) -> None:
    waiter, producer = queue.open(), queue.open()
    assert waiter.lease(1, LONG) == []
    returned = threading.Event()
    in_time: list[bool] = []

    def produce() -> None:
        producer.enqueue([b"late"])
        # the waiter's long poll must end because the task came, well before its wait runs out
        in_time.append(returned.wait(30.0))

    thread = threading.Thread(target=produce)
    thread.start()
    got = waiter.lease(1, LONG, wait_secs=45.0)
    returned.set()
    thread.join()
    assert [t.payload for t in got] == [b"late"]
    assert in_time == [True], "the long poll ran out its wait instead of returning with the task"


def test_wait_for_work_wakes_on_enqueue(queue: Queue) -> None:
    waiter, producer = queue.open(), queue.open()
    thread = threading.Thread(target=producer.enqueue, args=([b"work"],))
    thread.start()
    woke = waiter.wait_for_work(20.0)
    thread.join()
    assert woke
    assert waiter.lease(1, LONG)


def test_threads_racing_never_share_a_task(queue: Queue) -> None:
    total = 400
    ids = set(queue.open().enqueue([str(i).encode() for i in range(total)]))
    handles = [queue.open() for _ in range(4)]
    results: list[list[str]] = [[] for _ in handles]
    start = threading.Barrier(len(handles))

    def race(k: int) -> None:
        start.wait()
        while got := handles[k].lease(7, LONG):
            results[k].extend(t.task_id for t in got)

    threads = [threading.Thread(target=race, args=(k,)) for k in range(len(handles))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    leased = [task_id for r in results for task_id in r]
    assert len(leased) == len(set(leased)) == total
    assert set(leased) == ids


def test_processes_racing_never_share_a_task(queue: Queue) -> None:
    if queue.kind in PROCESS_LOCAL:
        pytest.skip(f"{queue.kind} queues live in one process")
    total = 600
    ids = set(queue.open().enqueue([str(i).encode() for i in range(total)]))
    ctx = multiprocessing.get_context("spawn")
    start, results = ctx.Event(), ctx.Queue()
    procs = [ctx.Process(target=lease_until_empty, args=(queue.kind, queue.name, 5, start, results))
             for _ in range(3)]
    for p in procs:
        p.start()
    start.set()
    leased = [task_id for _ in procs for task_id in results.get(timeout=40)]
    for p in procs:
        p.join(10)
        assert p.exitcode == 0
    assert len(leased) == len(set(leased)) == total
    assert set(leased) == ids


# -- lease expiry, extension, fencing ----------------------------------------------------------------
def test_expired_lease_comes_back_with_next_attempt(backend: Backend) -> None:
    [task_id] = backend.enqueue([b"job"])
    [first] = lease_within(backend, 1, short_lease(backend))
    [second] = lease_within(backend, 1)
    assert second.task_id == first.task_id == task_id
    assert second.receipt != first.receipt
    assert (first.attempt, second.attempt) == (1, 2)
    assert second.payload == b"job"


def test_extend_keeps_the_task(backend: Backend) -> None:
    backend.enqueue([b"job"])
    short = short_lease(backend)
    [task] = lease_within(backend, 1, short)
    assert backend.extend([task.receipt], LONG) == {task.receipt: Outcome.OK}
    # three short leases later the task would be ready again, had the extension not held
    assert backend.lease(1, LONG, wait_secs=3 * short) == []
    assert backend.stats().leased == 1
    assert backend.ack([task.receipt]) == {task.receipt: Outcome.OK}


def test_stale_receipts_settle_nothing(backend: Backend) -> None:
    backend.enqueue([b"a", b"b", b"c", b"d"])
    # lease_within: a pull from JetStream may hand over part of a batch that was just published
    old_by_id = {t.task_id: t for t in lease_within(backend, 4, short_lease(backend))}
    new_by_id = {t.task_id: t for t in lease_within(backend, 4)}
    assert sorted(old_by_id) == sorted(new_by_id)
    old = [old_by_id[i] for i in sorted(old_by_id)]
    new = [new_by_id[i] for i in sorted(new_by_id)]
    assert all(t.attempt == 2 for t in new)
    assert backend.ack([old[0].receipt]) == {old[0].receipt: Outcome.LOST}
    assert backend.extend([old[1].receipt], LONG) == {old[1].receipt: Outcome.LOST}
    assert backend.release([old[2].receipt], 0.0) == {old[2].receipt: Outcome.LOST}
    assert backend.dead_letter([old[3].receipt], "stale") == {old[3].receipt: Outcome.LOST}
    # the new deliveries are untouched: still leased, still theirs
    assert backend.stats().leased == 4
    for task in new:
        info = backend.get(task.task_id)
        assert info is not None and info.state is TaskState.LEASED and info.dead_reason == ""
    assert backend.lease(4, LONG) == []
    assert backend.ack([t.receipt for t in new]) == {t.receipt: Outcome.OK for t in new}


def test_mixed_batch_answers_per_receipt(backend: Backend) -> None:
    backend.enqueue([b"a", b"b", b"c"])
    a, b, c = backend.lease(3, LONG)
    assert backend.ack([a.receipt]) == {a.receipt: Outcome.OK}
    bogus = "not-a-receipt"
    result = backend.ack([a.receipt, b.receipt, bogus])
    assert result == {a.receipt: Outcome.LOST, b.receipt: Outcome.OK, bogus: Outcome.LOST}
    result = backend.extend([b.receipt, c.receipt], LONG)
    assert result == {b.receipt: Outcome.LOST, c.receipt: Outcome.OK}
    assert backend.stats().leased == 1


def test_ack_twice_is_idempotent(backend: Backend) -> None:
    [task_id] = backend.enqueue([b"once"])
    [task] = backend.lease(1, LONG)
    assert backend.ack([task.receipt, task.receipt]) == {task.receipt: Outcome.OK}
    assert backend.ack([task.receipt])[task.receipt] in (Outcome.OK, Outcome.LOST)
    assert backend.get(task_id) is None
    stats = backend.stats()
    assert (stats.ready, stats.leased, stats.delayed, stats.dead) == (0, 0, 0, 0)


# -- release, delay, dead letter ---------------------------------------------------------------------
def test_release_now_makes_the_task_ready(backend: Backend) -> None:
    backend.enqueue([b"job"])
    [task] = backend.lease(1, LONG)
    assert backend.release([task.receipt], 0.0) == {task.receipt: Outcome.OK}
    [again] = lease_within(backend, 1)
    assert (again.task_id, again.attempt) == (task.task_id, 2)


def test_release_with_delay_hides_the_task_until_then(backend: Backend) -> None:
    backend.enqueue([b"job"])
    [task] = backend.lease(1, LONG)
    delay = 1.0
    released_at = time.monotonic()
    assert backend.release([task.receipt], delay, errors=["exit 3"]) == {task.receipt: Outcome.OK}
    got = backend.lease(1, LONG)
    if not got:  # the usual case; only a very slow machine gets past the delay before this line
        assert backend.stats().delayed == 1
        got = lease_within(backend, 1)
    # 50 ms of slack: the backend's wall clock and this monotonic one need not tick together
    assert time.monotonic() - released_at >= delay - 0.05, "leasable before its delay"
    assert got[0].attempt == 2
    info = backend.get(task.task_id)
    assert info is not None and info.last_error == "exit 3"


def test_release_without_counting_keeps_the_attempt(backend: Backend) -> None:
    backend.enqueue([b"job"])
    [first] = backend.lease(1, LONG)
    assert backend.release([first.receipt], 0.0, count_attempt=False) == {first.receipt: Outcome.OK}
    [again] = lease_within(backend, 1)
    assert (again.task_id, again.attempt) == (first.task_id, 1)  # the first delivery was taken back
    assert backend.release([again.receipt], 0.0) == {again.receipt: Outcome.OK}
    [third] = lease_within(backend, 1)
    assert third.attempt == 2


def test_release_takes_one_delay_per_receipt(backend: Backend) -> None:
    backend.enqueue([b"now", b"later"])
    now, later = backend.lease(2, LONG)
    result = backend.release([now.receipt, later.receipt], [0.0, LONG], errors=["e1", "e2"])
    assert result == {now.receipt: Outcome.OK, later.receipt: Outcome.OK}
    [again] = lease_within(backend, 1)
    assert again.task_id == now.task_id
    stats = backend.stats()
    assert (stats.leased, stats.delayed) == (1, 1)


def test_dead_letter_keeps_reason_error_and_attempts_until_requeued(backend: Backend) -> None:
    [task_id] = backend.enqueue([b"poison"])
    [first] = backend.lease(1, LONG)
    backend.release([first.receipt], 0.0, errors=["Traceback: boom"])
    [second] = lease_within(backend, 1)
    assert backend.dead_letter([second.receipt], "max attempts") == {second.receipt: Outcome.OK}
    info = backend.get(task_id)
    assert info is not None
    assert (info.state, info.dead_reason, info.last_error, info.attempt) == (
        TaskState.DEAD, "max attempts", "Traceback: boom", 2)
    assert [t.task_id for t in backend.list_tasks(TaskState.DEAD)] == [task_id]
    assert backend.lease(1, LONG) == []
    assert backend.stats().dead == 1
    assert backend.requeue_dead() == 1
    [third] = lease_within(backend, 1)
    assert (third.task_id, third.attempt, third.payload) == (task_id, 1, b"poison")


def test_dead_letter_takes_one_reason_per_receipt(backend: Backend) -> None:
    ids = backend.enqueue([b"a", b"b"])
    a, b = backend.lease(2, LONG)
    assert backend.dead_letter([a.receipt, b.receipt], ["reason a", "reason b"]) == {
        a.receipt: Outcome.OK, b.receipt: Outcome.OK}
    reasons = {i: backend.get(i).dead_reason for i in ids}  # type: ignore[union-attr]
    assert reasons == {a.task_id: "reason a", b.task_id: "reason b"}
    assert backend.requeue_dead([a.task_id]) == 1
    assert backend.stats().dead == 1


# -- payloads, tags, queues --------------------------------------------------------------------------
def test_payloads_are_byte_exact(backend: Backend) -> None:
    big = os.urandom(min(10 * 1024 * 1024, backend.limits.max_payload_bytes))
    payloads = [b"", big, bytes(range(256)), b"\xff\xfe\x00\x80 not utf-8 \xc3\x28"]
    ids = backend.enqueue(payloads)
    got = {t.task_id: t.payload for t in lease_within(backend, len(payloads))}
    assert [got[i] for i in ids] == payloads
    assert backend.get(ids[1]).payload == big  # type: ignore[union-attr]


def test_tag_filter_selects_exactly_that_tag(backend: Backend) -> None:
    [x] = backend.enqueue([b"x"], tag="gpu")
    [y] = backend.enqueue([b"y"], tag="cpu")
    [plain] = backend.enqueue([b"plain"])
    assert [t.task_id for t in backend.lease(5, LONG, tag="gpu")] == [x]
    assert backend.lease(5, LONG, tag="gpu") == []
    untagged = backend.lease(5, LONG, tag="")
    assert [(t.task_id, t.tag) for t in untagged] == [(plain, "")]
    rest = backend.lease(5, LONG, tag=None)
    assert [(t.task_id, t.tag) for t in rest] == [(y, "cpu")]
    assert backend.get(x).tag == "gpu"  # type: ignore[union-attr]


def test_queues_do_not_see_each_other(queue: Queue, backend: Backend) -> None:
    other = BACKENDS[queue.kind](unique_queue("other"))
    try:
        other.enqueue([b"theirs"])
        backend.enqueue([b"ours"])
        assert [t.payload for t in backend.lease(5, LONG)] == [b"ours"]
        assert backend.stats().leased == 1 and other.stats().ready == 1
        assert backend.purge() == 1
        assert other.stats().ready == 1
    finally:
        other.purge()
        other.close()


# -- admin -------------------------------------------------------------------------------------------
def test_admin_calls_list_get_delete_purge_and_count(backend: Backend) -> None:
    ready_ids = backend.enqueue([b"r1", b"r2", b"r3"])
    [delayed_id] = backend.enqueue([b"later"], delay_secs=LONG)
    [leased] = backend.lease(1, LONG)
    [dead] = backend.lease(1, LONG)
    backend.dead_letter([dead.receipt], "bad")
    stats = backend.stats()
    assert (stats.ready, stats.leased, stats.delayed, stats.dead) == (1, 1, 1, 1)
    assert stats.oldest_age_secs is not None and stats.oldest_age_secs >= 0

    by_state: dict[TaskState, list[str]] = {
        s: [t.task_id for t in backend.list_tasks(s)] for s in TaskState}
    assert by_state == {TaskState.READY: [ready_ids[2]], TaskState.LEASED: [leased.task_id],
                        TaskState.DELAYED: [delayed_id], TaskState.DEAD: [dead.task_id]}
    everything = backend.list_tasks()
    assert [t.task_id for t in everything] == ready_ids + [delayed_id]
    assert len(backend.list_tasks(limit=2)) == 2

    info = backend.get(delayed_id)
    assert info is not None and info.payload == b"later" and info.state is TaskState.DELAYED
    assert info.visible_at is not None and info.visible_at > info.enqueued_at
    assert backend.get("999999999") is None
    assert backend.delete([ready_ids[2], "999999999"]) == 1
    assert backend.delete([ready_ids[2]]) == 0
    assert backend.ack([leased.receipt])  # deleted or not, answering per receipt
    assert backend.purge() == 2
    stats = backend.stats()
    assert (stats.ready, stats.leased, stats.delayed, stats.dead, stats.oldest_age_secs) == (
        0, 0, 0, 0, None)


def test_delete_of_a_leased_task_makes_its_receipt_lost(backend: Backend) -> None:
    backend.enqueue([b"job"])
    [task] = backend.lease(1, LONG)
    assert backend.delete([task.task_id]) == 1
    assert backend.ack([task.receipt]) == {task.receipt: Outcome.LOST}


def test_calls_on_nothing_answer_nothing(backend: Backend) -> None:
    empty: list[str] = []
    calls: list[Callable[[], object]] = [
        lambda: backend.ack(empty), lambda: backend.extend(empty, LONG),
        lambda: backend.release(empty, 0.0), lambda: backend.dead_letter(empty, "x")]
    assert [call() for call in calls] == [{}, {}, {}, {}]
    assert backend.enqueue([]) == []
    assert backend.lease(0, LONG) == []
    assert backend.delete([]) == 0
    assert backend.requeue_dead([]) == 0
