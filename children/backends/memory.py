"""The in-process backend: the complete reference fake of ``base.Backend`` for unit tests.

``memory://`` opens a private queue that lives as long as the instance. ``memory://KEY`` opens the
store ``(KEY, name)`` shared by every instance in this process with the same key and name, so a test
can give a leaser and a reaper their own handles on one queue, or race threads on it. Nothing is
shared across processes.

Semantics match ``children/backends/sqlite.py`` call for call, so a unit test that passes against
this fake means the same thing against the real store:
- task ids are decimal integers, increasing in enqueue order (compare them numerically);
- a receipt is ``f"{task_id}.{token}"``, the token being fresh for every delivery; a receipt stays
  valid until the task is settled or leased again, so a holder whose lease expired but whose task
  nobody has leased since may still settle it;
- ``tag=None`` leases any tag, a string leases exactly that tag (``""`` = untagged only);
- ready tasks are leased in the order they became ready (enqueue time, release delay, lease expiry),
  ties in id order; a batch comes back sorted by id.

Time is the injected ``clock`` (wall-clock seconds, ``time.time`` by default); a ``FakeClock`` lets a
unit test expire leases and delays with ``clock.advance(secs)`` instead of sleeping. A blocking
``lease(wait_secs>0)`` or ``wait_for_work`` waits in real time and wakes on enqueue, release and
requeue; with a fake clock call them with ``wait_secs=0`` (a due time on a fake clock is never
reached by waiting).
"""

from __future__ import annotations

import heapq
import itertools
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from children.backends.base import Backend, Leased, Limits, Outcome, QueueStats, TaskInfo, TaskState, per_item

Clock = Callable[[], float]


class FakeClock:
    """A clock for tests: stands still until ``advance`` moves it."""

    def __init__(self, start: float = 1_000_000.0) -> None:
        self._now = start
        self._lock = threading.Lock()

    def __call__(self) -> float:
        with self._lock:
            return self._now

    def advance(self, secs: float) -> float:
        """Move the clock forward by ``secs`` (≥ 0); returns the new time."""
        if secs < 0:
            raise ValueError(f"FakeClock.advance({secs}): time does not go backwards")
        with self._lock:
            self._now += secs
            return self._now


@dataclass(slots=True)
class _Task:
    id: int
    payload: bytes
    tag: str
    enqueued_at: float
    visible_at: float | None  # None = dead
    attempt: int = 0
    token: int = 0  # the current delivery's token; 0 = not leased
    leased: bool = False
    version: int = 0  # bumped on every change of visible_at: older heap entries are stale
    last_error: str = ""
    dead_reason: str = ""


class _Store:
    """One queue's state, guarded by one lock. Heaps hold (visible_at, id, version) per tag."""

    def __init__(self) -> None:
        self.cond = threading.Condition(threading.Lock())
        self.tasks: dict[int, _Task] = {}
        self.heaps: dict[str, list[tuple[float, int, int]]] = {}
        self.heap_entries = 0
        self.ids = itertools.count(1)
        self.tokens = itertools.count(1)

    # every caller holds self.cond
    def schedule(self, task: _Task, visible_at: float | None) -> None:
        task.visible_at = visible_at
        task.version += 1
        if visible_at is not None:
            heapq.heappush(self.heaps.setdefault(task.tag, []), (visible_at, task.id, task.version))
            self.heap_entries += 1
            if self.heap_entries > 4 * len(self.tasks) + 64:
                self.compact()

    def compact(self) -> None:
        # extends and settlements leave stale entries behind; rebuild once they dominate
        self.heaps = {}
        for task in self.tasks.values():
            if task.visible_at is not None:
                self.heaps.setdefault(task.tag, []).append((task.visible_at, task.id, task.version))
        for heap in self.heaps.values():
            heapq.heapify(heap)
        self.heap_entries = sum(len(h) for h in self.heaps.values())

    def live_head(self, heap: list[tuple[float, int, int]]) -> tuple[float, int, int] | None:
        """The heap's first entry that still describes its task, dropping stale ones."""
        while heap:
            visible_at, task_id, version = heap[0]
            task = self.tasks.get(task_id)
            if task is not None and task.version == version:
                return heap[0]
            heapq.heappop(heap)
            self.heap_entries -= 1
        return None

    def next_visible(self, tag: str | None) -> float | None:
        """The earliest time any task of ``tag`` (any tag when None) is or becomes ready."""
        heaps = self.heaps.values() if tag is None else [self.heaps.get(tag, [])]
        heads = [h for h in (self.live_head(heap) for heap in heaps) if h is not None]
        return min(heads)[0] if heads else None

    def pop_ready(self, tag: str | None, now: float) -> _Task | None:
        heaps = list(self.heaps.values()) if tag is None else [self.heaps.get(tag, [])]
        best: list[tuple[float, int, int]] | None = None
        for heap in heaps:
            head = self.live_head(heap)
            if head is not None and head[0] <= now and (best is None or head < best[0]):
                best = heap
        if best is None:
            return None
        _, task_id, _ = heapq.heappop(best)
        self.heap_entries -= 1
        return self.tasks[task_id]

    def holder(self, receipt: str) -> _Task | None:
        """The task this receipt currently holds, or None if the receipt is stale or malformed."""
        id_text, _, token_text = receipt.partition(".")
        try:
            task_id, token = int(id_text), int(token_text)
        except ValueError:
            return None
        task = self.tasks.get(task_id)
        if task is None or token == 0 or task.token != token:
            return None
        return task


_shared: dict[tuple[str, str], _Store] = {}
_shared_lock = threading.Lock()




class MemoryBackend(Backend):
    """A lease queue in this process's memory; see the module docstring for URL and semantics."""

    name = "memory"

    def __init__(self, url: str = "memory://", name: str = "default", base_dir: Path | None = None,
                 clock: Clock | None = None) -> None:
        key = url.split("://", 1)[1] if "://" in url else ""
        if key:
            with _shared_lock:
                self._store = _shared.setdefault((key, name), _Store())
        else:
            self._store = _Store()
        self._clock: Clock = clock or time.time
        self._limits = Limits(min_lease_secs=0.05)

    @property
    def limits(self) -> Limits:
        return self._limits

    # -- the data path -------------------------------------------------------------------------
    def lease(self, max_tasks: int, lease_secs: float, wait_secs: float = 0.0,
              tag: str | None = None) -> list[Leased]:
        max_tasks = min(max_tasks, self._limits.max_lease_batch)
        lease_secs = self.clamp_lease(lease_secs)
        store = self._store
        deadline = time.monotonic() + max(0.0, wait_secs)
        with store.cond:
            while True:
                now = self._clock()
                out: list[Leased] = []
                while len(out) < max_tasks:
                    task = store.pop_ready(tag, now)
                    if task is None:
                        break
                    task.attempt += 1
                    task.token = next(store.tokens)
                    task.leased = True
                    store.schedule(task, now + lease_secs)
                    out.append(Leased(str(task.id), f"{task.id}.{task.token}", task.payload,
                                      task.attempt, task.tag))
                out.sort(key=lambda leased: int(leased.task_id))  # as sqlite: a batch in id order
                remaining = deadline - time.monotonic()
                if out or max_tasks <= 0 or remaining <= 0:
                    return out
                store.cond.wait(self._wait_time(tag, remaining))

    def _wait_time(self, tag: str | None, remaining: float) -> float:
        # wake when the next delayed task or expiring lease falls due, or at the deadline
        due = self._store.next_visible(tag)
        if due is None:
            return remaining
        return max(0.001, min(remaining, due - self._clock()))

    def _settle(self, receipts: Sequence[str], apply: Callable[[int, _Task, float], None],
                wake: bool = False) -> dict[str, Outcome]:
        """``apply(index, task, now)`` to the task of each receipt that holds it: OK there, LOST for
        the rest. ``wake`` notifies waiting leases (the change made work ready)."""
        store = self._store
        with store.cond:
            now = self._clock()
            out: dict[str, Outcome] = {}
            for i, receipt in enumerate(receipts):
                if receipt in out:  # a duplicate within the batch keeps its first answer
                    continue
                task = store.holder(receipt)
                if task is None:
                    out[receipt] = Outcome.LOST
                    continue
                apply(i, task, now)
                out[receipt] = Outcome.OK
            if wake:
                store.cond.notify_all()
            return out

    def extend(self, receipts: Sequence[str], lease_secs: float) -> dict[str, Outcome]:
        lease_secs = self.clamp_lease(lease_secs)
        return self._settle(receipts, lambda i, task, now: self._store.schedule(task, now + lease_secs))

    def ack(self, receipts: Sequence[str]) -> dict[str, Outcome]:
        # the task's heap entry goes stale and is dropped lazily
        return self._settle(receipts, lambda i, task, now: self._store.tasks.pop(task.id))

    def release(self, receipts: Sequence[str], delay_secs: float | Sequence[float] = 0.0,
                errors: Sequence[str] | None = None, count_attempt: bool = True) -> dict[str, Outcome]:
        delays = per_item(delay_secs, len(receipts), "release delay_secs")
        errs = per_item(errors, len(receipts), "release errors") if errors is not None else None

        def give_back(i: int, task: _Task, now: float) -> None:
            task.token, task.leased = 0, False
            if not count_attempt:
                task.attempt = max(0, task.attempt - 1)
            if errs is not None:
                task.last_error = errs[i]
            self._store.schedule(task, now + max(0.0, float(delays[i])))

        return self._settle(receipts, give_back, wake=True)

    def dead_letter(self, receipts: Sequence[str], reason: str | Sequence[str]) -> dict[str, Outcome]:
        reasons = per_item(reason, len(receipts), "dead_letter reason")

        def bury(i: int, task: _Task, now: float) -> None:
            task.token, task.leased, task.dead_reason = 0, False, reasons[i]
            self._store.schedule(task, None)

        return self._settle(receipts, bury)

    def enqueue(self, payloads: Sequence[bytes], delay_secs: float = 0.0, tag: str = "") -> list[str]:
        cap = self._limits.max_payload_bytes
        for payload in payloads:
            if len(payload) > cap:
                raise ValueError(f"payload of {len(payload)} bytes is over the {cap}-byte limit")
        store = self._store
        with store.cond:
            now = self._clock()
            ids = []
            for payload in payloads:
                task = _Task(next(store.ids), bytes(payload), tag, now, None)
                store.tasks[task.id] = task
                store.schedule(task, now + max(0.0, delay_secs))
                ids.append(str(task.id))
            store.cond.notify_all()
            return ids

    def stats(self) -> QueueStats:
        counts = dict.fromkeys(TaskState, 0)
        with self._store.cond:
            now = self._clock()
            oldest: float | None = None
            for task in self._store.tasks.values():
                state = self._state(task, now)
                counts[state] += 1
                if state is not TaskState.DEAD and (oldest is None or task.enqueued_at < oldest):
                    oldest = task.enqueued_at
        return QueueStats(counts[TaskState.READY], counts[TaskState.LEASED], counts[TaskState.DELAYED],
                          counts[TaskState.DEAD], None if oldest is None else max(0.0, now - oldest))

    def wait_for_work(self, timeout_secs: float) -> bool:
        deadline = time.monotonic() + max(0.0, timeout_secs)
        store = self._store
        with store.cond:
            while True:
                due = store.next_visible(None)
                if due is not None and due <= self._clock():
                    return True
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                if store.cond.wait(self._wait_time(None, remaining)):
                    return True

    # -- admin ---------------------------------------------------------------------------------
    @staticmethod
    def _state(task: _Task, now: float) -> TaskState:
        if task.visible_at is None:
            return TaskState.DEAD
        if task.visible_at <= now:
            return TaskState.READY
        return TaskState.LEASED if task.leased else TaskState.DELAYED

    def _info(self, task: _Task, now: float) -> TaskInfo:
        state = self._state(task, now)
        visible_at = task.visible_at if state in (TaskState.LEASED, TaskState.DELAYED) else None
        return TaskInfo(str(task.id), state, task.payload, task.attempt, task.tag, task.enqueued_at,
                        visible_at, task.last_error, task.dead_reason)

    def _find(self, task_ids: Sequence[str]) -> list[_Task]:
        found = []
        for text in task_ids:
            try:
                task = self._store.tasks.get(int(text))
            except ValueError:
                continue
            if task is not None:
                found.append(task)
        return found

    def list_tasks(self, state: TaskState | None = None, limit: int = 100) -> list[TaskInfo]:
        with self._store.cond:
            now = self._clock()
            out = []
            for task in self._store.tasks.values():  # a dict keeps insertion (= id) order
                if len(out) >= limit:
                    break
                if state is None or self._state(task, now) is state:
                    out.append(self._info(task, now))
            return out

    def get(self, task_id: str) -> TaskInfo | None:
        with self._store.cond:
            found = self._find([task_id])
            return self._info(found[0], self._clock()) if found else None

    def delete(self, task_ids: Sequence[str]) -> int:
        with self._store.cond:
            found = {task.id: task for task in self._find(task_ids)}
            for task_id in found:
                del self._store.tasks[task_id]
            return len(found)

    def requeue_dead(self, task_ids: Sequence[str] | None = None) -> int:
        store = self._store
        with store.cond:
            now = self._clock()
            candidates = store.tasks.values() if task_ids is None else self._find(task_ids)
            dead = {task.id: task for task in candidates if task.visible_at is None}
            for task in dead.values():
                task.attempt = 0
                task.dead_reason = ""
                store.schedule(task, now)
            store.cond.notify_all()
            return len(dead)

    def purge(self) -> int:
        store = self._store
        with store.cond:
            count = len(store.tasks)
            store.tasks.clear()
            store.compact()
            return count
