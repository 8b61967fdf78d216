"""The leaser's leasing policy, without a process or a socket: when a lease call is due
(``min_running_tasks`` + ``batch_wait_secs`` batching, one call at a time, ``requests_per_sec``) and
how long a call waits after the queue came back empty (10 ms, doubling up to ``idle_poll_secs``).

The policy lives on ``children.leaser.Leaser`` (``lease_due``, ``ask_lease``, ``leased``), next to
the sockets. These tests build a real Leaser on a ``memory://`` queue (its sockets are made only in
``run()``), swap its lease thread for a recorder, and drive it with a fake clock: ``now`` is an
argument everywhere, so every time asserted here is exact.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from children.backends import BackendUnavailable, Leased
from children.leaser import MIN_IDLE_SECS, Leaser
from config import validate

PATH = Path("/etc/leasetree/tree.toml")


class RecordedLeases:
    """Stands in for ``LeaseThread``: records each call the leaser asks for, answers nothing."""

    def __init__(self) -> None:
        self.asked: list[tuple[int, float, float, str | None]] = []
        self.busy = False
        self.stopping = False

    def ask(self, max_tasks: int, lease_secs: float, wait_secs: float, tag: str | None) -> None:
        self.busy = True
        self.asked.append((max_tasks, lease_secs, wait_secs, tag))

    def answered(self) -> None:
        self.busy = False

    def close(self) -> None:
        pass


@pytest.fixture
def make_leaser() -> Iterator[Any]:
    made: list[Leaser] = []

    def make(slots: int = 10, **leaser: Any) -> Leaser:
        cfg = validate({"queue": {"url": "memory://"}, "leaser": leaser}, PATH)
        built = Leaser(SimpleNamespace(path="leaser"), cfg, burst=False)
        built.leases.close()  # the real lease thread (and its backend): not needed here
        built.leases = RecordedLeases()  # type: ignore[assignment]
        built.ledger.on_hello("executor.0", "executor", 1, slots, [], [], 0.0)
        made.append(built)
        return built

    yield make
    for built in made:
        built.backend.close()


_serial = iter(range(1_000_000))


def tasks(count: int) -> list[Leased]:
    out = []
    for _ in range(count):
        n = next(_serial)
        out.append(Leased(f"t{n}", f"r{n}", b"x", 1))
    return out


def answer(leaser: Leaser, result: list[Leased] | BackendUnavailable, now: float) -> bool | None:
    """The lease thread's answer to the call in progress arrives at ``now``."""
    leaser.leases.answered()  # type: ignore[attr-defined]
    return leaser.leased(result, now)


def settle(leaser: Leaser, count: int, now: float) -> None:
    """``count`` held tasks go through the executor and the reaper and leave the ledger."""
    ledger = leaser.ledger
    ledger.dispatch(now)
    running = [e for e in ledger.entries.values() if e.state == "running"][:count]
    assert len(running) == count
    ledger.on_done("executor.0", [[e.task_id, e.receipt, True, "", e.attempt, 0.5] for e in running], now)
    settles = ledger.take_settles(now)
    ledger.on_settled([s[1] for s in settles], ["ok"] * len(settles))


# -- min_running_tasks + batch_wait_secs --------------------------------------------------------

@pytest.fixture
def batching(make_leaser: Any) -> Leaser:
    return make_leaser(max_in_flight=10, min_running_tasks=2, batch_wait_secs=5.0)


def test_first_lease_is_due_at_once(batching: Leaser):
    assert batching.lease_due(0.0)
    batching.ask_lease(0.0)
    assert batching.leases.asked == [(10, 30.0, 0.0, None)]  # type: ignore[attr-defined]


def test_a_lease_in_progress_is_never_doubled(batching: Leaser):
    batching.ask_lease(0.0)
    assert not batching.lease_due(0.0)
    assert not batching.lease_due(100.0)


def test_above_min_running_tasks_the_next_lease_waits(batching: Leaser):
    batching.ask_lease(0.0)
    assert answer(batching, tasks(5), 1.0) is True
    assert batching.ledger.in_flight() == 5
    assert batching.ledger.want(10) == 5  # there is room: only the batching holds the call back
    assert not batching.lease_due(1.0)
    settle(batching, 2, 2.0)  # 3 in flight: still above 2
    assert not batching.lease_due(2.0)
    settle(batching, 1, 3.0)  # 2 in flight: down to min_running_tasks
    assert batching.lease_due(3.0)


def test_above_min_running_tasks_the_next_lease_comes_batch_wait_secs_after_the_last(batching: Leaser):
    batching.ask_lease(0.0)
    answer(batching, tasks(5), 1.0)
    assert not batching.lease_due(5.999)
    assert batching.lease_due(6.0)  # 1.0 (the last answer) + batch_wait_secs


def test_batch_wait_counts_from_the_last_answer_empty_ones_included(batching: Leaser):
    batching.ask_lease(0.0)
    answer(batching, tasks(5), 1.0)
    batching.ask_lease(6.0)
    assert answer(batching, [], 7.0) is False
    assert not batching.lease_due(11.999)
    assert batching.lease_due(12.0)


def test_without_min_running_tasks_it_leases_whenever_there_is_room(make_leaser: Any):
    leaser = make_leaser(max_in_flight=10, batch_wait_secs=5.0)
    leaser.ask_lease(0.0)
    answer(leaser, tasks(9), 1.0)
    assert leaser.lease_due(1.0)
    leaser.ask_lease(1.0)
    assert leaser.leases.asked[-1][0] == 1  # only the room left under max_in_flight
    answer(leaser, tasks(1), 1.5)
    assert not leaser.lease_due(100.0)  # full: no call, however long it waits


# -- the empty-queue backoff ----------------------------------------------------------------------

def test_empty_answers_double_the_wait_from_10_ms_up_to_idle_poll_secs(make_leaser: Any):
    leaser = make_leaser(idle_poll_secs=0.5)
    waits, now = [], 0.0
    for _ in range(9):
        assert leaser.lease_due(now)
        leaser.ask_lease(now)
        waits.append(leaser.leases.asked[-1][2])
        now += 1.0
        assert answer(leaser, [], now) is False
    assert MIN_IDLE_SECS == 0.01
    assert waits == pytest.approx([0.0, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.5, 0.5])


def test_the_wait_is_spent_in_the_backend_call_not_before_asking(make_leaser: Any):
    leaser = make_leaser(idle_poll_secs=2.0)
    for now in (0.0, 1.0, 2.0):
        leaser.ask_lease(now)
        answer(leaser, [], now + 0.5)
        # the call itself waited for work: the next one is due the moment the answer is in
        assert leaser.lease_due(now + 0.5)


def test_tasks_after_empty_answers_reset_the_wait(make_leaser: Any):
    leaser = make_leaser(idle_poll_secs=2.0)
    for now in (0.0, 1.0, 2.0):
        leaser.ask_lease(now)
        answer(leaser, [], now)
    leaser.ask_lease(3.0)
    assert leaser.leases.asked[-1][2] == pytest.approx(0.04)
    assert answer(leaser, tasks(1), 3.0) is True
    leaser.ask_lease(3.0)
    assert leaser.leases.asked[-1][2] == 0.0


def test_a_backend_error_backs_off_the_next_lease_and_keeps_the_idle_wait(make_leaser: Any):
    leaser = make_leaser(idle_poll_secs=2.0)
    leaser.ask_lease(0.0)
    answer(leaser, [], 0.0)
    leaser.ask_lease(0.0)
    assert answer(leaser, BackendUnavailable("down"), 1.0) is None
    assert not leaser.lease_due(1.199)  # 0.1 * 2^1 after the first error in a row
    assert leaser.lease_due(1.2)
    leaser.ask_lease(1.2)
    assert leaser.leases.asked[-1][2] == pytest.approx(0.01)


# -- the rest of the leasing policy --------------------------------------------------------------

def test_requests_per_sec_defers_the_lease_call(make_leaser: Any):
    leaser = make_leaser(requests_per_sec=2.0)  # the leaser's half of the host's budget: 1 call/s
    leaser.ask_lease(0.0)
    answer(leaser, [], 0.0)
    leaser.ask_lease(0.25)
    assert len(leaser.leases.asked) == 1  # no call: the bucket is empty
    assert not leaser.lease_due(0.999)
    assert leaser.lease_due(1.0)
    leaser.ask_lease(1.0)
    assert len(leaser.leases.asked) == 2


def test_the_tag_is_passed_to_every_lease_call(make_leaser: Any):
    leaser = make_leaser(tag="gpu")
    leaser.ask_lease(0.0)
    assert leaser.leases.asked[-1][3] == "gpu"
    untagged = make_leaser()
    untagged.ask_lease(0.0)
    assert untagged.leases.asked[-1][3] is None  # no tag configured: any task


def test_no_executor_no_lease(make_leaser: Any):
    leaser = make_leaser(slots=0)
    assert leaser.ledger.capacity() == 0
    assert not leaser.lease_due(0.0)
