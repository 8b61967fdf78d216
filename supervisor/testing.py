"""Test doubles for the tree: a fake clock and a fake process side for ``TreeCore``.

``FakeProcesses`` plays the runner: it answers every ``StartWorker`` with ``Started`` (or
``StartFailed`` when told to) and every ``TerminateWorker`` with ``Exited(shutdown)``, at once and in
order, so a unit test reads like a script: start, crash a child, look at the children, assert.
Set ``hold_stops`` / ``hold_starts`` to leave terminations / starts pending and complete them with
``finish_stop`` / ``finish_start``.
"""

from __future__ import annotations

from collections import deque
from typing import Any

from supervisor import reasons
from supervisor.core import TreeCore
from supervisor.events import (
    Call,
    Exited,
    Finished,
    Reply,
    Started,
    StartFailed,
    StartWorker,
    Stop,
    TerminateWorker,
)
from supervisor.reasons import ExitReason


class FakeClock:
    def __init__(self, start: float = 1000.0) -> None:
        self.now = start

    def monotonic(self) -> float:
        return self.now

    def advance(self, seconds: float) -> float:
        self.now += seconds
        return self.now


class FakeProcesses:
    def __init__(self, core: TreeCore, clock: FakeClock | None = None) -> None:
        self.core = core
        self.clock = clock or FakeClock()
        self.next_pid = 100
        self.running: dict[str, tuple[int, int]] = {}  # path -> (ref, pid)
        self.paths: dict[int, str] = {}  # ref -> path
        self.fail_starts: dict[str, int | None] = {}  # child id -> failures left (None: forever)
        self.fail_reason = reasons.abnormal("failed to start: exit 1")
        self.history: list[tuple[str, str]] = []  # ("start" | "stop" | "start_failed", path)
        self.hold_stops = False
        self.pending_stops: list[int] = []
        self.hold_starts = False
        self.pending_starts: list[StartWorker] = []
        self.replies: dict[int, Any] = {}
        self.finished: Finished | None = None
        self.stop_reasons: dict[str, ExitReason] = {}  # path -> reason to report when terminated
        self._call_ids = 0

    # -- driving ---------------------------------------------------------------------------------
    def start(self) -> None:
        self._apply(self.core.start(self.clock.now))

    def send(self, event: Any) -> None:
        self._apply(self.core.handle(event, self.clock.now))

    def exit(self, child: str, reason: ExitReason) -> int:
        """The running child ``child`` (id or path) exits by itself with ``reason``; its old pid."""
        path = self.path_of(child)
        ref, pid = self.running.pop(path)
        self.history.append(("exit", path))
        self.send(Exited(ref, reason))
        return pid

    def crash(self, child: str, detail: str = "exit 1") -> int:
        return self.exit(child, reasons.abnormal(detail))

    def stop(self) -> None:
        self.send(Stop())

    def call(self, command: str, supervisor: str = "", **args: Any) -> Any:
        """A child-API call; its reply (None while the job that answers it is still waiting)."""
        self._call_ids += 1
        self.send(Call(self._call_ids, command, args, supervisor))
        return self.replies.get(self._call_ids)

    def finish_start(self, ok: bool = True) -> None:
        """Complete the oldest held start: Ready, or a failure with ``fail_reason``."""
        action = self.pending_starts.pop(0)
        if not ok:
            self.history.append(("start_failed", action.path))
            self._apply(self.core.handle(StartFailed(action.ref, self.fail_reason), self.clock.now))
            return
        self._apply(self._ready(action))

    def finish_stop(self, child: str | None = None) -> None:
        """Complete a held termination (the oldest, or the one of ``child``)."""
        ref = self.pending_stops[0] if child is None else self.running[self.path_of(child)][0]
        self.pending_stops.remove(ref)
        self._stopped(ref)

    # -- looking -------------------------------------------------------------------------------
    def pid(self, child: str) -> int | None:
        """The pid of ``child`` (id or path), None when it is not running."""
        try:
            entry = self.running.get(self.path_of(child))
        except KeyError:
            return None
        return entry[1] if entry else None

    def path_of(self, child: str) -> str:
        if child in self.running or "/" in child:
            return child
        matches = [p for p in self.running if p.rsplit("/", 1)[-1] == child]
        if len(matches) != 1:
            raise KeyError(f"{child!r} names {len(matches)} running children")
        return matches[0]

    def started(self) -> list[str]:
        return [p.rsplit("/", 1)[-1] for kind, p in self.history if kind == "start"]

    def stopped(self) -> list[str]:
        return [p.rsplit("/", 1)[-1] for kind, p in self.history if kind == "stop"]

    def clear_history(self) -> None:
        self.history.clear()

    # -- playing the process side --------------------------------------------------------------
    def _apply(self, actions: list[Any]) -> None:
        todo = deque(actions)
        while todo:
            action = todo.popleft()
            if isinstance(action, StartWorker):
                if self.hold_starts:
                    self.pending_starts.append(action)
                else:
                    todo.extend(self._start(action))
            elif isinstance(action, TerminateWorker):
                if self.hold_stops:
                    self.pending_stops.append(action.ref)
                else:
                    todo.extend(self._stop_actions(action.ref))
            elif isinstance(action, Reply):
                self.replies[action.call_id] = action.result
            elif isinstance(action, Finished):
                self.finished = action

    def _start(self, action: StartWorker) -> list[Any]:
        left = self.fail_starts.get(action.child_id, 0)
        if left is None or left > 0:
            if left is not None:
                self.fail_starts[action.child_id] = left - 1
            self.history.append(("start_failed", action.path))
            return self.core.handle(StartFailed(action.ref, self.fail_reason), self.clock.now)
        return self._ready(action)

    def _ready(self, action: StartWorker) -> list[Any]:
        self.next_pid += 1
        self.running[action.path] = (action.ref, self.next_pid)
        self.paths[action.ref] = action.path
        self.history.append(("start", action.path))
        return self.core.handle(Started(action.ref, self.next_pid), self.clock.now)

    def _stop_actions(self, ref: int) -> list[Any]:
        path = self.paths.get(ref)
        if path is None or path not in self.running or self.running[path][0] != ref:
            return []
        del self.running[path]
        self.history.append(("stop", path))
        reason = self.stop_reasons.get(path, reasons.SHUTDOWN)
        return self.core.handle(Exited(ref, reason), self.clock.now)

    def _stopped(self, ref: int) -> None:
        self._apply(self._stop_actions(ref))
