"""The memory backend on a fake clock: exact times, no sleeps, no threads except where a lock is
the point. The behaviour it shares with every backend is in test_backend_conformance.py."""

from __future__ import annotations

import threading

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from children.backends import open_backend
from children.backends.base import Outcome, TaskState
from children.backends.memory import FakeClock, MemoryBackend

pytestmark = pytest.mark.timeout(30)

START = 1_000_000.0


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(START)


@pytest.fixture
def backend(clock: FakeClock) -> MemoryBackend:
    return MemoryBackend("memory://", "q", clock=clock)


def test_fake_clock_moves_only_forward(clock: FakeClock) -> None:
    assert clock() == START
    assert clock.advance(2.5) == START + 2.5 == clock()
    with pytest.raises(ValueError, match="backwards"):
        clock.advance(-1)


def test_open_backend_gives_memory() -> None:
    assert isinstance(open_backend("memory://", "q"), MemoryBackend)


def test_bare_url_is_private_and_keyed_url_is_shared() -> None:
    MemoryBackend("memory://", "q").enqueue([b"x"])
    assert MemoryBackend("memory://", "q").stats().ready == 0
    MemoryBackend("memory://unit-shared", "q").enqueue([b"x"])
    assert MemoryBackend("memory://unit-shared", "q").stats().ready == 1
    assert MemoryBackend("memory://unit-shared", "other").stats().ready == 0
    MemoryBackend("memory://unit-shared", "q").purge()


def test_lease_expires_exactly_at_lease_secs(backend: MemoryBackend, clock: FakeClock) -> None:
    [task_id] = backend.enqueue([b"job"])
    [first] = backend.lease(1, 30)
    assert backend.get(task_id).visible_at == START + 30  # type: ignore[union-attr]
    clock.advance(29.999)
    assert backend.lease(1, 30) == []
    clock.advance(0.001)
    [second] = backend.lease(1, 30)
    assert (second.task_id, second.attempt) == (task_id, 2)
    assert backend.ack([first.receipt]) == {first.receipt: Outcome.LOST}
    assert backend.ack([second.receipt]) == {second.receipt: Outcome.OK}


def test_expired_but_not_released_receipt_still_settles(backend: MemoryBackend, clock: FakeClock) -> None:
    backend.enqueue([b"job"])
    [task] = backend.lease(1, 30)
    clock.advance(60)
    assert backend.stats().ready == 1  # the lease is gone, but nobody has taken the task since
    assert backend.extend([task.receipt], 30) == {task.receipt: Outcome.OK}
    assert backend.stats().leased == 1


def test_extend_sets_a_new_expiry_from_now(backend: MemoryBackend, clock: FakeClock) -> None:
    [task_id] = backend.enqueue([b"job"])
    [task] = backend.lease(1, 10)
    clock.advance(8)
    backend.extend([task.receipt], 10)
    assert backend.get(task_id).visible_at == START + 18  # type: ignore[union-attr]
    clock.advance(9.9)
    assert backend.lease(1, 10) == []
    clock.advance(0.1)
    assert backend.lease(1, 10)[0].attempt == 2


def test_lease_secs_are_clamped_to_limits(backend: MemoryBackend) -> None:
    [task_id] = backend.enqueue([b"job"])
    backend.lease(1, 10 ** 9)
    info = backend.get(task_id)
    assert info is not None and info.visible_at == START + backend.limits.max_lease_secs


def test_enqueue_delay_and_release_delay(backend: MemoryBackend, clock: FakeClock) -> None:
    [delayed] = backend.enqueue([b"later"], delay_secs=5)
    assert backend.stats().delayed == 1 and backend.lease(1, 30) == []
    clock.advance(5)
    [task] = backend.lease(1, 30)
    assert task.task_id == delayed
    backend.release([task.receipt], 7, errors=["exit 1"])
    info = backend.get(delayed)
    assert info is not None
    assert (info.state, info.visible_at, info.last_error) == (TaskState.DELAYED, START + 12, "exit 1")
    clock.advance(6.9)
    assert backend.lease(1, 30) == []
    clock.advance(0.1)
    assert backend.lease(1, 30)[0].attempt == 2


def test_release_without_errors_keeps_the_last_error(backend: MemoryBackend) -> None:
    [task_id] = backend.enqueue([b"job"])
    backend.release([backend.lease(1, 30)[0].receipt], 0, errors=["first failure"])
    backend.release([backend.lease(1, 30)[0].receipt], 0)
    assert backend.get(task_id).last_error == "first failure"  # type: ignore[union-attr]


def test_ready_order_is_the_order_tasks_became_ready(backend: MemoryBackend, clock: FakeClock) -> None:
    a, b = backend.enqueue([b"a", b"b"])
    [first] = backend.lease(1, 30)
    clock.advance(1)
    backend.release([first.receipt], 0)  # a is ready again, but after b
    [c] = backend.enqueue([b"c"])  # ready at the same time as a: the id breaks the tie
    assert [backend.lease(1, 30)[0].task_id for _ in range(3)] == [b, a, c]


def test_per_item_lists_must_match_the_receipts(backend: MemoryBackend) -> None:
    backend.enqueue([b"a", b"b"])
    receipts = [t.receipt for t in backend.lease(2, 30)]
    with pytest.raises(ValueError, match="1 values for 2 receipts"):
        backend.release(receipts, [1.0])
    with pytest.raises(ValueError, match="1 values for 2 receipts"):
        backend.dead_letter(receipts, ["only one"])


def test_oversized_payload_is_refused(clock: FakeClock) -> None:
    backend = MemoryBackend("memory://", "q", clock=clock)
    backend._limits = type(backend.limits)(max_payload_bytes=4)  # shrink the cap for the test
    with pytest.raises(ValueError, match="over the 4-byte limit"):
        backend.enqueue([b"12345"])
    assert backend.stats().ready == 0


def test_stats_oldest_age_follows_the_clock(backend: MemoryBackend, clock: FakeClock) -> None:
    assert backend.stats().oldest_age_secs is None
    backend.enqueue([b"old"])
    clock.advance(10)
    [young] = backend.enqueue([b"young"])
    clock.advance(5)
    assert backend.stats().oldest_age_secs == 15
    dead = backend.lease(1, 30)[0]
    backend.dead_letter([dead.receipt], "bad")
    assert backend.stats().oldest_age_secs == 5  # dead tasks do not count
    assert backend.requeue_dead(["nonsense", young]) == 0  # young is not dead


def test_wait_for_work_is_true_at_once_when_work_is_ready(backend: MemoryBackend) -> None:
    backend.enqueue([b"job"])
    assert backend.wait_for_work(0.0) is True


def test_wait_for_work_times_out_on_an_empty_queue(backend: MemoryBackend) -> None:
    assert backend.wait_for_work(0.0) is False
    assert backend.lease(1, 30, wait_secs=0.0) == []


def test_many_extends_do_not_grow_the_heap(backend: MemoryBackend) -> None:
    backend.enqueue([b"a", b"b"])
    receipts = [t.receipt for t in backend.lease(2, 30)]
    for _ in range(10_000):
        backend.extend(receipts, 30)
    assert backend._store.heap_entries < 100  # the compaction is the point


def test_threads_sharing_a_store_never_share_a_task() -> None:
    MemoryBackend("memory://unit-race", "q").enqueue([b"x"] * 2000)
    got: list[list[str]] = [[] for _ in range(4)]

    def drain(k: int) -> None:
        handle = MemoryBackend("memory://unit-race", "q")
        while batch := handle.lease(3, 300):
            got[k].extend(t.task_id for t in batch)

    threads = [threading.Thread(target=drain, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(20)
    every = [i for part in got for i in part]
    assert len(every) == len(set(every)) == 2000
    MemoryBackend("memory://unit-race", "q").purge()


# -- a model check: any sequence of calls keeps every task in exactly one consistent state ----------
_ops = st.lists(st.one_of(
    st.tuples(st.just("enqueue"), st.integers(1, 3), st.sampled_from([0.0, 5.0])),
    st.tuples(st.just("lease"), st.integers(1, 4), st.sampled_from([1.0, 10.0])),
    st.tuples(st.just("ack"), st.integers(0, 7)),
    st.tuples(st.just("release"), st.integers(0, 7), st.sampled_from([0.0, 3.0])),
    st.tuples(st.just("dead"), st.integers(0, 7)),
    st.tuples(st.just("extend"), st.integers(0, 7)),
    st.tuples(st.just("advance"), st.sampled_from([0.5, 2.0, 11.0])),
    st.tuples(st.just("requeue"),),
), max_size=60)


@settings(max_examples=150, deadline=None)
@given(_ops)
def test_any_call_sequence_keeps_states_consistent(ops: list[tuple]) -> None:
    clock = FakeClock(START)
    backend = MemoryBackend("memory://", "q", clock=clock)
    receipts: list[str] = []  # every receipt ever handed out, stale ones included
    current: dict[str, str] = {}  # task id -> its live receipt, per the model
    alive: set[str] = set()
    for op in ops:
        kind = op[0]
        if kind == "enqueue":
            alive.update(backend.enqueue([b"p"] * op[1], delay_secs=op[2]))
        elif kind == "lease":
            for task in backend.lease(op[1], op[2]):
                assert task.task_id in alive
                receipts.append(task.receipt)
                current[task.task_id] = task.receipt
        elif kind == "advance":
            clock.advance(op[1])
        elif kind == "requeue":
            backend.requeue_dead()
        elif receipts:
            receipt = receipts[op[1] % len(receipts)]
            task_id = receipt.partition(".")[0]
            live = current.get(task_id) == receipt
            if kind == "ack":
                outcome = backend.ack([receipt])[receipt]
            elif kind == "release":
                outcome = backend.release([receipt], op[2])[receipt]
            elif kind == "dead":
                outcome = backend.dead_letter([receipt], "why")[receipt]
            else:
                outcome = backend.extend([receipt], 10.0)[receipt]
            # a receipt works exactly while it is its task's latest delivery and nothing settled it
            assert (outcome is Outcome.OK) == live
            if live and kind != "extend":
                del current[task_id]
                if kind == "ack":
                    alive.discard(task_id)
        stats = backend.stats()
        assert stats.ready + stats.leased + stats.delayed + stats.dead == len(alive)
        assert stats.leased <= len(current)
        assert {t.task_id for t in backend.list_tasks(limit=10 ** 6)} == alive
