"""The process side: worker processes, their signals, their ends. The only importer of multiprocess.

``ProcessRunner`` carries out ``StartWorker`` / ``TerminateWorker`` and turns what it sees into the
core's events: Ready -> ``Started``; an exit (a pidfd polled in the tree's zmq.Poller, so exits are
seen at once with no sleep loop) -> ``Exited``, or ``StartFailed`` when the process had not said
Ready. It owns the timers: start timeout, shutdown timeout (then SIGKILL of the whole process
group), heartbeat timeout (SIGKILL; the exit reads "heartbeat timeout").

The guard that kills the tree's process groups when the root dies is in supervisor/guard.py.
"""

from __future__ import annotations

import logging
import os
import signal
from dataclasses import dataclass, field
from typing import Any

import multiprocess

from supervisor import reasons
from supervisor.child import child_main
from supervisor.events import Exited, Started, StartFailed, StartWorker
from supervisor.guard import GroupGuard
from supervisor.heartbeat import Liveness, StatsBook
from supervisor.reasons import ExitReason
from supervisor.spec import Shutdown

log = logging.getLogger("supervisor.runner")


@dataclass(slots=True)
class Proc:
    ref: int
    child_id: str
    path: str
    process: Any
    pid: int
    fd: int  # pidfd: readable once the process has exited
    state: str = "starting"  # starting -> running -> stopping
    deadline: float | None = None  # start timeout, or when to SIGKILL a stopping process
    stop_asked: bool = False  # we sent the stop (so death by signal means shutdown)
    abort: bool = False  # terminated before it said Ready: report StartFailed
    killed_for: ExitReason | None = None  # why we SIGKILLed it on our own initiative
    extra: dict[str, Any] = field(default_factory=dict)


class ProcessRunner:
    def __init__(self, runtime_dir: str, sup_endpoint: str, heartbeat_secs: float,
                 heartbeat_timeout_secs: float, start_timeout_secs: float,
                 guard: GroupGuard | None) -> None:
        self.runtime_dir = str(runtime_dir)
        self.sup_endpoint = sup_endpoint
        self.heartbeat_secs = heartbeat_secs
        self.start_timeout = start_timeout_secs
        self.guard = guard
        self.liveness = Liveness(heartbeat_timeout_secs)
        self.stats = StatsBook()
        self.cold = False
        self.procs: dict[int, Proc] = {}
        self.by_fd: dict[int, Proc] = {}
        self.by_pid: dict[int, Proc] = {}
        self._mp = multiprocess.get_context("fork")
        self._root_pid = os.getpid()

    # -- actions ---------------------------------------------------------------------------------
    def start(self, action: StartWorker, now: float) -> Proc:
        """Fork the worker (raises OSError when the OS refuses)."""
        process = self._mp.Process(
            target=child_main, name=action.path, daemon=False,
            args=(action.child_id, action.path, self.runtime_dir, self.heartbeat_secs,
                  self.sup_endpoint, self.guard.fd if self.guard else None, self._root_pid,
                  action.start, action.extra_args))
        process.start()
        pid = process.pid
        try:
            os.setpgid(pid, pid)  # also done by the child: whoever runs first closes the race
        except OSError:
            pass
        if self.guard is not None:
            self.guard.track(pid)
        proc = Proc(action.ref, action.child_id, action.path, process, pid, os.pidfd_open(pid),
                    deadline=now + self.start_timeout)
        self.procs[proc.ref] = self.by_fd[proc.fd] = self.by_pid[pid] = proc
        return proc

    def terminate(self, ref: int, shutdown: Shutdown, now: float) -> None:
        proc = self.procs.get(ref)
        if proc is None or proc.stop_asked:
            return
        if proc.state == "starting":
            proc.abort = True
        proc.state, proc.stop_asked = "stopping", True
        self.liveness.forget(ref)
        if shutdown == "brutal_kill":
            self._kill_group(proc)
            proc.deadline = None
            return
        self._signal(proc, signal.SIGTERM)
        if self.cold:
            self._signal(proc, signal.SIGINT)  # a second signal: the child sees stop_requested == 2
        proc.deadline = None if shutdown == "infinity" else now + float(shutdown)

    def go_cold(self) -> None:
        """A second stop request: every child being stopped gets one more signal (SIGINT, a
        different number from the first SIGTERM so the two are never merged into one)."""
        self.cold = True
        for proc in self.procs.values():
            if proc.state == "stopping" and proc.stop_asked:
                self._signal(proc, signal.SIGINT)

    # -- what happened ---------------------------------------------------------------------------
    def on_message(self, message: Any, now: float) -> Started | None:
        """A Ready or Heartbeat from a child; Started when a starting child said Ready."""
        name = type(message).__name__
        proc = self.by_pid.get(message.pid)
        if name == "Heartbeat":
            self.stats.update(message.child_id, message.pid, message.stats)
            if proc is not None and proc.state == "running":
                self.liveness.beat(proc.ref, now)
            return None
        if name == "Ready" and proc is not None and proc.state == "starting":
            proc.state, proc.deadline = "running", None
            self.liveness.beat(proc.ref, now)
            return Started(proc.ref, proc.pid)
        return None

    def on_exit(self, fd: int, now: float) -> Exited | StartFailed | None:
        """The process behind pidfd ``fd`` is gone: reap it, kill what is left of its group."""
        proc = self.by_fd.pop(fd, None)
        if proc is None:
            return None
        # Kill what is left of its group before reaping: the zombie keeps the pid (= pgid) from
        # being reused, so the killpg cannot hit a stranger.
        self._kill_group(proc)
        proc.process.join()  # the pidfd said it exited: this does not block
        os.close(proc.fd)
        if self.guard is not None:
            self.guard.untrack(proc.pid)
        del self.procs[proc.ref]
        del self.by_pid[proc.pid]
        self.liveness.forget(proc.ref)
        self.stats.ended(proc.child_id, proc.pid)
        exitcode = proc.process.exitcode
        reason = proc.killed_for or reasons.from_exitcode(exitcode, stopped_by_us=proc.stop_asked)
        if proc.state == "starting" or proc.abort:
            if proc.abort and not reason.abnormal:
                return StartFailed(proc.ref, reason)
            detail = reason.detail if proc.killed_for else f"failed to start: {reason}"
            return StartFailed(proc.ref, reasons.abnormal(detail))
        return Exited(proc.ref, reason)

    def on_timers(self, now: float) -> None:
        """Kill what overstayed: starts past the start timeout, stops past their shutdown,
        children silent past the heartbeat timeout. Their exits arrive through their fds."""
        for proc in list(self.procs.values()):
            if proc.deadline is None or now < proc.deadline:
                continue
            proc.deadline = None
            if proc.state == "starting":
                log.error("supervisor=%s child=%s pid=%d reason=no Ready within %gs: killing it",
                          proc.path.rpartition("/")[0], proc.child_id, proc.pid, self.start_timeout)
                proc.killed_for = reasons.abnormal(
                    f"failed to start: no Ready within {self.start_timeout:g}s")
            else:
                log.warning("supervisor=%s child=%s pid=%d reason=shutdown timeout: killing its "
                            "process group", proc.path.rpartition("/")[0], proc.child_id, proc.pid)
            self._kill_group(proc)
        for ref in self.liveness.expired(now):
            proc = self.procs[ref]
            log.error("supervisor=%s child=%s pid=%d reason=heartbeat timeout (%gs): killing it",
                      proc.path.rpartition("/")[0], proc.child_id, proc.pid, self.liveness.timeout)
            proc.killed_for = reasons.abnormal("heartbeat timeout")
            self._kill_group(proc)

    def next_deadline(self) -> float | None:
        times = [p.deadline for p in self.procs.values() if p.deadline is not None]
        beat = self.liveness.next_deadline()
        if beat is not None:
            times.append(beat)
        return min(times) if times else None

    def kill_all(self) -> None:
        """On the way out: SIGKILL every child's process group and reap them."""
        for proc in list(self.procs.values()):
            self._kill_group(proc)
        for proc in list(self.procs.values()):
            proc.process.join(timeout=5.0)
            if self.guard is not None:
                self.guard.untrack(proc.pid)
            os.close(proc.fd)
        self.procs.clear()
        self.by_fd.clear()
        self.by_pid.clear()

    # -- signals -----------------------------------------------------------------------------------
    @staticmethod
    def _signal(proc: Proc, signum: int) -> None:
        try:
            os.kill(proc.pid, signum)
        except ProcessLookupError:
            pass

    @staticmethod
    def _kill_group(proc: Proc) -> None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        except PermissionError:  # not (yet) a group of its own: kill the process at least
            ProcessRunner._signal(proc, signal.SIGKILL)
