"""The queue backend interface: every backend (memory, sqlite, redis, postgresql, nats, sqs) implements it.

Vocabulary. A *task id* is stable across deliveries. A *receipt* names one delivery (one lease) of a
task; every mutating call takes receipts, never bare ids, so that a holder whose lease expired and
whose task was leased again by someone else cannot settle the new delivery (a *stale* receipt: the
call answers ``Outcome.LOST`` for it and changes nothing).

Every mutating call takes a batch, returns one ``Outcome`` per receipt it was given (a dict keyed by
receipt, in no particular order), and is idempotent: calling it twice with the same receipts leaves
the queue as calling it once did (the second call may answer LOST for receipts already settled).

``Outcome.RETRY`` for a receipt means that item failed transiently while the call as a whole
answered: nothing is known to have happened to it. The caller treats it as not settled and sends
the same receipt again later, like a whole call that raised ``BackendUnavailable`` (the reaper
keeps it in its batch; the leaser extends it again soon). NATS and SQS answer it for a server-side
fault on one item; ``faulty.py``'s ``retry`` rules produce it over any backend, for tests.

Errors. A call either returns per-item outcomes or raises:
- ``BackendUnavailable`` for a transient fault (connection lost, database locked past its timeout,
  server restarting). Nothing is known to have happened; the caller retries the same call later with
  backoff. Because calls are idempotent, a retry of a call that half-succeeded is safe.
- ``BackendConfigError`` for a permanent fault the operator must fix (bad URL, missing driver,
  unreadable or corrupt database file, read-only file). The message is one line and says what to do.
"""

from __future__ import annotations

import enum
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any


def per_item(value: Any, count: int, what: str) -> list:
    """One value per receipt: ``value`` repeated when it is a single value, else the sequence
    itself, which must have ``count`` items (ValueError naming ``what`` otherwise)."""
    if isinstance(value, (str, int, float)):
        return [value] * count
    items = list(value)
    if len(items) != count:
        raise ValueError(f"{what}: {len(items)} values for {count} receipts")
    return items


class BackendError(Exception):
    """Base of every backend error; its message is one line, fit to show an operator."""


class BackendConfigError(BackendError):
    """A permanent fault: the URL, the driver, or the database file is wrong. Exit code 2 at the CLI."""


class BackendUnavailable(BackendError):
    """A transient fault: retry the same call later with backoff."""


class Outcome(enum.StrEnum):
    """What happened to one receipt in a mutating call."""

    OK = "ok"  # done (or already done by an earlier identical call)
    LOST = "lost"  # the lease is gone: expired and re-leased, or the task no longer exists
    RETRY = "retry"  # this item failed transiently; call again for it later


class TaskState(enum.StrEnum):
    READY = "ready"  # visible, can be leased now
    LEASED = "leased"  # held by a lease that has not expired
    DELAYED = "delayed"  # will become ready at a later time (enqueue delay or release backoff)
    DEAD = "dead"  # dead-lettered; stays until requeued, deleted or purged


@dataclass(slots=True)  # not frozen: built per task on the hot path, where frozen costs 3x
class Leased:
    """One delivery of a task (treat as read-only)."""

    task_id: str
    receipt: str  # opaque to callers; msgpack-safe
    payload: bytes
    attempt: int  # delivery count: 1 on the first delivery, +1 on each later one
    tag: str = ""


@dataclass(frozen=True, slots=True)
class Limits:
    """What the backend accepts per call; callers split their batches to fit."""

    max_lease_batch: int = 1000
    max_ack_batch: int = 1000  # ack, release and dead_letter
    max_extend_batch: int = 1000
    min_lease_secs: float = 1.0
    max_lease_secs: float = 12 * 3600.0
    max_payload_bytes: int = 64 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class QueueStats:
    ready: int
    leased: int
    delayed: int
    dead: int
    oldest_age_secs: float | None  # age of the oldest task not dead, None when there is none


@dataclass(frozen=True, slots=True)
class TaskInfo:
    """An admin view of one task; times are wall-clock Unix seconds."""

    task_id: str
    state: TaskState
    payload: bytes
    attempt: int  # deliveries so far
    tag: str
    enqueued_at: float
    visible_at: float | None  # when a delayed or leased task becomes ready again
    last_error: str  # the error of the last failed attempt, "" if none
    dead_reason: str  # why it was dead-lettered, "" unless dead


class Backend(ABC):
    """A lease queue. One instance is used by one thread at a time; open one per process."""

    #: the URL scheme, e.g. "sqlite"
    name: str = ""

    @property
    @abstractmethod
    def limits(self) -> Limits:
        """The caps of this backend (constant for the life of the instance)."""

    def clamp_lease(self, lease_secs: float) -> float:
        """``lease_secs`` within ``limits`` (backends clamp rather than refuse)."""
        return min(max(lease_secs, self.limits.min_lease_secs), self.limits.max_lease_secs)

    # -- the data path -------------------------------------------------------------------------
    @abstractmethod
    def lease(self, max_tasks: int, lease_secs: float, wait_secs: float = 0.0,
              tag: str | None = None) -> list[Leased]:
        """Lease up to ``max_tasks`` ready tasks for ``lease_secs`` seconds.

        Returns 0..max_tasks deliveries, oldest ready first. With ``wait_secs > 0`` it blocks up to
        that long for at least one task (long poll), returning as soon as any arrive; with 0 it never
        blocks. ``tag`` (when not None) leases only tasks with exactly that tag. Each returned task's
        attempt is one more than before. A task whose lease expired is ready again.
        ``max_tasks`` above ``limits.max_lease_batch`` is clamped.
        """

    @abstractmethod
    def extend(self, receipts: Sequence[str], lease_secs: float) -> dict[str, Outcome]:
        """Set each lease to expire ``lease_secs`` from now. LOST for a stale or settled receipt."""

    @abstractmethod
    def ack(self, receipts: Sequence[str]) -> dict[str, Outcome]:
        """Settle successful deliveries: the task is deleted. LOST for a stale receipt."""

    @abstractmethod
    def release(self, receipts: Sequence[str], delay_secs: float | Sequence[float] = 0.0,
                errors: Sequence[str] | None = None, count_attempt: bool = True) -> dict[str, Outcome]:
        """Give deliveries back: each task becomes ready after its delay (a float for all, or one per
        receipt). ``errors`` (one per receipt, optional) is kept as the task's last error. The attempt
        count is kept, so the next delivery has attempt + 1. LOST for a stale receipt.

        ``count_attempt=False`` says the delivery never started the task (a warm stop released it,
        or the executor holding it died before reaching it): the delivery is taken back, so the
        next one has the same attempt number. Backends whose server counts deliveries itself (NATS,
        SQS) cannot take one back and ignore it; their docs say so."""

    @abstractmethod
    def dead_letter(self, receipts: Sequence[str], reason: str | Sequence[str]) -> dict[str, Outcome]:
        """Settle deliveries as failed for good: the task moves to the dead letter with the reason
        (one for all, or one per receipt), its attempts and last error, until requeued or deleted."""

    @abstractmethod
    def enqueue(self, payloads: Sequence[bytes], delay_secs: float = 0.0, tag: str = "") -> list[str]:
        """Add tasks (in one transaction where the backend has them); returns their ids in order."""

    @abstractmethod
    def stats(self) -> QueueStats:
        """Counts by state and the oldest task's age."""

    # -- admin ---------------------------------------------------------------------------------
    @abstractmethod
    def list_tasks(self, state: TaskState | None = None, limit: int = 100) -> list[TaskInfo]:
        """Tasks in one state (or all), oldest first, at most ``limit``."""

    @abstractmethod
    def get(self, task_id: str) -> TaskInfo | None:
        """One task by id, or None."""

    @abstractmethod
    def delete(self, task_ids: Sequence[str]) -> int:
        """Delete tasks by id whatever their state; returns how many existed."""

    @abstractmethod
    def requeue_dead(self, task_ids: Sequence[str] | None = None) -> int:
        """Make dead tasks ready again with attempt reset to 0 (all of them when ``task_ids`` is None);
        returns how many moved."""

    @abstractmethod
    def purge(self) -> int:
        """Delete every task in this queue, dead ones included; returns how many."""

    def wait_for_work(self, timeout_secs: float) -> bool:
        """Block up to ``timeout_secs`` until the queue may have ready work; True if woken early.

        The default sleeps the whole timeout; backends with a cheap change signal (SQLite's
        data_version, LISTEN/NOTIFY, XREADGROUP BLOCK) wake earlier."""
        import time

        time.sleep(max(0.0, timeout_secs))
        return False

    def close(self) -> None:  # noqa: B027 - optional: most backends have something to close
        """Release connections. Idempotent."""

    def __enter__(self) -> Backend:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
