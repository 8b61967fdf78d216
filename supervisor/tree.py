"""The root: one loop that turns signals, socket messages, process exits and timers into events for
the pure ``TreeCore`` and carries out the actions it returns.

One ``zmq.Poller`` watches everything: the supervision ROUTER (Ready, Heartbeat), the control
ROUTER, the signal wake-up pipe and one pidfd per worker -- so an exit is seen the moment it happens
and an idle tree sleeps in ``poll`` until the next timer (no polling loop). Signal handlers only
record; the loop acts: SIGTERM/SIGINT take the same path as the ``stop`` command (the first warm,
a second cold), SIGHUP the same path as the ``reload`` command (``supervisor/reload.py``).

Operating hooks, all optional: a ``Notifier`` (systemd READY/STOPPING/WATCHDOG from this loop), a
reloader (``ConfigReloader``: its plan is carried out here, one child-API call at a time), and a
metrics listen address (``supervisor/metrics.py``: the loop publishes a snapshot, the HTTP threads
read it). The loop also samples the task counters for ``rates`` (``supervisor/rates.py``).
"""

from __future__ import annotations

import logging
import math
import os
import signal
from collections import deque
from collections.abc import Callable, Generator
from pathlib import Path
from typing import Any

import zmq

from children.protocol import Heartbeat, ProtocolError, Ready, Reply, Request, decode
from supervisor import control, events
from supervisor.clock import Clock, SystemClock
from supervisor.core import READ_ONLY, TreeCore
from supervisor.events import Call, Finished, StartFailed, StartWorker, Stop, TerminateWorker
from supervisor.guard import GroupGuard
from supervisor.notify import Notifier
from supervisor.rates import Rates
from supervisor.reasons import abnormal
from supervisor.runner import ProcessRunner
from supervisor.spec import ChildSpec, SupervisorStart, SupFlags
from supervisor.sweep import TREE_VAR, new_token

log = logging.getLogger("root")  # its place in the tree

SUP_SOCKET = "sup.ipc"
CHILD_CALLS = ("start_child", "terminate_child", "restart_child", "delete_child")


class TreeAlreadyRunning(RuntimeError):
    """Another tree answers on this runtime directory's control socket."""


class Tree:
    """The root supervisor of an OS-process tree.

    ``run()`` blocks until the tree is gone and returns the process exit code: 0 after a stop or
    the root's auto_shutdown, 1 when it gave up (restart intensity exceeded, or a child could not
    start). ``latest_stats()`` and the control socket's ``status`` report the children's stats.
    """

    def __init__(self, flags: SupFlags, children: list[ChildSpec] | tuple[ChildSpec, ...],
                 runtime_dir: Path | str, heartbeat_secs: float = 1.0,
                 heartbeat_timeout_secs: float = 10.0, name: str = "root",
                 start_timeout_secs: float = 60.0, clock: Clock | None = None,
                 notifier: Notifier | None = None, reloader: Any = None, metrics_listen: str = "",
                 queue_probe: Callable[[], Any] | None = None) -> None:
        SupervisorStart(flags, tuple(children))  # validate now, in the caller's process
        self.flags = flags
        self.children = tuple(children)
        self.runtime_dir = Path(runtime_dir)
        self.heartbeat_secs = heartbeat_secs
        self.heartbeat_timeout_secs = heartbeat_timeout_secs
        self.start_timeout_secs = start_timeout_secs
        self.name = name
        self.clock = clock or SystemClock()
        self.reload_requested = False
        self.core: TreeCore | None = None
        self._runner: ProcessRunner | None = None
        self._signals: list[int] = []
        self._stop_requests = 0
        self._calls: dict[int, bytes] = {}  # call id -> control client identity
        self._call_ids = 0
        self.notifier = notifier or Notifier()
        self.reloader = reloader
        self.metrics_listen = metrics_listen
        self.queue_probe = queue_probe
        self.rates = Rates()
        self._published: dict[str, Any] = {}  # the metrics threads read this reference only
        self._told = ""  # the last root status told to systemd
        self._status_told_at = float("-inf")
        self._internal: set[int] = set()  # call ids of the tree's own calls (reload)
        self._reload_job: Generator[Any, Any, list[str]] | None = None
        self._reload_replies: deque[Any] = deque()
        self._reload_waiting = False
        self._reload_pending = ""  # a reload asked for while one runs: its origin
        self._reload_state: dict[str, Any] = {"generation": 0, "running": False, "last": None}

    # -- public ------------------------------------------------------------------------------------
    def latest_stats(self) -> dict[str, dict[str, Any]]:
        """child id -> its stats: ``*_total`` counters summed over its incarnations, gauges latest."""
        return self._runner.stats.snapshot() if self._runner else {}

    def run(self) -> int:
        if control.is_listening(self.runtime_dir):
            raise TreeAlreadyRunning(f"a tree is already running in {self.runtime_dir}")
        # Mark every descendant before anything is started: if this process dies, even by SIGKILL,
        # the guard kills every process that carries the mark (supervisor/sweep.py). A fresh mark
        # per tree, so a tree started by a task of another tree sweeps only its own.
        outer_mark = os.environ.get(TREE_VAR)
        os.environ[TREE_VAR] = new_token()
        try:
            guard = GroupGuard()  # first: nothing can have been started that it should have tracked
        except BaseException:
            _restore_mark(outer_mark)
            raise
        zctx = zmq.Context()
        wake_r, wake_w = os.pipe()
        for fd in (wake_r, wake_w):
            os.set_blocking(fd, False)
        old_handlers = {s: signal.signal(s, self._on_signal)
                        for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)}
        old_wakeup = signal.set_wakeup_fd(wake_w)
        sup_path = self.runtime_dir / SUP_SOCKET
        sup = zctx.socket(zmq.ROUTER)
        sup.linger = 0
        ctl: control.ControlServer | None = None
        metrics = None
        try:
            if self.metrics_listen:  # after the guard's fork: it must not inherit the thread
                from supervisor.metrics import MetricsServer, TreeCollector

                metrics = MetricsServer(self.metrics_listen, TreeCollector(lambda: self._published,
                                                                           self.queue_probe))
                metrics.start()
            if sup_path.exists():
                sup_path.unlink()
            control.bind_private(sup, sup_path)
            ctl = control.ControlServer(zctx, self.runtime_dir)
            self._runner = ProcessRunner(str(self.runtime_dir), f"ipc://{sup_path}", self.heartbeat_secs,
                                         self.heartbeat_timeout_secs, self.start_timeout_secs, guard)
            self.core = TreeCore(self.flags, self.children, self.name, os_pid=os.getpid())
            return self._loop(sup, ctl, wake_r)
        finally:
            if self._runner is not None:
                self._runner.kill_all()
            if metrics is not None:
                metrics.close()
            self.notifier.close()
            guard.close()
            _restore_mark(outer_mark)
            signal.set_wakeup_fd(old_wakeup)
            for signum, handler in old_handlers.items():
                signal.signal(signum, handler)
            if ctl is not None:
                ctl.close()
            sup.close()
            zctx.term()
            for fd in (wake_r, wake_w):
                os.close(fd)
            try:
                sup_path.unlink()
            except FileNotFoundError:
                pass

    # -- the loop ----------------------------------------------------------------------------------
    def _loop(self, sup: zmq.Socket, ctl: control.ControlServer, wake_r: int) -> int:
        self._poller = poller = zmq.Poller()
        for item in (sup, ctl.socket, wake_r):
            poller.register(item, zmq.POLLIN)
        self._ctl = ctl
        self._apply(self.core.start(self.clock.monotonic()))
        runner = self._runner
        while self.core.finished is None:
            deadline = runner.next_deadline()
            watchdog = self.notifier.watchdog_deadline(self.clock.monotonic())
            if watchdog is not None:
                deadline = watchdog if deadline is None else min(deadline, watchdog)
            timeout = None
            if deadline is not None:
                timeout = max(0, math.ceil((deadline - self.clock.monotonic()) * 1000))
            ready = dict(poller.poll(timeout))
            now = self.clock.monotonic()
            if wake_r in ready:
                self._drain_pipe(wake_r)
            self._handle_signals()
            if sup in ready:
                self._receive_supervision(sup, now)
            if ctl.socket in ready:
                for identity, request in ctl.receive():
                    self._on_request(identity, request)
            for fd in [fd for fd in ready if isinstance(fd, int) and fd in runner.by_fd]:
                if runner.by_fd[fd].state == "starting" and sup.poll(50):
                    # It may have said Ready just before exiting: the pidfd can beat the message
                    # through zmq's IO thread. Read it first, or a quick clean exit looks like a
                    # failed start.
                    self._receive_supervision(sup, self.clock.monotonic())
                event = runner.on_exit(fd, self.clock.monotonic())
                poller.unregister(fd)
                if event is not None:
                    self._feed(event)
            runner.on_timers(self.clock.monotonic())
            self._pump_reload()
            self._operate(self.clock.monotonic())
        self._operate(self.clock.monotonic())
        return self.core.finished.exit_code

    def _operate(self, now: float) -> None:
        """Once per loop turn: rates, the metrics snapshot, systemd."""
        if self.rates.due(now):
            self.rates.sample(now, self._rate_counters())
            if self.metrics_listen:
                self._published = self.status()
        self.notifier.on_timer(now)
        if not self.notifier.enabled:
            return
        state = self.core.root.status if self.core.finished is None else "dead"
        if state == "running" and self._told != "running":
            self.notifier.ready(self._status_line())
            self._status_told_at = now
        elif state in ("stopping", "dead") and self._told not in ("stopping", "dead"):
            self.notifier.stopping("stopping")
        elif state == "running" and now - self._status_told_at >= 5.0:
            self.notifier.status(self._status_line())
            self._status_told_at = now
        self._told = state

    def _rate_counters(self) -> dict[str, float]:
        stats = self.latest_stats()
        leaser, reaper = stats.get("leaser", {}), stats.get("reaper", {})
        return {"tasks": leaser.get("succeeded_total", 0) + leaser.get("failed_total", 0),
                "failed": leaser.get("failed_total", 0), "acked": reaper.get("acked_total", 0)}

    def _status_line(self) -> str:
        rows = self.core.status(self.clock.monotonic()) if self.core else []
        up = sum(1 for r in rows if r["type"] == "worker" and r["state"] == "running")
        workers = sum(1 for r in rows if r["type"] == "worker")
        rates = self.rates.rates()
        return (f"{up}/{workers} workers up; {rates.get('tasks_10s', 0.0):.1f} tasks/s (10s), "
                f"{rates.get('tasks_60s', 0.0):.1f} tasks/s (1min)")

    def _feed(self, event: Any) -> None:
        self._apply(self.core.handle(event, self.clock.monotonic()))

    def _apply(self, actions: list[Any]) -> None:
        for action in actions:
            now = self.clock.monotonic()
            if isinstance(action, StartWorker):
                try:
                    proc = self._runner.start(action, now)
                except OSError as exc:
                    log.error("child=%s reason=fork failed: %s", action.path, exc)
                    self._feed(StartFailed(action.ref, abnormal(f"failed to start: {exc}")))
                    continue
                self._poller.register(proc.fd, zmq.POLLIN)
            elif isinstance(action, TerminateWorker):
                self._runner.terminate(action.ref, action.shutdown, now)
            elif isinstance(action, events.Reply):
                if action.call_id in self._internal:
                    self._internal.discard(action.call_id)
                    self._reload_replies.append(action.result)
                    continue
                identity = self._calls.pop(action.call_id, None)
                if identity is not None:
                    self._ctl.reply(identity, control.reply_for(action.result))
            elif isinstance(action, Finished):
                pass  # the loop sees core.finished

    def _receive_supervision(self, sup: zmq.Socket, now: float) -> None:
        while True:
            try:
                frames = sup.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            try:
                message = decode(frames[-1])
            except ProtocolError as exc:
                log.warning("supervision socket: dropped a malformed frame: %s", exc)
                continue
            if isinstance(message, (Ready, Heartbeat)):
                event = self._runner.on_message(message, now)
                if event is not None:
                    self._feed(event)

    # -- signals and commands: one path ------------------------------------------------------------
    def _on_signal(self, signum: int, frame: Any) -> None:
        self._signals.append(signum)  # only record: the loop acts

    @staticmethod
    def _drain_pipe(fd: int) -> None:
        try:
            while os.read(fd, 512):
                pass
        except BlockingIOError:
            pass

    def _handle_signals(self) -> None:
        while self._signals:
            signum = self._signals.pop(0)
            if signum == signal.SIGHUP:
                log.info("SIGHUP: reload requested")
                self.reload_requested = True
                self._reload("SIGHUP")
            else:
                log.info("%s: stop requested", signal.Signals(signum).name)
                self._stop(cold=False)

    def _stop(self, cold: bool) -> None:
        """The first request is a warm stop; a second one (or ``cold``) makes it cold."""
        self._stop_requests += 1
        if self._stop_requests == 1:
            self.notifier.stopping("stopping (cold)" if cold else "stopping: draining")
            self._told = "stopping"
        if self._stop_requests == 1 and not cold:
            self._feed(Stop())
            return
        log.warning("cold stop: signalling the children being stopped once more")
        self._runner.go_cold()
        if self._stop_requests == 1:
            self._feed(Stop())

    def _on_request(self, identity: bytes, request: Request) -> None:
        command, args = request.command, dict(request.args)
        supervisor = str(args.pop("supervisor", "") or "")
        if command in READ_ONLY:
            self._ctl.reply(identity, control.reply_for(self.core.query(command, supervisor)))
        elif command == "status":
            self._ctl.reply(identity, control.reply_for(self.status()))
        elif command == "stop":
            self._ctl.reply(identity, control.reply_for({"stopping": True, "pid": os.getpid()}))
            self._stop(cold=bool(args.get("cold", False)))
        elif command == "reload":
            self._ctl.reply(identity, control.reply_for(self._reload("reload command")))
        elif command in CHILD_CALLS:
            self._call_ids += 1
            self._calls[self._call_ids] = identity
            self._feed(Call(self._call_ids, command, args, supervisor))
        else:
            self._ctl.reply(identity, Reply(False, None, f"unknown command {command!r}"))

    def status(self) -> dict[str, Any]:
        """{children: one row per child of every supervisor, stats: latest_stats(), rates: tasks/s
        over 10 s and 60 s, reload: {generation, running, last}, pid: the root's}."""
        return {"children": self.core.status(self.clock.monotonic()) if self.core else [],
                "stats": self.latest_stats(), "rates": self.rates.rates(),
                "reload": dict(self._reload_state), "pid": os.getpid()}

    # -- reload: the reloader plans, the loop carries it out one child-API call at a time ------------
    def _reload(self, origin: str) -> Any:
        """Start a reload; the answer for ``supervise reload`` (an ("error", line) when refused)."""
        from supervisor.reload import ReloadRefused, replace_specs, rollout

        if self.reloader is None:
            log.warning("reload (%s) ignored: this tree was started without a config", origin)
            return ("error", "this tree was started without a config to reload")
        if self._stop_requests or self.core.root.status != "running":
            log.warning("reload (%s) refused: the tree is %s", origin,
                        "stopping" if self._stop_requests else self.core.root.status)
            return ("error", f"the tree is {self.core.root.status}, not running: reload refused")
        if self._reload_job is not None:
            self._reload_pending = origin
            log.info("reload (%s): queued behind the one in progress", origin)
            return {"queued": True, "generation": self._reload_state["generation"]}
        try:
            plan = self.reloader.prepare()
        except ReloadRefused as exc:
            log.error("reload (%s) refused, the running config stays: %s", origin, exc)
            self._reload_state["last"] = {"ok": False, "error": str(exc)}
            return ("error", f"reload refused, the running config stays: {exc}")
        log.info("reload (%s): %s", origin, plan.describe())
        replace_specs(self.core, plan)
        self.reloader.commit(plan)
        generation = self._reload_state["generation"] + 1
        self._reload_state.update(generation=generation, running=True,
                                  last={"ok": True, "changed": list(plan.changed), "done": False})
        self.notifier.reloading(f"reloading: {plan.describe()}")
        self._reload_job = rollout(self.core, plan)
        self._reload_waiting = False
        self._pump_reload()
        return {"generation": generation, "changed": list(plan.changed),
                "restarting": sorted(plan.restart), "executors": plan.count}

    def _pump_reload(self) -> None:
        """Advance the reload: send its next call once the previous one was answered."""
        while self._reload_job is not None:
            value = None
            if self._reload_waiting:
                if not self._reload_replies:
                    return
                value = self._reload_replies.popleft()
            try:
                command, args, supervisor = self._reload_job.send(value)
            except StopIteration as done:
                self._reload_done(done.value or [])
                continue
            self._reload_waiting = True
            self._call_ids += 1
            self._internal.add(self._call_ids)
            self._feed(Call(self._call_ids, command, args, supervisor))

    def _reload_done(self, problems: list[str]) -> None:
        self._reload_job = None
        self._reload_waiting = False
        last = dict(self._reload_state["last"] or {}, done=True, problems=problems)
        self._reload_state.update(running=False, last=last)
        if problems:
            log.error("reload %d finished with problems: %s", self._reload_state["generation"],
                      "; ".join(problems))
        else:
            log.info("reload %d done", self._reload_state["generation"])
        if self.core.finished is None and self.core.root.status == "running":
            self.notifier.ready(self._status_line())
        if self._reload_pending:
            origin, self._reload_pending = self._reload_pending, ""
            self._reload(origin)


def _restore_mark(outer: str | None) -> None:
    if outer is None:
        os.environ.pop(TREE_VAR, None)
    else:
        os.environ[TREE_VAR] = outer
