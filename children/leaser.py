"""The leaser process: leases tasks in batches, hands them to executors by credit, extends the leases
of everything not yet settled, and forwards completions to the reaper.

It owns task state on this host (``children/ledger.py`` holds it, purely). Its socket is a ROUTER
that executors and the reaper connect to; a peer it does not know (after either side restarted) is
asked for a Hello and reports everything it holds, so state is rebuilt from the peers, not guessed.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from pathlib import Path
from typing import Any

import zmq

from children import protocol as p
from children.backends import Backend, BackendError, BackendUnavailable, Leased, Outcome, open_backend
from children.backends.deferred import open_when_possible
from children.ledger import Ledger, Policy
from children.ratelimit import host_share
from children.retry import dead_reason
from config.schema import Config
from supervisor.instrument import instrument
from supervisor.rundir import endpoint

MIN_IDLE_SECS = 0.01  # first wait after an empty lease; doubles up to leaser.idle_poll_secs
WAIT_SLICE_SECS = 0.25  # it looks at ``stopping`` at least this often
MAX_ERROR_BACKOFF_SECS = 30.0
BURST_EMPTY_CHECKS = 2
FORGET_SECS = 0.1
FORGET_BATCH = 4096
REPORT_SECS = 0.2  # stats for the heartbeat; gathering them costs a scan of the ledger


class LeaseThread:
    """Runs lease calls on a thread of their own, with a backend instance of their own, so that a
    lease (a database transaction, a long poll that waits for work) overlaps the loop's work on the
    last batch instead of stalling it: SQLite, psycopg, redis-py and friends release the GIL while
    they wait. One call at a time; the loop asks, and is woken through a pipe when the answer is in.
    """

    def __init__(self, backend: Backend) -> None:
        self.backend = backend
        self.requests: queue.SimpleQueue[tuple[int, float, float, str | None] | None] = queue.SimpleQueue()
        self.results: queue.SimpleQueue[tuple[list[Leased] | BackendError, float]] = queue.SimpleQueue()
        self.wake_r, self.wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.busy = False
        self.stopping = False
        self.thread = threading.Thread(target=self._serve, name="lease", daemon=True)
        self.thread.start()

    def ask(self, max_tasks: int, lease_secs: float, wait_secs: float, tag: str | None) -> None:
        self.busy = True
        self.requests.put((max_tasks, lease_secs, wait_secs, tag))

    def answers(self) -> list[tuple[list[Leased] | BackendError, float]]:
        try:
            while os.read(self.wake_r, 4096):
                pass
        except BlockingIOError:
            pass
        out = []
        while True:
            try:
                out.append(self.results.get_nowait())
            except queue.Empty:
                break
        if out:
            self.busy = False
        return out

    def _serve(self) -> None:
        while True:
            request = self.requests.get()
            if request is None:
                return
            max_tasks, lease_secs, wait_secs, tag = request
            try:
                result: list[Leased] | BackendError = self._lease(max_tasks, lease_secs, wait_secs, tag)
            except BackendError as exc:
                result = exc
            self.results.put((result, time.monotonic()))
            try:
                os.write(self.wake_w, b"x")
            except BlockingIOError:
                pass

    def _lease(self, max_tasks: int, lease_secs: float, wait_secs: float, tag: str | None) -> list[Leased]:
        """Lease now; if nothing is there, wait for work with the backend's read-only watch
        (``wait_for_work``) in short slices, leasing again only when it says something changed.
        An idle tree so costs a lease transaction per ``wait_secs``, and a stop is seen within a
        slice."""
        tasks = self.backend.lease(max_tasks, lease_secs, 0.0, tag)
        deadline = time.monotonic() + wait_secs
        while not tasks and not self.stopping:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            if self.backend.wait_for_work(min(WAIT_SLICE_SECS, remaining)):
                tasks = self.backend.lease(max_tasks, lease_secs, 0.0, tag)
        return tasks

    def close(self) -> None:
        self.stopping = True
        self.requests.put(None)
        self.thread.join(timeout=WAIT_SLICE_SECS + 5)
        self.backend.close()
        os.close(self.wake_r)
        os.close(self.wake_w)


def main(ctx: Any, config: dict[str, Any], burst: bool = False) -> int:
    cfg = Config.from_dict(config)
    return Leaser(ctx, cfg, burst).run()


class Leaser:
    def __init__(self, ctx: Any, cfg: Config, burst: bool) -> None:
        self.ctx = ctx
        self.cfg = cfg
        self.burst = burst
        self.log = logging.getLogger(getattr(ctx, "path", "leaser"))
        lc = cfg.leaser
        self.lease_secs = float(lc.lease_secs)
        self.max_in_flight = int(lc.max_in_flight)
        self.min_running = int(lc.min_running_tasks)
        self.batch_wait = float(lc.batch_wait_secs)
        self.idle_cap = float(lc.idle_poll_secs)
        self.tag = lc.tag or None
        self.stats_for_leases: dict[str, Any] = {}  # the lease thread's own counters (no sharing)
        def opener() -> Backend:
            return open_backend(cfg.queue.url, cfg.queue.name, cfg.base_dir)

        # never a failed start over the queue: see children/backends/deferred.py
        self.backend = open_when_possible(opener, self.log, "leaser")
        self.leases = LeaseThread(instrument(open_when_possible(opener, self.log, "lease thread"),
                                             self.stats_for_leases))
        self.ledger = Ledger(Policy(self.lease_secs, float(lc.max_lease_secs), int(cfg.retry.max_attempts),
                                    resend_secs=max(2.0, 20 * float(cfg.reaper.max_latency_ms) / 1000.0),
                                    max_tasks_per_child=int(cfg.executors.max_tasks_per_child)))
        self.bucket = host_share(float(lc.requests_per_sec))
        self.next_lease_at = 0.0
        self.idle_wait = 0.0
        self.last_lease_at = float("-inf")
        self.errors_in_row = {"lease": 0, "extend": 0}  # separate: a failing extend must not stop leasing
        self.extend_retry_at = 0.0
        self.empty_checks = 0
        self.reaper_incarnation: int | None = None
        # Forget is only bookkeeping for the executors: send it in large, infrequent batches
        self.forget: dict[str, list[str]] = {}
        self.forget_sent_at = 0.0
        self.reported_at = 0.0
        self.stats: dict[str, Any] = {"lease_calls_total": 0, "extend_calls_total": 0,
                                      "backend_errors_total": 0, "dead_lettered_total": 0}
        # metrics: per-call latency, counts and errors go into the reported stats
        self.backend = instrument(self.backend, self.stats)

    # -- the loop ----------------------------------------------------------------------------
    def run(self) -> int:
        zctx = zmq.Context()
        sock = self.sock = zctx.socket(zmq.ROUTER)
        sock.setsockopt(zmq.ROUTER_MANDATORY, 1)  # a send to a peer that is gone raises, not vanishes
        # A restarted executor reconnects under the same identity, often before the dead one's pipe
        # is torn down; without handover the new connection would be ignored.
        sock.setsockopt(zmq.ROUTER_HANDOVER, 1)
        sock.setsockopt(zmq.LINGER, 1000)
        sock.setsockopt(zmq.SNDHWM, 0)
        sock.setsockopt(zmq.RCVHWM, 0)
        sock.bind(endpoint(Path(self.ctx.runtime_dir), "leaser"))
        os.chmod(Path(self.ctx.runtime_dir) / "leaser.ipc", 0o600)
        self.ctx.ready()
        poller = zmq.Poller()
        poller.register(sock, zmq.POLLIN)
        poller.register(self.ctx.wakeup_fd, zmq.POLLIN)
        poller.register(self.leases.wake_r, zmq.POLLIN)
        events: dict[Any, int] = {}
        try:
            while True:
                now = time.monotonic()
                if self.ctx.stop_requested >= 2:
                    return self.stop_cold()
                if self.ctx.stop_requested:
                    self.leases.stopping = True  # an idle long poll returns within a slice
                    self.release_held("warm shutdown")
                elif self.lease_due(now):
                    self.ask_lease(now)
                if self.leases.wake_r in events:
                    for result, at in self.leases.answers():
                        if self.leased(result, at) is False and self.burst_finished():
                            c = self.ledger.counters
                            self.log.info("burst done: queue empty and everything settled (%d succeeded, "
                                          "%d failed attempts)", c["succeeded_total"], c["failed_total"])
                            self.send_forgets(time.monotonic(), everything=True)
                            return 0
                self.dispatch(time.monotonic())
                self.extend(time.monotonic())
                self.forward_settles(time.monotonic())
                self.send_forgets(time.monotonic())
                if self.ctx.stop_requested and not self.ledger.entries and not self.leases.busy:
                    self.send_forgets(time.monotonic(), everything=True)
                    return 0
                events = dict(poller.poll(self.poll_timeout(time.monotonic())))
                if self.ctx.wakeup_fd in events:
                    self.ctx.clear_wakeup()
                if sock in events:
                    self.receive(time.monotonic())
                self.report()
        finally:
            self.leases.close()
            self.backend.close()
            sock.close()
            zctx.term()

    def poll_timeout(self, now: float) -> int:
        wake = now + 1.0
        if (not self.ctx.stop_requested and not self.leases.busy and self.ledger.capacity()
                and self.ledger.lease_now(self.max_in_flight)):
            wake = min(wake, self.next_lease_at)
        extension = self.ledger.next_extension_at()
        if extension is not None:
            wake = min(wake, max(extension - self.lease_secs * 0.1, self.extend_retry_at))
        if self.forget:
            wake = min(wake, self.forget_sent_at + FORGET_SECS)
        if self.ledger.to_settle:
            wake = now
        return max(0, int((wake - now) * 1000) + 1)

    # -- leasing -----------------------------------------------------------------------------
    def lease_due(self, now: float) -> bool:
        if self.leases.busy or now < self.next_lease_at or not self.ledger.capacity():
            return False
        if not self.ledger.lease_now(self.max_in_flight):
            return False
        if self.min_running and self.ledger.in_flight() > self.min_running:
            # the seed's batching of lease calls: wait until few remain, or batch_wait_secs passed
            return now - self.last_lease_at >= self.batch_wait
        return True

    def ask_lease(self, now: float) -> None:
        """Ask the lease thread for as many tasks as there is room for."""
        wait = self.bucket.wait_secs(now)
        if wait > 0:
            self.next_lease_at = now + wait
            return
        want = min(self.ledger.want(self.max_in_flight), self.backend.limits.max_lease_batch)
        # After an empty answer, wait in the backend (a long poll that returns the moment work
        # arrives) rather than sleep here: the call is on its own thread, so the loop runs on, and
        # an enqueue reaches an executor in milliseconds. The thread checks for a stop every slice.
        wait_secs = self.idle_wait  # 0 while work flows; up to idle_poll_secs when the queue is empty
        self.bucket.take(now)
        self.stats["lease_calls_total"] += 1
        self.leases.ask(want, self.lease_secs, wait_secs, self.tag)

    def leased(self, result: list[Leased] | BackendError, now: float) -> bool | None:
        """Take a lease answer. Returns True if tasks came, False if the queue was empty, None on
        error."""
        if isinstance(result, BackendError):
            self.backend_failed("lease", result, now)
            return None
        self.errors_in_row["lease"] = 0
        self.last_lease_at = now
        if not result:
            self.idle_wait = min(self.idle_cap, max(MIN_IDLE_SECS, self.idle_wait * 2))
            # the call itself waited (``wait_for_work`` wakes at once on work): ask again now
            self.next_lease_at = now
            return False
        self.idle_wait = 0.0
        self.empty_checks = 0
        self.next_lease_at = now
        too_many = self.ledger.add_leased(result, now)
        if too_many:
            self.dead_letter_now(too_many)
        return True

    def burst_finished(self) -> bool:
        if not self.burst or self.ledger.entries:
            return False
        self.empty_checks += 1
        if self.empty_checks < BURST_EMPTY_CHECKS:
            return False
        try:
            stats = self.backend.stats()
        except BackendError:
            return False
        # delayed tasks (retries waiting out their backoff) are still work for this run
        return stats.ready == 0 and stats.delayed == 0

    def dead_letter_now(self, tasks: list[Leased]) -> None:
        """Tasks leased past max_attempts (their executors kept dying, or their leases kept
        running out): straight to the dead letter."""
        receipts = [t.receipt for t in tasks]
        try:
            self.backend.dead_letter(receipts, [dead_reason(t.attempt - 1, "lease expired or executor died")
                                                for t in tasks])
            self.stats["dead_lettered_total"] += len(receipts)
        except BackendError as exc:
            self.log.warning("dead-lettering %d tasks failed, their leases will expire: %s",
                             len(receipts), exc)

    def backend_failed(self, call: str, exc: BackendError, now: float) -> None:
        """Back off the failed kind of call. Extensions retry within a fraction of the lease, since
        a lease that runs out hands the task to someone else; leasing backs off up to 30 s."""
        self.stats["backend_errors_total"] += 1
        self.errors_in_row[call] += 1
        count = self.errors_in_row[call]
        if call == "extend":
            delay = min(self.lease_secs * 0.1, 0.05 * 2 ** min(count, 10))
            self.extend_retry_at = now + delay
        else:
            delay = min(MAX_ERROR_BACKOFF_SECS, 0.1 * 2 ** min(count, 10))
            self.next_lease_at = now + delay
        if count in (1, 10) or count % 100 == 0:
            # a permanent-looking fault (BackendConfigError: a file made read-only under us) is an
            # error, not a warning, but is backed off all the same: the operator repairs it
            level = logging.WARNING if isinstance(exc, BackendUnavailable) else logging.ERROR
            self.log.log(level, "backend %s failed (%d in a row), retrying in %.2fs: %s",
                         call, count, delay, exc)

    # -- peers -------------------------------------------------------------------------------
    def send(self, peer: str, message: p.Message) -> bool:
        try:
            self.sock.send_multipart([peer.encode(), p.encode(message)], zmq.NOBLOCK)
            return True
        except zmq.ZMQError as exc:
            if exc.errno == zmq.EHOSTUNREACH:
                return False  # the peer is gone; its next incarnation will say Hello
            if exc.errno == zmq.EAGAIN:
                return False
            raise

    def receive(self, now: float) -> None:
        while True:
            try:
                frames = self.sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            if len(frames) != 2:
                self.log.warning("dropped a message of %d frames", len(frames))
                continue
            peer = frames[0].decode(errors="backslashreplace")  # a forged identity cannot forge log lines
            if not peer.isprintable():
                self.log.warning("dropped a message from a peer named %r", peer)
                continue
            try:
                message = p.decode(frames[1])
            except p.ProtocolError as exc:
                self.log.warning("dropped a malformed frame from %s: %s", peer, exc)
                continue
            self.handle(peer, message, now)

    def handle(self, peer: str, message: p.Message, now: float) -> None:
        known = self.ledger.peers.get(peer)
        if isinstance(message, p.Hello):
            if message.kind == "reaper":
                self.reaper_incarnation = message.incarnation
                self.ledger.on_hello(peer, "reaper", message.incarnation, 0, [], [], now)
                # a new reaper lost whatever the old one held: send it everything unconfirmed
                self.send_settles(self.ledger.take_settles(now, reaper_restarted=True))
                return
            if known is None or known.incarnation != message.incarnation:
                self.log.info("%s joined (pid %d, %d slots, holding %d)", peer, message.incarnation,
                              message.slots, len(message.running) + len(message.finished))
            never_started = self.ledger.on_hello(peer, "executor", message.incarnation, message.slots,
                                                 message.running, message.finished, now)
            if never_started:
                self.release_now(never_started, f"{peer} died before starting them")
            return
        if known is None or (isinstance(message, p.Ping) and message.incarnation != known.incarnation):
            self.send(peer, p.Sync(os.getpid()))
            return
        if isinstance(message, p.Done):
            forget = self.ledger.on_done(peer, message.items, now)
            if forget:
                self.send(peer, p.Forget(forget))
        elif isinstance(message, p.Return):
            returned = self.ledger.on_return(peer, message.receipts)
            if returned:
                self.release_now(returned, f"{peer} retiring")
        elif isinstance(message, p.Settled):
            for executor, receipts in self.ledger.on_settled(message.receipts, message.outcomes).items():
                self.forget.setdefault(executor, []).extend(receipts)
        elif not isinstance(message, p.Ping):
            self.log.warning("dropped an unexpected %s from %s", type(message).__name__, peer)

    def dispatch(self, now: float) -> None:
        for peer, items in self.ledger.dispatch(now):
            if not self.send(peer, p.Tasks(items)):
                # It died between its Hello and now: its next incarnation's Hello fails these.
                self.log.info("%s unreachable; %d tasks wait for its restart", peer, len(items))

    def forward_settles(self, now: float) -> None:
        if self.ledger.to_settle or self.ledger.entries:
            self.send_settles(self.ledger.take_settles(now))

    def send_forgets(self, now: float, everything: bool = False) -> None:
        if not self.forget:
            return
        if not everything and now - self.forget_sent_at < FORGET_SECS and \
                sum(map(len, self.forget.values())) < FORGET_BATCH:
            return
        for executor, receipts in self.forget.items():
            self.send(executor, p.Forget(receipts))
        self.forget = {}
        self.forget_sent_at = now

    def send_settles(self, items: list[list[Any]]) -> None:
        if items and self.reaper_incarnation is not None:
            self.send("reaper", p.Settle(items))

    # -- leases ------------------------------------------------------------------------------
    def extend(self, now: float) -> None:
        extension = self.ledger.next_extension_at()
        if extension is None or extension - self.lease_secs * 0.1 > now or now < self.extend_retry_at:
            return
        due = self.ledger.due_extensions(now)
        cap = self.backend.limits.max_extend_batch
        for start in range(0, len(due), cap):
            chunk = due[start:start + cap]
            wait = self.bucket.wait_secs(now)
            if wait > 0:  # requests_per_sec: the rest stay due; the loop wakes when the bucket allows
                self.extend_retry_at = now + wait
                return
            self.bucket.take(now)
            self.stats["extend_calls_total"] += 1
            try:
                results = self.backend.extend(chunk, self.lease_secs)
                self.errors_in_row["extend"] = 0
            except BackendError as exc:
                self.backend_failed("extend", exc, now)
                results = {r: Outcome.RETRY for r in chunk}
            lost = self.ledger.extended({r: o.value for r, o in results.items()}, time.monotonic())
            for peer, receipt in lost:
                self.log.warning("lease of %s lost while it ran on %s: stopping it", receipt, peer)
                self.send(peer, p.Abort([receipt], "lease lost"))

    # -- stopping ----------------------------------------------------------------------------
    def release_held(self, why: str) -> None:
        held = self.ledger.take_held()
        if held:
            self.release_now(held, why)

    def release_now(self, receipts: list[str], why: str) -> None:
        """Give back tasks that never started, at once and with no delay."""
        try:
            # not started: the delivery is taken back, so a task does not use up its attempts by
            # waiting through warm stops, retiring executors or a neighbour's crash
            self.backend.release(receipts, 0.0, count_attempt=False)
            self.log.info("%s: released %d tasks not yet started", why, len(receipts))
        except BackendError as exc:
            self.log.warning("%s: releasing %d tasks failed, their leases will expire: %s",
                             why, len(receipts), exc)

    def stop_cold(self) -> int:
        """Second signal: kill running tasks, release everything not acked, and go."""
        self.leases.stopping = True
        deadline = time.monotonic() + WAIT_SLICE_SECS + 1.0
        while self.leases.busy and time.monotonic() < deadline:  # an answer on its way: take it too
            for result, at in self.leases.answers():
                if not isinstance(result, BackendError):
                    self.ledger.add_leased(result, at)
            time.sleep(0.01)
        for peer in list(self.ledger.peers):
            if self.ledger.peers[peer].kind == "executor":
                self.send(peer, p.Abort([], "cold shutdown"))
        self.release_held("cold shutdown")
        pending = list(self.ledger.entries.values())
        done_ok = [e.receipt for e in pending if e.state == "finished" and e.ok]
        rest = [e.receipt for e in pending if e.receipt not in set(done_ok)]
        try:
            if done_ok:
                self.backend.ack(done_ok)
            if rest:
                self.backend.release(rest, 0.0, ["cold shutdown"] * len(rest))
            self.log.info("cold shutdown: acked %d, released %d", len(done_ok), len(rest))
        except BackendError as exc:
            self.log.warning("cold shutdown: settling failed, leases will expire: %s", exc)
        return 0

    def report(self) -> None:
        now = time.monotonic()
        if now - self.reported_at < REPORT_SECS:
            return
        self.reported_at = now
        stats = dict(self.stats)
        for key, value in dict(self.stats_for_leases).items():  # the lease thread's backend timings
            stats[key] = stats.get(key, 0) + value if isinstance(value, (int, float)) else value
        stats.update(self.ledger.counters)
        stats.update(self.ledger.gauges())
        self.ctx.report(stats)
