"""The root: one loop that turns signals, socket messages, process exits and timers into events for
the pure ``TreeCore`` and carries out the actions it returns.

One ``zmq.Poller`` watches everything: the supervision ROUTER (Ready, Heartbeat), the control
ROUTER, the signal wake-up pipe and one pidfd per worker -- so an exit is seen the moment it happens
and an idle tree sleeps in ``poll`` until the next timer (no polling loop). Signal handlers only
record; the loop acts: SIGTERM/SIGINT take the same path as the ``stop`` command (the first warm,
a second cold), SIGHUP sets ``reload_requested``.
"""

from __future__ import annotations

import logging
import math
import os
import signal
from pathlib import Path
from typing import Any

import zmq

from children.protocol import Heartbeat, ProtocolError, Ready, Reply, Request, decode
from supervisor import control, events
from supervisor.clock import Clock, SystemClock
from supervisor.core import READ_ONLY, TreeCore
from supervisor.events import Call, Finished, StartFailed, StartWorker, Stop, TerminateWorker
from supervisor.reasons import abnormal
from supervisor.runner import GroupGuard, ProcessRunner
from supervisor.spec import ChildSpec, SupervisorStart, SupFlags

log = logging.getLogger("supervisor.tree")

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
                 start_timeout_secs: float = 60.0, clock: Clock | None = None) -> None:
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

    # -- public ------------------------------------------------------------------------------------
    def latest_stats(self) -> dict[str, dict[str, Any]]:
        """child id -> its stats: ``*_total`` counters summed over its incarnations, gauges latest."""
        return self._runner.stats.snapshot() if self._runner else {}

    def run(self) -> int:
        if control.is_listening(self.runtime_dir):
            raise TreeAlreadyRunning(f"a tree is already running in {self.runtime_dir}")
        guard = GroupGuard()  # first: before any thread exists (zmq's), fork is cheapest and safe
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
        try:
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
            guard.close()
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
        return self.core.finished.exit_code

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
            else:
                log.info("%s: stop requested", signal.Signals(signum).name)
                self._stop(cold=False)

    def _stop(self, cold: bool) -> None:
        """The first request is a warm stop; a second one (or ``cold``) makes it cold."""
        self._stop_requests += 1
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
        elif command in CHILD_CALLS:
            self._call_ids += 1
            self._calls[self._call_ids] = identity
            self._feed(Call(self._call_ids, command, args, supervisor))
        else:
            self._ctl.reply(identity, Reply(False, None, f"unknown command {command!r}"))

    def status(self) -> dict[str, Any]:
        """{children: one row per child of every supervisor, stats: latest_stats()}."""
        return {"children": self.core.status(self.clock.monotonic()) if self.core else [],
                "stats": self.latest_stats()}
