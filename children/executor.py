"""An executor process: runs the tasks the leaser hands it and reports each outcome.

It holds at most what the leaser's credit gave it, runs up to ``slots`` at once, and remembers every
outcome until the leaser confirms it settled (Forget): a Done lost with a dying leaser is reported
again in the Hello the new leaser asks for (Sync), so a finished task is never run twice for want of
a message. Commands run in their own process group with a timeout; callables run in this process
(slots > 1: in threads).
"""

from __future__ import annotations

import logging
import os
import resource
import signal
import threading
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import zmq

from children import protocol as p
from children.inbox import waiting_messages
from children.tasks import (
    BadTarget,
    CommandRun,
    Task,
    TaskTimeout,
    call_task,
    check_timeout,
    finish_command,
    load_callable,
    post_output,
    signal_group,
    start_command,
)
from config.schema import Config
from supervisor.instrument import observe
from supervisor.reasons import EXIT_RECYCLE  # retired after max_tasks_per_child / max_memory_mb
from supervisor.rundir import endpoint
from supervisor.sweep import TREE_VAR, sweep_predecessors

# Exit codes the executor uses (the supervisor maps them to reasons).
EXIT_TASK_HUNG = 79  # a callable ran past its timeout and ignored TaskTimeout
HUNG_GRACE_SECS = 5.0

DONE_FLUSH_ITEMS = 256
DONE_FLUSH_SECS = 0.001
DONE_FLUSH_MAX_SECS = 0.02  # a report is sent within this, however much is queued
PING_SECS = 1.0
RETIRE_WAIT_SECS = 5.0  # after retiring, wait this long at most for the leaser's Forget


def main(ctx: Any, config: dict[str, Any], index: int) -> int:
    cfg = Config.from_dict(config)
    return Executor(ctx, cfg, index).run()


class Executor:
    def __init__(self, ctx: Any, cfg: Config, index: int) -> None:
        self.ctx = ctx
        self.cfg = cfg
        self.name = f"executor.{index}"
        self.log = logging.getLogger(getattr(ctx, "path", self.name))
        ex = cfg.executors
        self.slots = max(1, int(ex.slots))
        self.timeout = float(ex.timeout_secs)
        self.output_url = ex.output_url
        self.max_tasks = int(ex.max_tasks_per_child)
        self.max_rss_kb = int(ex.max_memory_mb) * 1024
        self.argv = list(ex.command) if not ex.callable else []
        self.function = load_callable(ex.callable, list(ex.python_path)) if ex.callable else None
        self.pool = ThreadPoolExecutor(self.slots, thread_name_prefix=self.name) \
            if self.function is not None and self.slots > 1 else None
        self.queue: deque[list[Any]] = deque()  # task items received, not started
        self.commands: dict[int, CommandRun] = {}  # pidfd -> run
        self.threads: dict[Future[Any], tuple[list[Any], float]] = {}
        # A finished thread writes a byte here, so the poll wakes at once.
        self.thread_wake_r, self.thread_wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.poller = zmq.Poller()
        self.finished: dict[str, list[Any]] = {}  # receipt -> DoneItem, until Forget
        self.outbox: list[list[Any]] = []  # DoneItems not yet sent
        self.outbox_since = 0.0
        self.done_count = 0
        self.retiring = False
        self.retired_at: float | None = None
        self.serial = 0
        self.workdir = Path(ctx.runtime_dir) / "work" / self.name
        self.workdir.mkdir(parents=True, exist_ok=True)
        # Tasks are spawned without closing descriptors one by one (children/tasks.py): make sure
        # nothing this process inherited (from whoever started the tree) leaks into them.
        _no_inheritance()
        # what a dead predecessor left running (a task's own children) must not run on
        leftovers = sweep_predecessors(self.name, os.environ.get(TREE_VAR))
        if leftovers:
            self.log.warning("killed %d processes left by a previous %s", leftovers, self.name)
        # the tasks' environment, copied once (after the sweep marked ours): os.environ decodes
        # every variable on each copy
        self.env = dict(os.environ)
        self.current: tuple[str, float] | None = None  # inline callable: (receipt, deadline)
        self.stats: dict[str, Any] = {"tasks_total": 0, "failed_total": 0}
        self.reported_at = 0.0
        self.debug = self.log.isEnabledFor(logging.DEBUG)  # per-task lines only when asked for

    # -- the loop ----------------------------------------------------------------------------
    def run(self) -> int:
        zctx = zmq.Context()
        self.sock = zctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.IDENTITY, self.name.encode())
        self.sock.setsockopt(zmq.LINGER, 200)  # on exit, a dead leaser must not hold us long
        # we usually start before the leaser binds: retry the connection every 10 ms, not 100
        self.sock.setsockopt(zmq.RECONNECT_IVL, 10)
        self.sock.setsockopt(zmq.SNDHWM, 0)
        self.sock.setsockopt(zmq.RCVHWM, 0)
        self.sock.connect(endpoint(Path(self.ctx.runtime_dir), "leaser"))
        if self.function is not None and self.slots == 1 and self.timeout > 0:
            signal.signal(signal.SIGALRM, _raise_timeout)
            threading.Thread(target=self.watch_timeouts, name="timeouts", daemon=True).start()
        self.send_hello()
        self.ctx.ready()
        poller = self.poller
        poller.register(self.sock, zmq.POLLIN)
        poller.register(self.ctx.wakeup_fd, zmq.POLLIN)
        poller.register(self.thread_wake_r, zmq.POLLIN)
        last_sent = time.monotonic()
        try:
            while True:
                now = time.monotonic()
                if self.ctx.stop_requested >= 2:
                    self.abort_all("cold shutdown")
                    self.flush_done(now)
                    return 0
                if self.ctx.stop_requested and not self.retiring:
                    # a rolling restart stops us while the leaser runs: hand back the queue
                    self.retire(now, "stop requested", announce=False)
                if self.ctx.stop_requested and not self.busy():
                    self.flush_done(now)
                    return 0
                if self.retiring and not self.busy() and (not self.finished or now - (self.retired_at or now)
                                                          > RETIRE_WAIT_SECS):
                    self.flush_done(now)
                    self.log.info("recycling after %d tasks", self.done_count)
                    return EXIT_RECYCLE
                self.start_work(now)
                now = time.monotonic()
                if self.outbox and self.flush_due(now):
                    self.flush_done(now)
                    last_sent = now
                    self.maybe_retire(now)
                timeout = self.poll_timeout(now, last_sent)
                events = dict(poller.poll(timeout))
                if self.ctx.wakeup_fd in events:
                    self.ctx.clear_wakeup()
                if self.sock in events:
                    self.receive()
                self.reap(events, time.monotonic())
                if time.monotonic() - last_sent >= PING_SECS:
                    self.send(p.Ping(self.name, os.getpid()))
                    last_sent = time.monotonic()
                self.report()
        finally:
            for run in self.commands.values():
                signal_group(run, signal.SIGKILL)
            if self.pool is not None:
                self.pool.shutdown(wait=False, cancel_futures=True)
            self.sock.close()
            zctx.term()

    def flush_due(self, now: float) -> bool:
        """Report what finished when the queue is empty or has come down to what we report (the
        leaser refills the credit while the rest runs: one Done and one Tasks message for several
        tasks, rather than for each), or when the report is full or old."""
        age = now - self.outbox_since
        return (not self.queue or len(self.outbox) >= DONE_FLUSH_ITEMS or self.at_limit()
                or age >= DONE_FLUSH_MAX_SECS
                or (age >= DONE_FLUSH_SECS and len(self.queue) <= len(self.outbox)))

    def busy(self) -> bool:
        return bool(self.queue or self.commands or self.threads or self.outbox)

    def poll_timeout(self, now: float, last_sent: float) -> int:
        if self.queue and self.can_start():
            return 0
        wake = last_sent + PING_SECS
        if self.outbox:
            # the queue and the outbox change only on events, which end the poll anyway
            wait = DONE_FLUSH_SECS if len(self.queue) <= len(self.outbox) else DONE_FLUSH_MAX_SECS
            wake = min(wake, self.outbox_since + wait)
        for run in self.commands.values():
            wake = min(wake, run.killed_at + 5.0 if run.killed_at else run.deadline)
        return max(0, int((wake - now) * 1000) + 1)

    def receive(self) -> None:
        for message in waiting_messages(self.sock, self.log, "the leaser"):
            if isinstance(message, p.Tasks):
                if self.retiring:  # sent before the leaser heard we retire: give them back
                    self.send(p.Return([item[1] for item in message.items]))
                else:
                    self.queue.extend(message.items)
            elif isinstance(message, p.Forget):
                for receipt in message.receipts:
                    self.finished.pop(receipt, None)
            elif isinstance(message, p.Abort):
                self.abort(set(message.receipts), message.reason)
            elif isinstance(message, p.Sync):
                self.send_hello()
            else:
                self.log.warning("dropped an unexpected %s", type(message).__name__)

    # -- running -----------------------------------------------------------------------------
    def can_start(self) -> bool:
        running = len(self.commands) + len(self.threads)
        if self.max_tasks and self.done_count + running >= self.max_tasks:
            return False  # the last task before recycling is running: start nothing more
        return running < self.slots

    def at_limit(self) -> bool:
        return bool(self.max_tasks) and self.done_count >= self.max_tasks

    def start_work(self, now: float) -> None:
        if self.function is not None and self.pool is None:
            self.run_inline()
            return
        while self.queue and self.can_start() and not self.ctx.stop_requested >= 2:
            item = self.queue.popleft()
            task = Task(item[0], item[2], item[3], item[4])
            if self.pool is not None:
                future = self.pool.submit(call_task, self.function, task)
                future.add_done_callback(self._wake)
                self.threads[future] = (item, now)
                continue
            self.serial += 1
            try:
                used = {run.slot for run in self.commands.values()}
                slot = next(i for i in range(self.slots) if i not in used)
                run = start_command(self.argv, task, item[1], self.workdir, now, self.timeout, self.serial,
                                    self.env, slot)
            except OSError as exc:
                self.complete(item, False, b"", f"cannot start {self.argv[0]!r}: {exc.strerror or exc}", 0.0)
                continue
            self.commands[run.pidfd] = run
            self.poller.register(run.pidfd, zmq.POLLIN)

    def run_inline(self) -> None:
        """Run queued callable tasks in this thread, checking the socket now and then so Forget and
        Abort are not starved by a long run of tiny tasks."""
        checked = time.monotonic()
        while self.queue and not self.ctx.stop_requested >= 2 and not self.at_limit():
            item = self.queue.popleft()
            task = Task(item[0], item[2], item[3], item[4])
            started = time.monotonic()
            self.current = (item[1], started + self.timeout)
            try:
                ok, output, error = call_task(self.function, task)  # type: ignore[arg-type]
            finally:
                self.current = None
            finished = time.monotonic()
            self.complete(item, ok, output, error, finished - started)
            # report at least every DONE_FLUSH_SECS, so the leaser refills our credit while we run
            # the rest of the run, and check the socket now and then
            if (len(self.outbox) >= DONE_FLUSH_ITEMS or finished - self.outbox_since >= DONE_FLUSH_SECS
                    or finished - checked > 0.005 or self.at_limit()):
                break

    def watch_timeouts(self) -> None:
        """Enforce ``timeout_secs`` on inline callables from a thread, rather than arming a timer
        around every task (two syscalls a task): past the deadline, raise TaskTimeout in the main
        thread; if the task swallows it and runs on past a grace, exit, so the root restarts us and
        the leaser blames the task. A callable blocking the GIL stops this thread and the heartbeat
        alike, and the root kills us after heartbeat_timeout_secs."""
        main = threading.main_thread().ident
        period = min(1.0, max(0.05, self.timeout / 4))
        fired = None
        while True:
            time.sleep(period)
            current = self.current
            if current is None or time.monotonic() < current[1]:
                continue
            if fired is not current:
                fired = current
                signal.pthread_kill(main, signal.SIGALRM)  # type: ignore[arg-type]
            elif time.monotonic() > current[1] + HUNG_GRACE_SECS:
                self.log.error("task with receipt %s ignored its timeout; exiting", current[0])
                os._exit(EXIT_TASK_HUNG)

    def _wake(self, _future: Future[Any]) -> None:
        try:
            os.write(self.thread_wake_w, b"x")
        except BlockingIOError:
            pass  # the pipe is full of wake-ups already

    def reap(self, events: dict[Any, int], now: float) -> None:
        for pidfd, run in list(self.commands.items()):
            if pidfd in events or run.process.poll() is not None:
                if run.process.poll() is None:
                    continue
                del self.commands[pidfd]
                self.poller.unregister(pidfd)
                ok, output, error = finish_command(run)
                self.complete([run.task.id, run.receipt, b"", run.task.attempt, run.task.tag],
                              ok, output, error, now - run.started)
            else:
                check_timeout(run, now)
        if self.thread_wake_r in events:
            try:
                while os.read(self.thread_wake_r, 4096):
                    pass
            except BlockingIOError:
                pass
        if self.threads:
            for future in [f for f in self.threads if f.done()]:
                item, started = self.threads.pop(future)
                ok, output, error = future.result()
                self.complete(item, ok, output, error, now - started)

    def complete(self, item: list[Any], ok: bool, output: bytes, error: str, seconds: float) -> None:
        task_id, receipt = item[0], item[1]
        if ok and self.output_url:
            failure = post_output(self.output_url + task_id, output, min(60.0, max(1.0, self.timeout)))
            if failure:
                ok, error = False, failure
        done = [task_id, receipt, ok, error, item[3], round(seconds, 6)]
        self.finished[receipt] = done
        if not self.outbox:
            self.outbox_since = time.monotonic()
        self.outbox.append(done)
        self.done_count += 1
        self.stats["tasks_total"] += 1
        observe(self.stats, "task_seconds", "ok" if ok else "failed", seconds)  # metrics histogram
        if not ok:
            self.stats["failed_total"] += 1
            self.log.info("task %s attempt %d failed: %s", task_id, item[3], error,
                          extra={"task_id": task_id})
        elif self.debug:
            self.log.debug("task %s attempt %d ok in %.1f ms: output %r", task_id, item[3], seconds * 1000,
                           output[:60], extra={"task_id": task_id})

    def flush_done(self, now: float) -> None:
        if self.outbox:
            self.send(p.Done(self.outbox))
            self.outbox = []

    def abort(self, receipts: set[str], reason: str) -> None:
        """Stop tasks whose lease is lost (or all, on a cold stop): never keep running a task that
        another host may be running now."""
        everything = not receipts
        kept = deque(i for i in self.queue if not (everything or i[1] in receipts))
        for item in self.queue:
            if everything or item[1] in receipts:
                self.complete(item, False, b"", reason, 0.0)
        self.queue = kept
        for run in self.commands.values():
            if everything or run.receipt in receipts:
                run.timed_out = False
                signal_group(run, signal.SIGKILL)

    def abort_all(self, reason: str) -> None:
        self.abort(set(), reason)
        deadline = time.monotonic() + 2.0
        while self.commands and time.monotonic() < deadline:
            for pidfd, run in list(self.commands.items()):
                if run.process.poll() is not None:
                    del self.commands[pidfd]
                    self.poller.unregister(pidfd)
                    finish_command(run)
                    self.complete([run.task.id, run.receipt, b"", run.task.attempt, run.task.tag],
                                  False, b"", reason, 0.0)
            time.sleep(0.005)

    # -- talking to the leaser ---------------------------------------------------------------
    def send(self, message: p.Message) -> None:
        try:
            self.sock.send(p.encode(message), zmq.NOBLOCK)
        except zmq.Again:
            # No leaser connected right now: the Hello after its Sync carries what matters.
            pass

    def held_items(self) -> list[list[Any]]:
        now = time.monotonic()
        held = [[i[0], i[1], i[3], 0.0] for i in self.queue]
        held += [[r.task.id, r.receipt, r.task.attempt, now - r.started] for r in self.commands.values()]
        held += [[i[0], i[1], i[3], now - s] for i, s in self.threads.values()]
        return held

    def send_hello(self) -> None:
        slots = 0 if self.retiring else self.slots
        self.send(p.Hello(self.name, "executor", os.getpid(), slots, self.held_items(),
                          list(self.finished.values())))

    def maybe_retire(self, now: float) -> None:
        if self.retiring:
            return
        over_tasks = self.max_tasks and self.done_count >= self.max_tasks
        over_memory = self.max_rss_kb and _rss_kb() >= self.max_rss_kb
        if over_tasks or over_memory:
            self.retire(now, "max_tasks_per_child reached" if over_tasks else "max_memory_mb reached")

    def retire(self, now: float, why: str, announce: bool = True) -> None:
        """Take no more work: tell the leaser (slots 0) and give back what has not started.

        Without ``announce`` it tells the leaser only if it has something to give back: on a tree's
        warm stop the leaser has drained and gone, and a message nobody reads would hold our exit
        for the socket's linger."""
        self.retiring = True
        self.retired_at = now
        unstarted, self.queue = [item[1] for item in self.queue], deque()
        if announce or unstarted:
            self.log.info("retiring: %s", why)
            self.send_hello()  # slots 0: no more work for this incarnation
        if unstarted:
            self.send(p.Return(unstarted))

    def report(self) -> None:
        now = time.monotonic()
        if now - self.reported_at < 0.2:
            return
        self.reported_at = now
        self.stats["running"] = len(self.commands) + len(self.threads)
        self.stats["queued"] = len(self.queue)
        self.ctx.report(self.stats)


def _no_inheritance() -> None:
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        if fd > 2:
            try:
                if os.get_inheritable(fd):
                    os.set_inheritable(fd, False)
            except OSError:
                pass  # the listing's own descriptor, already closed


def _raise_timeout(signum: int, frame: Any) -> None:
    raise TaskTimeout()


def _rss_kb() -> int:
    try:
        with open("/proc/self/statm") as handle:
            pages = int(handle.read().split()[1])
        return pages * (os.sysconf("SC_PAGE_SIZE") // 1024)
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


__all__ = ["main", "Executor", "BadTarget"]
