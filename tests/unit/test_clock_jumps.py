"""The wall clock jumping ±1 hour while tasks are leased (docs/guarantees.md, "Clock").

Queue times (lease expiry, delays) are wall-clock seconds shared by every process on the host, so a
step of the system clock moves them. These tests step an injected clock under the real SQLite store
and the memory fake (which matches it call for call): forward, every lease expires at once and the
tasks come back with attempt + 1 while the old receipts settle nothing; back, held leases stay held
(for an hour longer), extend and ack still work, and delayed tasks are only delayed. Nothing is
lost either way. The one cost: a backward step holds back what was ready before it for the length of
the step.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from children.backends.base import Backend, Outcome
from children.backends.memory import MemoryBackend
from children.backends.sqlite import SqliteBackend

HOUR = 3600.0
LEASE = 60.0

pytestmark = pytest.mark.timeout(30)


class SteppedClock:
    """A wall clock that a test sets, backwards too (a FakeClock only advances)."""

    def __init__(self, start: float = 1_700_000_000.0) -> None:
        self._now = start
        self._lock = threading.Lock()

    def __call__(self) -> float:
        with self._lock:
            return self._now

    def step(self, secs: float) -> None:
        with self._lock:
            self._now += secs


@pytest.fixture(params=["sqlite", "memory"])
def queue(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[Backend, SteppedClock]]:
    clock = SteppedClock()
    if request.param == "sqlite":
        backend: Backend = SqliteBackend("sqlite:///clock.db", "clock", tmp_path, clock=clock)
    else:
        backend = MemoryBackend("memory://", "clock", clock=clock)
    try:
        yield backend, clock
    finally:
        backend.close()


def counts(backend: Backend) -> tuple[int, int, int, int]:
    stats = backend.stats()
    return stats.ready, stats.leased, stats.delayed, stats.dead


def test_forward_jump_expires_leases_and_old_receipts_settle_nothing(queue) -> None:
    backend, clock = queue
    ids = backend.enqueue([f"t{i}".encode() for i in range(10)])
    delayed = backend.enqueue([b"later-1", b"later-2"], delay_secs=300)
    held = backend.lease(6, LEASE)
    assert [t.attempt for t in held] == [1] * 6
    assert counts(backend) == (4, 6, 2, 0)

    clock.step(+HOUR)
    # every lease and every delay fell due at once: all twelve are ready, none lost
    assert counts(backend) == (12, 0, 0, 0)
    again = backend.lease(100, LEASE)
    assert sorted(t.task_id for t in again) == sorted(ids + delayed)
    attempts = {t.task_id: t.attempt for t in again}
    assert {attempts[t.task_id] for t in held} == {2}  # the expired deliveries are counted
    assert {attempts[i] for i in ids + delayed if i not in {t.task_id for t in held}} == {1}

    # the receipts from before the jump are stale: no call on them touches the new delivery
    stale = [t.receipt for t in held]
    assert set(backend.extend(stale[:2], LEASE).values()) == {Outcome.LOST}
    assert set(backend.ack(stale[2:4]).values()) == {Outcome.LOST}
    assert set(backend.release(stale[4:5]).values()) == {Outcome.LOST}
    assert set(backend.dead_letter(stale[5:], "stale").values()) == {Outcome.LOST}
    assert counts(backend) == (0, 12, 0, 0)

    assert set(backend.ack([t.receipt for t in again]).values()) == {Outcome.OK}
    assert counts(backend) == (0, 0, 0, 0)


def test_backward_jump_keeps_leases_held_and_delays_what_was_ready(queue) -> None:
    """Back an hour: held leases stay held and still extend and ack; what was delayed, and what
    was ready, waits until the clock is back at its time (the cost, documented in "Clock"); work
    enqueued after the jump is ready at once. Nothing is lost or dead-lettered."""
    backend, clock = queue
    ids = backend.enqueue([f"t{i}".encode() for i in range(10)])
    delayed = backend.enqueue([b"later-1", b"later-2"], delay_secs=300)
    held = backend.lease(6, LEASE)
    assert counts(backend) == (4, 6, 2, 0)

    clock.step(-HOUR)
    # an hour before they were enqueued: nothing was taken from a holder; the 4 that were ready
    # became ready "at" a time now an hour away, so they count as delayed with the 2 delayed ones
    assert counts(backend) == (0, 6, 6, 0)
    assert backend.lease(100, LEASE) == []
    fresh = backend.enqueue([b"after-the-jump"])
    got = backend.lease(100, LEASE)
    assert [t.task_id for t in got] == fresh  # new work is not held back
    assert set(backend.ack([t.receipt for t in got]).values()) == {Outcome.OK}
    # ... and a lease an hour and a minute away does not expire after a minute
    clock.step(LEASE + 1)
    assert counts(backend) == (0, 6, 6, 0)

    # the holders keep working: extend resets the expiry from the new clock, ack settles
    receipts = [t.receipt for t in held]
    assert set(backend.extend(receipts[:3], LEASE).values()) == {Outcome.OK}
    assert set(backend.ack(receipts[3:]).values()) == {Outcome.OK}
    clock.step(LEASE + 1)  # the extended leases were measured on the new clock
    assert counts(backend) == (3, 0, 6, 0)

    # back at the time of the jump: the tasks that were ready are ready again, the delayed ones
    # come when they were due, none was counted as an attempt by the jump
    clock.step(HOUR - 2 * (LEASE + 1))
    assert counts(backend) == (7, 0, 2, 0)
    clock.step(300)
    assert counts(backend) == (9, 0, 0, 0)
    rest = backend.lease(100, LEASE)
    acked = {t.task_id for t in held[3:]}
    assert sorted(t.task_id for t in rest) == sorted(set(ids + delayed) - acked)
    attempts = {t.task_id: t.attempt for t in rest}
    assert {attempts[t.task_id] for t in held[:3]} == {2}
    assert {attempts[i] for i in set(ids + delayed) - {t.task_id for t in held}} == {1}
    assert set(backend.ack([t.receipt for t in rest]).values()) == {Outcome.OK}
    assert counts(backend) == (0, 0, 0, 0)
