"""The leaser's ledger: every task this host holds, from lease to settlement. Pure: no I/O, no clock.

A task moves ``held`` (leased, not yet given to an executor) -> ``running`` (an executor said it has
it) -> ``finished`` (the executor reported the outcome) -> gone (the reaper confirmed it settled).
Every entry not yet settled has its lease extended, so a task that waits, runs or waits for its ack
is never handed to another host behind our back.

The shell (``children/leaser.py``) feeds events in with ``now`` (a monotonic time) and performs what
the methods return: messages to send, receipts to extend, items to settle.
"""

from __future__ import annotations

import random
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from children.backends.base import Leased

HELD, RUNNING, FINISHED = "held", "running", "finished"

# Tasks shorter than SHORT_TASK_SECS are dispatched in runs rather than one per free slot, so that
# the per-message cost is shared; a run is sized to about RUN_TARGET_SECS of work, which bounds how
# long an idle executor can wait behind another's buffer.
RUN_TARGET_SECS = 0.02
MAX_RUN = 256
# Below this a task is short enough that an executor also holds the next one while it runs one
# (double buffering), so it never idles for the round trip its Done and the next Tasks take.
SHORT_TASK_SECS = 0.02


@dataclass(slots=True)
class Entry:
    task_id: str
    receipt: str
    payload: bytes | None
    attempt: int
    tag: str
    leased_at: float
    deadline: float  # when the lease runs out unless extended
    next_extend: float
    state: str = HELD
    peer: str = ""
    dispatched_at: float | None = None
    ok: bool = False
    error: str = ""
    settle_sent_at: float | None = None
    seq: int = 0  # dispatch order: an executor runs its tasks in this order


@dataclass(slots=True)
class Peer:
    name: str
    kind: str
    incarnation: int
    slots: int
    retiring: bool = False
    budget: int | None = None  # tasks it may still be given before it retires (None: no limit)
    running: set[str] = field(default_factory=set)  # receipts


@dataclass(frozen=True, slots=True)
class Policy:
    lease_secs: float
    max_lease_secs: float
    max_attempts: int
    resend_secs: float = 2.0  # re-send a Settle the reaper has not confirmed after this long
    max_tasks_per_child: int = 0  # an executor retires after this many: never hand it more


class Ledger:
    """State of every task held on this host. Methods take ``now`` and return what to do."""

    def __init__(self, policy: Policy, rng: random.Random | None = None) -> None:
        self.policy = policy
        self.rng = rng or random.Random()
        self.entries: dict[str, Entry] = {}
        self.by_task: dict[str, str] = {}  # task id -> current receipt
        self.aliases: dict[str, str] = {}  # an older receipt of a task we re-leased -> current one
        self.held: deque[str] = deque()
        self.peers: dict[str, Peer] = {}
        self.to_settle: list[str] = []  # finished receipts not yet sent to the reaper
        self.finished_count = 0
        self.dispatch_seq = 0
        self.ext_floor: float | None = None  # no extension is due before this
        self.settle_floor: float | None = None  # no unconfirmed settle was sent before this
        self.task_secs = 0.0  # moving average of task run time, sizes dispatch runs
        self.counters: dict[str, int] = {
            "leased_total": 0, "dispatched_total": 0, "succeeded_total": 0, "failed_total": 0,
            "settled_total": 0, "lost_total": 0, "duplicates_skipped_total": 0,
        }

    # -- leasing -----------------------------------------------------------------------------
    def in_flight(self) -> int:
        return len(self.entries)

    def capacity(self) -> int:
        """Slots of the executors that can take work."""
        return sum(p.slots for p in self.peers.values() if p.kind == "executor" and not p.retiring)

    def want(self, max_in_flight: int) -> int:
        """How many tasks to lease now. ``max_in_flight`` 0 means enough to keep every slot busy
        for one more round, sized by the dispatch run.

        Finished tasks waiting for their ack do not count against it (they hold no slot), but they
        are bounded too, so a stalled reaper stops the leasing instead of growing the ledger."""
        limit = self._limit(max_in_flight)
        unsettled = len(self.entries) - self.finished_count
        if self.finished_count > 4 * limit:
            return 0
        return max(0, limit - unsettled)

    def _limit(self, max_in_flight: int) -> int:
        return max_in_flight or max(1, self.capacity()) * (1 + 2 * self.run_length())

    def lease_now(self, max_in_flight: int) -> bool:
        """Whether a lease call is worth making: with a configured ``max_in_flight``, whenever there
        is room; else when there is room for half the limit. The other half is a run per slot
        still queued at the executors, so none idles while the call is made, and a call brings
        many tasks: leasing at every free place cost one lease call per two /bin/true tasks."""
        want = self.want(max_in_flight)
        return want > 0 and (max_in_flight > 0 or 2 * want >= self._limit(0))

    def add_leased(self, tasks: list[Leased], now: float) -> list[Leased]:
        """Take newly leased deliveries. Returns those that must be dead-lettered at once (attempt
        beyond max_attempts: a task that keeps killing its executors or timing out its leases)."""
        too_many: list[Leased] = []
        self.counters["leased_total"] += len(tasks)
        # One jittered extension time per batch: leased together, extended together.
        deadline, next_extend = now + self.policy.lease_secs, self._next_extend(now)
        self._lower_ext_floor(next_extend)
        entries, by_task, held = self.entries, self.by_task, self.held
        max_attempts = self.policy.max_attempts
        for task in tasks:
            current = by_task.get(task.task_id)
            if current is not None and current in entries:
                # Our own lease ran out and we leased the task again while it still runs here: keep
                # one copy, settle with the fresh receipt (the old one is stale now).
                self._rebind(current, task, now)
                self.counters["duplicates_skipped_total"] += 1
                continue
            if task.attempt > max_attempts:
                too_many.append(task)
                continue
            receipt = task.receipt
            entries[receipt] = Entry(task.task_id, receipt, task.payload, task.attempt, task.tag,
                                     now, deadline, next_extend)
            by_task[task.task_id] = receipt
            held.append(receipt)
        return too_many

    def _rebind(self, old: str, task: Leased, now: float) -> None:
        entry = self.entries.pop(old)
        entry.receipt = task.receipt
        entry.attempt = task.attempt
        entry.deadline = now + self.policy.lease_secs
        entry.next_extend = self._next_extend(now)
        self._lower_ext_floor(entry.next_extend)
        self.entries[task.receipt] = entry
        self.by_task[task.task_id] = task.receipt
        self.aliases[old] = task.receipt
        if entry.state == HELD:
            self.held = deque(task.receipt if r == old else r for r in self.held)
        elif entry.peer in self.peers:
            running = self.peers[entry.peer].running
            if old in running:
                running.discard(old)
                running.add(task.receipt)
        if old in self.to_settle:
            self.to_settle = [task.receipt if r == old else r for r in self.to_settle]

    def _next_extend(self, now: float) -> float:
        # Before 0.9 of the lease, jittered so that many hosts do not extend in lock-step.
        return now + self.policy.lease_secs * self.rng.uniform(0.6, 0.85)

    # -- dispatch ----------------------------------------------------------------------------
    def run_length(self) -> int:
        """Tasks to hand an executor per free slot: 1 for real work, more for tiny tasks."""
        if self.task_secs <= 0.0 or self.task_secs >= SHORT_TASK_SECS:
            return 1
        return max(2, min(MAX_RUN, int(RUN_TARGET_SECS / self.task_secs)))

    def dispatch(self, now: float) -> list[tuple[str, list[list[Any]]]]:
        """Hand held tasks to executors with free credit; returns (peer, task items) to send."""
        out: list[tuple[str, list[list[Any]]]] = []
        if not self.held:
            return out
        run = self.run_length()
        # Credit is counted in tasks: an executor may hold ``slots * run`` of them. Most free credit
        # first, so work spreads evenly and no executor idles while another has a backlog.
        credit = {p.name: p.slots * run - len(p.running) if p.budget is None
                  else min(p.slots * run - len(p.running), p.budget)
                  for p in self.peers.values() if p.kind == "executor" and not p.retiring}
        for name in sorted(credit, key=lambda n: -credit[n]):
            if not self.held:
                break
            peer = self.peers[name]
            budget = min(credit[name], len(self.held))
            if budget <= 0:
                continue
            items = []
            for _ in range(budget):
                receipt = self.held.popleft()
                entry = self.entries[receipt]
                entry.state = RUNNING
                entry.peer = peer.name
                entry.dispatched_at = now
                self.dispatch_seq += 1
                entry.seq = self.dispatch_seq
                peer.running.add(receipt)
                items.append([entry.task_id, receipt, entry.payload or b"", entry.attempt, entry.tag])
                entry.payload = None  # the executor has it now; do not keep 10 MB twice
            self.counters["dispatched_total"] += len(items)
            if peer.budget is not None:
                peer.budget -= len(items)
            out.append((peer.name, items))
        return out

    # -- peers -------------------------------------------------------------------------------
    def on_hello(self, name: str, kind: str, incarnation: int, slots: int, running: list[list[Any]],
                 finished: list[list[Any]], now: float) -> list[str]:
        """A peer (re)introduced itself. A new incarnation of an executor means the old one died.

        Of what we had given it and it does not report, the first ``slots`` in dispatch order were
        running (an executor runs its tasks in order): they count as failed attempts, so a task that
        keeps killing its executor ends in the dead letter. The rest never started; they are
        returned, removed from the ledger, to be released at once without blame."""
        old = self.peers.get(name)
        reported = {item[1] for item in running} | {item[1] for item in finished}
        never_started: list[str] = []
        if old is not None and old.kind == "executor" and old.incarnation == incarnation:
            # The same process again (after our Sync, or retiring): tasks we sent it may still be
            # on the wire, so what it does not report is not lost. It keeps them all.
            old.slots, old.retiring = slots, slots == 0
            for item in running:
                old.running.add(self.aliases.get(item[1], item[1]))
            self.on_done(name, finished, now, adopting=True)
            return never_started
        if old is not None and old.kind == "executor":
            lost = [self.entries[r] for r in (self.aliases.get(r, r) for r in old.running)
                    if r not in reported and r in self.entries]
            lost.sort(key=lambda e: e.seq)
            died = "executor died"
            for index, entry in enumerate(lost):
                if index < max(1, old.slots):
                    self._finish(entry, False, f"{died} while running it ({name}, pid {old.incarnation})")
                else:
                    self._drop(entry)
                    never_started.append(entry.receipt)
        peer = Peer(name, kind, incarnation, slots, retiring=(kind == "executor" and slots == 0),
                    budget=(self.policy.max_tasks_per_child - len(running) - len(finished)
                            if self.policy.max_tasks_per_child else None))
        self.peers[name] = peer
        if kind != "executor":
            return never_started
        for task_id, receipt, attempt, running_secs in running:
            receipt = self.aliases.get(receipt, receipt)
            entry = self.entries.get(receipt)
            if entry is None:
                # We restarted: adopt the task, extend its lease at once (its deadline is unknown).
                entry = Entry(task_id, receipt, None, attempt, "", leased_at=now - running_secs,
                              deadline=now, next_extend=now, state=RUNNING)
                self._lower_ext_floor(now)
                self.entries[receipt] = entry
                self.by_task[task_id] = receipt
            elif entry.state == HELD:
                self.held.remove(receipt)
            entry.state, entry.peer = RUNNING, name
            entry.dispatched_at = entry.dispatched_at or now - running_secs
            peer.running.add(receipt)
        self.on_done(name, finished, now, adopting=True)
        return never_started

    def on_done(self, name: str, items: list[list[Any]], now: float, adopting: bool = False) -> list[str]:
        """An executor reported completions. Returns receipts it should forget because we no longer
        hold them (lease lost, or already settled)."""
        peer = self.peers.get(name)
        forget: list[str] = []
        running = peer.running if peer is not None else set()
        aliases, entries = self.aliases, self.entries
        total = 0.0
        for task_id, receipt, ok, error, attempt, seconds in items:
            current = aliases.get(receipt, receipt) if aliases else receipt
            entry = entries.get(current)
            running.discard(receipt)
            if current is not receipt:
                running.discard(current)
            if entry is None:
                if self.by_task.get(task_id) is None and peer is not None and adopting:
                    # Adopted after our restart: we never saw this lease, settle it as reported.
                    entry = Entry(task_id, current, None, attempt, "", now, now, now, RUNNING, name)
                    self._lower_ext_floor(now)
                    self.entries[current] = entry
                    self.by_task[task_id] = current
                else:
                    forget.append(receipt)
                    continue
            if entry.state == FINISHED:
                continue
            self._finish(entry, bool(ok), error)
            total += seconds
        if items and total > 0:
            self._observe(total / len(items))
        return forget

    def _finish(self, entry: Entry, ok: bool, error: str) -> None:
        entry.state, entry.ok, entry.error = FINISHED, ok, error
        self.finished_count += 1
        self.counters["succeeded_total" if ok else "failed_total"] += 1
        self.to_settle.append(entry.receipt)

    def _observe(self, seconds: float) -> None:
        """Fold a batch's mean run time into the moving average that sizes dispatch runs."""
        self.task_secs = seconds if self.task_secs == 0 else 0.8 * self.task_secs + 0.2 * seconds

    def on_return(self, name: str, receipts: list[str]) -> list[str]:
        """An executor gives back tasks it never started. Returns those we still held (to release
        at once); they are gone from the ledger."""
        peer = self.peers.get(name)
        returned = []
        for receipt in receipts:
            current = self.aliases.get(receipt, receipt)
            entry = self.entries.get(current)
            if peer is not None:
                peer.running.discard(receipt)
                peer.running.discard(current)
            if entry is not None and entry.state == RUNNING:
                self._drop(entry)
                returned.append(current)
        return returned

    # -- settling ----------------------------------------------------------------------------
    def take_settles(self, now: float, reaper_restarted: bool = False) -> list[list[Any]]:
        """Settle items to send to the reaper: new completions, plus any not confirmed within
        ``resend_secs`` (a message to a peer that died is lost), or all of them after a reaper
        restart."""
        items: list[list[Any]] = []
        fresh, self.to_settle = self.to_settle, []
        entries = self.entries
        for receipt in fresh:
            entry = entries.get(receipt)
            if entry is not None and entry.settle_sent_at is None:
                entry.settle_sent_at = now
                items.append([entry.task_id, receipt, entry.ok, entry.error, entry.attempt])
        if items and self.settle_floor is None:
            self.settle_floor = now
        cutoff = now - self.policy.resend_secs
        if reaper_restarted or (self.settle_floor is not None and self.settle_floor <= cutoff):
            self.settle_floor = None
            for entry in self.entries.values():
                sent = entry.settle_sent_at
                if sent is None:
                    continue
                if sent != now and (reaper_restarted or sent <= cutoff):
                    entry.settle_sent_at = sent = now
                    items.append(self._settle_item(entry))
                if self.settle_floor is None or sent < self.settle_floor:
                    self.settle_floor = sent
        return items

    def _settle_item(self, entry: Entry) -> list[Any]:
        return [entry.task_id, entry.receipt, entry.ok, entry.error, entry.attempt]

    def on_settled(self, receipts: list[str], outcomes: list[str]) -> dict[str, list[str]]:
        """The reaper settled these. Returns, per executor, the receipts it may forget."""
        forget: dict[str, list[str]] = {}
        entries, by_task = self.entries, self.by_task
        settled = lost = finished = 0
        for receipt, outcome in zip(receipts, outcomes, strict=False):
            entry = entries.pop(receipt, None)
            if entry is None:
                continue
            settled += 1
            if entry.state == FINISHED:
                finished += 1
            if outcome == "lost":
                lost += 1
            if by_task.get(entry.task_id) == receipt:
                del by_task[entry.task_id]
            if entry.peer:
                forget.setdefault(entry.peer, []).append(receipt)
        self.finished_count -= finished
        self.counters["settled_total"] += settled
        self.counters["lost_total"] += lost
        if not self.entries:
            self.aliases.clear()
        elif len(self.aliases) > 4 * len(self.entries) + 1024:
            live = set(self.entries)
            self.aliases = {old: new for old, new in self.aliases.items() if new in live}
        return forget

    # -- leases ------------------------------------------------------------------------------
    def next_extension_at(self) -> float | None:
        """When the next extension is due (None if none will be). Cheap: a lower bound kept as
        entries come, made exact by a scan only once it has passed."""
        if self.ext_floor is None or not self.entries:
            return None
        return self.ext_floor

    def _rescan_extensions(self) -> None:
        candidates = [e.next_extend for e in self.entries.values() if self._extendable(e, e.next_extend)]
        self.ext_floor = min(candidates) if candidates else None

    def _lower_ext_floor(self, at: float) -> None:
        if self.ext_floor is None or at < self.ext_floor:
            self.ext_floor = at

    def _extendable(self, entry: Entry, now: float) -> bool:
        start = entry.dispatched_at if entry.dispatched_at is not None else entry.leased_at
        return now - start < self.policy.max_lease_secs

    def due_extensions(self, now: float) -> list[str]:
        """Receipts whose lease should be extended now. Everything due within the next tenth of a
        lease goes in the same call, so extensions batch instead of trickling."""
        horizon = now + self.policy.lease_secs * 0.1
        due = [r for r, e in self.entries.items() if e.next_extend <= horizon and self._extendable(e, now)]
        if not due:
            self._rescan_extensions()
        return due

    def extended(self, results: dict[str, str], now: float) -> list[tuple[str, str]]:
        """Apply extend outcomes. Returns (peer, receipt) of running tasks whose lease is lost: the
        executor must stop them, since another host may run them now."""
        lost: list[tuple[str, str]] = []
        for receipt, outcome in results.items():
            entry = self.entries.get(receipt)
            if entry is None:
                continue
            if outcome == "ok":
                entry.deadline = now + self.policy.lease_secs
                entry.next_extend = self._next_extend(now)
            elif outcome == "lost":
                self.counters["lost_total"] += 1
                self._drop(entry)
                if entry.state == RUNNING and entry.peer:
                    lost.append((entry.peer, receipt))
            else:  # retry: try again soon, well before the deadline
                entry.next_extend = now + min(1.0, self.policy.lease_secs * 0.05)
        self._rescan_extensions()
        return lost

    def _remove(self, receipt: str) -> Entry | None:
        entry = self.entries.pop(receipt, None)
        if entry is not None and entry.state == FINISHED:
            self.finished_count -= 1
        return entry

    def _drop(self, entry: Entry) -> None:
        self._remove(entry.receipt)
        if self.by_task.get(entry.task_id) == entry.receipt:
            del self.by_task[entry.task_id]
        if entry.state == HELD:
            try:
                self.held.remove(entry.receipt)
            except ValueError:
                pass
        peer = self.peers.get(entry.peer)
        if peer is not None:
            peer.running.discard(entry.receipt)

    def take_held(self) -> list[str]:
        """Remove every task not yet dispatched (warm shutdown releases them)."""
        receipts = list(self.held)
        self.held.clear()
        for receipt in receipts:
            entry = self.entries.pop(receipt)  # held: never finished
            if self.by_task.get(entry.task_id) == receipt:
                del self.by_task[entry.task_id]
        return receipts

    def gauges(self) -> dict[str, int]:
        running = sum(1 for e in self.entries.values() if e.state == RUNNING)
        finished = sum(1 for e in self.entries.values() if e.state == FINISHED)
        return {"in_flight": len(self.entries), "held": len(self.held), "running": running,
                "unsettled": finished,
                "executors": sum(1 for p in self.peers.values() if p.kind == "executor"),
                "capacity": self.capacity()}
