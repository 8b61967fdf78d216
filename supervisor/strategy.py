"""One supervisor as a deterministic state machine: events in, actions out, time an argument.

This is OTP's ``supervisor.erl`` without the blocking. Where OTP runs a group restart or a shutdown
as one synchronous function, here it is a *job*: a generator that yields ``("start", child)`` or
``("stop", children, parallel)`` requests and is resumed with their results when the matching
events arrive. While a job waits, other events queue in the mailbox (as they would in an Erlang
mailbox) -- except a stop request, which aborts the job at its next step, and read-only queries,
which ``TreeCore`` answers at once. Nothing here touches a process, a socket or a clock: the
``TreeCore`` it belongs to carries ``now`` and collects the actions.

Decision table (OTP ``do_restart/3``):

    exit reason          permanent   transient                      temporary
    normal / shutdown    restart     kept with no pid (dynamic: gone)  removed
    abnormal             restart     restart                        removed

A restart first adds ``now`` to the intensity window; more than ``intensity`` restarts within
``period`` seconds and the supervisor terminates its children in reverse order and exits with
reason ``shutdown`` (its parent decides what that means for it). A group restart counts once; a
failed start leaves the child ``restarting`` and queues a retry that counts again.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Generator
from typing import TYPE_CHECKING, Any

from supervisor import reasons
from supervisor.children_table import Child, ChildrenTable
from supervisor.events import (
    Call,
    Exited,
    Reply,
    Started,
    StartFailed,
    StartWorker,
    Stop,
    TerminateWorker,
    TryAgain,
)
from supervisor.intensity import add_restart, exceeded
from supervisor.reasons import ExitReason
from supervisor.spec import ChildSpec, SpecError, SupervisorStart, SupFlags, check_children

if TYPE_CHECKING:
    from supervisor.core import TreeCore

Job = Generator[tuple, Any, None]


class Init:
    """Internal event: start the children (sent once, by whoever created the supervisor)."""


class Supervisor:
    def __init__(self, core: TreeCore, ref: int, path: str, start: SupervisorStart,
                 parent_ref: int | None) -> None:
        self.core = core
        self.ref = ref
        self.path = path
        self.flags: SupFlags = start.flags
        self.parent_ref = parent_ref
        self.log = logging.getLogger(path.replace("/", "."))
        self.children = ChildrenTable()
        self.history: tuple[float, ...] = ()
        self.status = "init"  # init -> running -> stopping -> dead
        self._simple_spec: ChildSpec | None = None
        if self.flags.strategy == "simple_one_for_one":
            self._simple_spec = start.children[0]
            for extra in start.initial_extra_args:
                self._new_dynamic(extra)
        else:
            for spec in start.children:
                self.children.add(Child(spec, spec.id))
        self._mailbox: deque[Any] = deque()
        self._job: Job | None = None
        self._job_call: Call | None = None  # the call the current job will answer
        self._awaiting_start: int | None = None
        self._awaiting_stop: set[int] = set()
        self._stop_results: dict[str, ExitReason] = {}
        self._dead: dict[int, ExitReason] = {}  # refs that exited while a job was running
        self._stop_requested = False
        self._was_init = False
        self.last_exit: tuple[str, ExitReason] | None = None

    @property
    def simple(self) -> bool:
        return self._simple_spec is not None

    # -- events ----------------------------------------------------------------------------------
    def on_event(self, event: Any) -> None:
        if self.status == "dead":
            if isinstance(event, Call):
                self._reply(event, ("error", "shutting_down"))
            return
        if isinstance(event, (Started, StartFailed)) and event.ref == self._awaiting_start:
            self._awaiting_start = None
            child = self.children.by_ref(event.ref)
            if isinstance(event, Started):
                child.state, child.pid, child.since = "running", event.pid, self.core.now
                self._advance(None)
            else:
                self._cleared(child)
                self._advance(event.reason)
        elif isinstance(event, Exited) and event.ref in self._awaiting_stop:
            self._awaiting_stop.discard(event.ref)
            child = self.children.by_ref(event.ref)
            self._stop_results[child.name] = event.reason
            self._log_stopped(child, event.reason)
            self._cleared(child)
            if not self._awaiting_stop:
                self._advance(self._stop_results)
        elif isinstance(event, Stop):
            self._request_stop()
        elif isinstance(event, Call) and (self._stop_requested or self.status == "stopping"):
            self._reply(event, ("error", "shutting_down"))
        else:
            if isinstance(event, Exited):
                self._dead[event.ref] = event.reason
            self._mailbox.append(event)
        self._pump()

    def _pump(self) -> None:
        while self._job is None and self._mailbox and self.status not in ("dead", "stopping"):
            event = self._mailbox.popleft()
            if isinstance(event, Init):
                self._run(self._init_job())
            elif isinstance(event, Exited):
                self._on_child_exit(event)
            elif isinstance(event, TryAgain):
                child = self.children.get(event.name)
                if child is not None and child.state == "restarting":
                    self._restart(child)
            elif isinstance(event, Call):
                self._on_call(event)

    def _request_stop(self) -> None:
        if self._stop_requested or self.status in ("stopping", "dead"):
            return
        self._stop_requested = True
        if self._job is None:
            self._shut_down(reasons.shutdown("stopped"), 0)
        elif self._awaiting_start is not None:
            # Do not wait for a slow starter: stop it now; its start then fails with shutdown.
            child = self.children.by_ref(self._awaiting_start)
            self._terminate(child)

    # -- the job driver --------------------------------------------------------------------------
    def _run(self, job: Job, call: Call | None = None) -> None:
        self._job, self._job_call = job, call
        self._advance(None)

    def _advance(self, value: Any) -> None:
        while self._job is not None:
            if self._stop_requested and self.status != "stopping":
                self._abort_job()
                value = None
                continue
            try:
                request = self._job.send(value)
            except StopIteration:
                self._job = self._job_call = None
                return
            value, waiting = self._issue(request)
            if waiting:
                return

    def _abort_job(self) -> None:
        self._job.close()
        if self._job_call is not None:
            self._reply(self._job_call, ("error", "shutting_down"))
        self._job = self._job_call = None
        self._was_init = self.status == "init"
        self.status = "stopping"
        self._job = self._shutdown_job(reasons.shutdown("stopped"), 0)

    def _issue(self, request: tuple) -> tuple[Any, bool]:
        """Turn a job's request into actions; (result, False) when it completed at once."""
        if request[0] == "start":
            child = request[1]
            ref = self.core.new_ref(self)
            self.children.set_ref(child, ref)
            child.state = "starting"
            if child.spec.is_supervisor:
                self.core.spawn_supervisor(ref, f"{self.path}/{child.name}", child.spec.start, self.ref)
            else:
                self.core.emit(StartWorker(ref, child.name, f"{self.path}/{child.name}",
                                           child.spec.start, child.extra_args))
            self._awaiting_start = ref
            return None, True
        _, children, _parallel = request
        results: dict[str, ExitReason] = {}
        pending: set[int] = set()
        for child in children:
            if child.ref is None:
                continue
            if child.ref in self._dead:  # it exited on its own while we were busy
                results[child.name] = self._dead.pop(child.ref)
                self._log_stopped(child, results[child.name])  # its own reason, not the stop's
                self._cleared(child)
                continue
            pending.add(child.ref)
            self._terminate(child)
        if not pending:
            return results, False
        # Parallel stops (simple_one_for_one) send every TerminateWorker at once, so their
        # shutdown timers run together: one shared timer, as in OTP.
        self._awaiting_stop, self._stop_results = pending, results
        return None, True

    def _terminate(self, child: Child) -> None:
        child.state = "terminating"
        if child.spec.is_supervisor:
            self.core.post(child.ref, Stop())
        else:
            self.core.emit(TerminateWorker(child.ref, child.spec.shutdown))

    def _cleared(self, child: Child) -> None:
        self.core.disown(child.ref)
        self._dead.pop(child.ref, None)
        self.children.set_ref(child, None)
        child.pid, child.state, child.since = None, "undefined", None

    # -- jobs ------------------------------------------------------------------------------------
    def _init_job(self) -> Job:
        started: list[Child] = []
        for child in self.children.in_order():
            error = yield ("start", child)
            if error is not None:
                self.log.error("supervisor=%s child=%s reason=%s: failed_to_start_child",
                               self.path, child.name, error)
                for done in reversed(started):
                    if done.ref is not None:
                        yield ("stop", [done], False)
                self._exit(reasons.abnormal(f"child {child.name} {error}"), 1)
                return
            started.append(child)
        self.status = "running"
        self.core.post(self.parent_ref, Started(self.ref, self.core.os_pid))

    def _shut_down(self, reason: ExitReason, code: int) -> None:
        """Terminate every child (reverse start order; simple_one_for_one all at once), then exit."""
        self._was_init = self.status == "init"
        self.status = "stopping"
        self._run(self._shutdown_job(reason, code))

    def _shutdown_job(self, reason: ExitReason, code: int) -> Job:
        while self._mailbox:  # nothing queued will be served any more
            event = self._mailbox.popleft()
            if isinstance(event, Call):
                self._reply(event, ("error", "shutting_down"))
        alive = [c for c in reversed(self.children.in_order()) if c.alive]
        if self.simple and alive:
            yield ("stop", alive, True)
        else:
            for child in alive:
                if child.alive:
                    yield ("stop", [child], False)
        self._exit(reason, code)

    def _restart_one(self, child: Child) -> Job:
        error = yield ("start", child)
        if error is not None:
            self._restart_failed(child, error)

    def _restart_group(self, child: Child, group: list[Child]) -> Job:
        """one_for_all / rest_for_one: stop the others (reverse order), start the group in order;
        temporary bystanders are removed, not restarted."""
        for other in reversed(group):
            if other is not child and other.alive:
                yield ("stop", [other], False)
        for other in group:
            if other.spec.restart == "temporary" and other is not child:
                self._log_stopped(other, reasons.SHUTDOWN, removed=True)
                self.children.remove(other)
        for other in [c for c in group if c.name in self.children]:
            error = yield ("start", other)
            if error is not None:
                self._restart_failed(other, error)
                return

    def _restart_failed(self, child: Child, error: ExitReason) -> None:
        self.log.error("supervisor=%s child=%s reason=%s: restart failed, will try again",
                       self.path, child.name, error)
        child.state = "restarting"
        self.last_exit = (child.name, error)
        self._mailbox.append(TryAgain(child.name, self.ref))

    # -- decisions -------------------------------------------------------------------------------
    def _on_child_exit(self, event: Exited) -> None:
        child = self.children.by_ref(event.ref)
        self._dead.pop(event.ref, None)
        if child is None:
            return  # an incarnation we already stopped or replaced
        reason = event.reason
        self._cleared(child)
        self.last_exit = (child.name, reason)
        restart = child.spec.restart
        recycled = reason == reasons.RECYCLED
        if restart == "permanent" or (restart == "transient" and (reason.abnormal or recycled)):
            level = logging.ERROR if reason.abnormal else logging.INFO
            self.log.log(level, "supervisor=%s child=%s reason=%s: child_terminated, restarting",
                         self.path, child.name, reason)
            self._restart(child)
            return
        level = logging.ERROR if reason.abnormal else logging.INFO
        self.log.log(level, "supervisor=%s child=%s reason=%s: child_terminated, not restarted (%s)",
                     self.path, child.name, reason, restart)
        if restart == "temporary" or self.simple:
            self.children.remove(child)
        if child.spec.significant:
            self._auto_shutdown()

    def _restart(self, child: Child) -> None:
        if self.last_exit is None or self.last_exit[1] != reasons.RECYCLED:
            self.history = add_restart(self.history, self.core.now, self.flags.period)
        if exceeded(self.history, self.flags.intensity):
            self.log.error("supervisor=%s child=%s reason=%s: reached_max_restart_intensity "
                           "(%d restarts within %gs), shutting down", self.path, child.name,
                           self.last_exit[1] if self.last_exit else "?", len(self.history),
                           self.flags.period)
            self.core.note_give_up(self, child.name)
            self._shut_down(reasons.shutdown("reached_max_restart_intensity"), 1)
            return
        child.restarts += 1
        strategy = self.flags.strategy
        if strategy == "one_for_all":
            self._run(self._restart_group(child, self.children.in_order()))
        elif strategy == "rest_for_one":
            self._run(self._restart_group(child, self.children.from_child(child.name)))
        else:
            self._run(self._restart_one(child))

    def _auto_shutdown(self) -> None:
        mode = self.flags.auto_shutdown
        if mode == "never":
            return
        if mode == "all_significant" and any(c.spec.significant and c.alive for c in self.children):
            return
        self.log.info("supervisor=%s reason=auto_shutdown (%s): shutting down", self.path, mode)
        self._shut_down(reasons.shutdown("auto_shutdown"), 0)

    def _exit(self, reason: ExitReason, code: int) -> None:
        self.status = "dead"
        self.core.supervisor_exited(self, reason, code, during_init=self._was_init)

    # -- the child API (OTP return values) -------------------------------------------------------
    def _on_call(self, call: Call) -> None:
        handler = getattr(self, f"_api_{call.command}", None)
        if handler is None:
            self._reply(call, ("error", f"unknown command {call.command!r}"))
            return
        outcome = handler(call.args)
        if isinstance(outcome, Generator):
            self._run(self._answering(outcome, call), call)
        else:
            self._reply(call, outcome)

    def _answering(self, job: Job, call: Call) -> Job:
        result = yield from job
        self._reply(call, result)

    def _reply(self, call: Call, result: Any) -> None:
        self.core.emit(Reply(call.call_id, result))

    def _find(self, args: dict[str, Any]) -> tuple[Child | None, Any]:
        """The child named by ``args`` (``id``; for simple_one_for_one ``pid``), or an error."""
        if self.simple:
            if "pid" not in args:
                return None, ("error", "simple_one_for_one")
            child = self.children.by_pid(args["pid"])
            return child, None if child else ("error", "not_found")
        child = self.children.get(args.get("id", ""))
        return child, None if child else ("error", "not_found")

    def _api_start_child(self, args: dict[str, Any]) -> Any:
        if self.simple:
            child = self._new_dynamic(tuple(args.get("args", ())))
        else:
            try:
                spec = args["spec"] if isinstance(args.get("spec"), ChildSpec) else \
                    ChildSpec.from_dict(args.get("spec") or {})
                check_children(self.flags, (spec,))
            except (SpecError, TypeError) as exc:
                return ("error", f"invalid child spec: {exc}")
            existing = self.children.get(spec.id)
            if existing is not None:
                if existing.alive:
                    return ("error", ["already_started", existing.pid])
                return ("error", "already_present")
            child = self.children.add(Child(spec, spec.id))
        return self._start_new(child)

    def _start_new(self, child: Child) -> Job:
        error = yield ("start", child)
        if error is not None:
            self.children.remove(child)
            return ("error", str(error))
        return ("ok", child.pid)

    def _api_terminate_child(self, args: dict[str, Any]) -> Any:
        child, error = self._find(args)
        if error is not None:
            return error
        return self._terminate_job(child)

    def _terminate_job(self, child: Child) -> Job:
        if child.alive:
            yield ("stop", [child], False)
        child.state = "undefined"  # also ends a pending retry of a restarting child
        if child.spec.restart == "temporary" or self.simple:
            self.children.remove(child)
        return "ok"

    def _api_restart_child(self, args: dict[str, Any]) -> Any:
        if self.simple:
            return ("error", "simple_one_for_one")
        child, error = self._find(args)
        if error is not None:
            return error
        if child.state == "restarting":
            return ("error", "restarting")
        if child.alive:
            return ("error", "running")
        return self._restart_by_call(child)

    def _restart_by_call(self, child: Child) -> Job:
        error = yield ("start", child)
        return ("error", str(error)) if error is not None else ("ok", child.pid)

    def _api_delete_child(self, args: dict[str, Any]) -> Any:
        if self.simple:
            return ("error", "simple_one_for_one")
        child, error = self._find(args)
        if error is not None:
            return error
        if child.state == "restarting":
            return ("error", "restarting")
        if child.alive:
            return ("error", "running")
        self.children.remove(child)
        return "ok"

    def _new_dynamic(self, extra_args: tuple[Any, ...]) -> Child:
        spec = self._simple_spec
        return self.children.add(Child(spec, self.children.free_name(spec.id), tuple(extra_args)))

    # -- queries (answered at once, even while a job runs) ---------------------------------------
    def which_children(self) -> list[dict[str, Any]]:
        """Newest first, as OTP: id, pid (None when not running), state, type."""
        return [{"id": c.name, "pid": c.pid, "state": c.state, "type": c.spec.type}
                for c in reversed(self.children.in_order())]

    def count_children(self) -> dict[str, int]:
        """specs / active / supervisors / workers; a ``restarting`` child is not active."""
        kids = self.children.in_order()
        active = sum(1 for c in kids if c.state in ("running", "terminating"))
        if self.simple:
            kind = self._simple_spec.type
            return {"specs": 1, "active": active, "supervisors": len(kids) if kind == "supervisor" else 0,
                    "workers": len(kids) if kind == "worker" else 0}
        return {"specs": len(kids), "active": active,
                "supervisors": sum(1 for c in kids if c.spec.is_supervisor),
                "workers": sum(1 for c in kids if not c.spec.is_supervisor)}

    def _log_stopped(self, child: Child, reason: ExitReason, removed: bool = False) -> None:
        level = logging.INFO if not reason.abnormal else logging.WARNING
        self.log.log(level, "supervisor=%s child=%s reason=%s: %s", self.path, child.name, reason,
                     "temporary bystander removed" if removed else "stopped")
