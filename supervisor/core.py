"""The whole tree's decisions: every supervisor's state machine, routed by ref. Pure.

``TreeCore.handle(event, now) -> [actions]`` is the only entry point for changes; it never touches a
process, a socket or a clock, so the unit tests drive it with plain events and a fake ``now``.
Child supervisors live here too (they are state machines, not processes): starting one creates a
``Supervisor``; its exit is reported to its parent as an ``Exited(ref, shutdown)`` like any child's.
Only worker starts and stops leave the core, as ``StartWorker`` / ``TerminateWorker`` actions.
"""

from __future__ import annotations

import logging
from collections import deque
from typing import Any

from supervisor.events import (
    Action,
    Call,
    Event,
    Exited,
    Finished,
    Reply,
    Started,
    StartFailed,
    Stop,
    TryAgain,
)
from supervisor.reasons import ExitReason
from supervisor.spec import ChildSpec, SupervisorStart, SupFlags
from supervisor.strategy import Init, Supervisor

READ_ONLY = ("which_children", "count_children")


class TreeCore:
    """The root supervisor named ``name`` and everything below it.

    ``os_pid`` is shown as the pid of supervisor children (they run inside the root process).
    """

    def __init__(self, flags: SupFlags, children: list[ChildSpec] | tuple[ChildSpec, ...],
                 name: str = "root", os_pid: int = 0,
                 initial_extra_args: tuple[tuple[Any, ...], ...] = ()) -> None:
        self.now = 0.0
        self.os_pid = os_pid
        self.finished: Finished | None = None
        self.give_up: tuple[Supervisor, str] | None = None
        self._next_ref = 1
        self._owners: dict[int, Supervisor] = {}  # child incarnation ref -> its supervisor
        self._sups: dict[int, Supervisor] = {}  # a supervisor's own ref -> the supervisor
        self._queue: deque[tuple[int, Any]] = deque()
        self._actions: list[Action] = []
        self.root = Supervisor(self, 0, name, SupervisorStart(flags, tuple(children), initial_extra_args),
                               None)
        self._sups[0] = self.root
        self.log = logging.getLogger(name)

    # -- entry points ----------------------------------------------------------------------------
    def start(self, now: float) -> list[Action]:
        """Start the tree: children in order, synchronously (each once the previous said Ready)."""
        self.post(0, Init())
        return self._drain(now)

    def handle(self, event: Event, now: float) -> list[Action]:
        """Apply one event; the actions to carry out, in order."""
        if isinstance(event, (Started, StartFailed, Exited)):
            owner = self._owners.get(event.ref)
            if owner is not None:
                self._queue.append((owner.ref, event))
        elif isinstance(event, Call):
            sup = self.find(event.supervisor)
            if sup is None:
                self.emit(Reply(event.call_id, ("error", f"no supervisor {event.supervisor!r}")))
            else:
                self._queue.append((sup.ref, event))
        elif isinstance(event, (Stop, TryAgain)):
            self._queue.append((getattr(event, "ref", 0), event))
        return self._drain(now)

    def _drain(self, now: float) -> list[Action]:
        self.now = now
        while self._queue:
            ref, event = self._queue.popleft()
            sup = self._sups.get(ref)
            if sup is not None:
                sup.on_event(event)
        actions, self._actions = self._actions, []
        return actions

    # -- queries ---------------------------------------------------------------------------------
    def find(self, path: str) -> Supervisor | None:
        """The supervisor at ``path``: "" or the root's name for the root, else "executors" or
        "root/executors"."""
        if path in ("", self.root.path):
            return self.root
        full = path if path.startswith(self.root.path + "/") else f"{self.root.path}/{path}"
        return next((s for s in self._sups.values() if s.path == full and s.status != "dead"), None)

    def query(self, command: str, supervisor: str = "") -> Any:
        """which_children / count_children of one supervisor, answered at once."""
        sup = self.find(supervisor)
        if sup is None:
            return ("error", f"no supervisor {supervisor!r}")
        return getattr(sup, command)()

    def status(self, now: float) -> list[dict[str, Any]]:
        """Every child of every supervisor, depth first in start order: path, id, pid, state,
        type, restarts, uptime (seconds, None when not running)."""
        rows: list[dict[str, Any]] = []
        self._rows(self.root, now, rows)
        return rows

    def _rows(self, sup: Supervisor, now: float, rows: list[dict[str, Any]]) -> None:
        for child in sup.children.in_order():
            rows.append({"id": child.name, "path": f"{sup.path}/{child.name}", "pid": child.pid,
                         "state": child.state, "type": child.spec.type, "restarts": child.restarts,
                         "uptime": round(now - child.since, 3) if child.since is not None else None})
            if child.spec.is_supervisor and child.ref in self._sups:
                self._rows(self._sups[child.ref], now, rows)

    # -- used by the supervisors -----------------------------------------------------------------
    def new_ref(self, owner: Supervisor) -> int:
        ref = self._next_ref
        self._next_ref += 1
        self._owners[ref] = owner
        return ref

    def disown(self, ref: int | None) -> None:
        if ref is not None:
            self._owners.pop(ref, None)

    def emit(self, action: Action) -> None:
        self._actions.append(action)

    def post(self, sup_ref: int | None, event: Any) -> None:
        """Queue ``event`` for the supervisor whose own ref is ``sup_ref`` (None: the root's
        parent, i.e. this core)."""
        if sup_ref is None:
            if isinstance(event, Started):
                self.log.info("supervisor=%s started", self.root.path)
            return
        self._queue.append((sup_ref, event))

    def spawn_supervisor(self, ref: int, path: str, start: SupervisorStart, parent_ref: int) -> None:
        self._sups[ref] = Supervisor(self, ref, path, start, parent_ref)
        self.post(ref, Init())

    def note_give_up(self, sup: Supervisor, child_name: str) -> None:
        self.give_up = (sup, child_name)

    def supervisor_exited(self, sup: Supervisor, reason: ExitReason, code: int, during_init: bool) -> None:
        del self._sups[sup.ref]
        if sup.parent_ref is not None:
            self.post(sup.parent_ref, (StartFailed if during_init else Exited)(sup.ref, reason))
            return
        if code != 0 and self.give_up is not None and self.give_up[0] is sup:
            name = self.give_up[1]
            last = sup.last_exit[1] if sup.last_exit else "?"
            self.log.error("supervisor=%s child=%s reason=reached_max_restart_intensity: gave up: "
                           "restarted %d times within %gs (intensity %d), last exit: %s",
                           sup.path, name, len(sup.history), sup.flags.period, sup.flags.intensity,
                           last)
        elif code != 0:
            # A failed start at init: the child's name is in the reason ("child x failed to
            # start: ..."); the strategy's failed_to_start_child line names it as child= too.
            name = sup.last_exit[0] if sup.last_exit else "-"
            self.log.error("supervisor=%s child=%s reason=%s: gave up", sup.path, name, reason)
        else:
            self.log.info("supervisor=%s reason=%s: stopped", sup.path, reason)
        self.finished = Finished(code, reason)
        self.emit(self.finished)
