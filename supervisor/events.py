"""What flows between the pure decision core and the process side.

Events go into ``TreeCore.handle(event, now)``; actions come out. A ``ref`` names one incarnation of
one child (a new ref on every start), so a late event about a dead incarnation can never be taken
for its successor -- the role a pid plays in OTP.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from supervisor.reasons import ExitReason
from supervisor.spec import Shutdown, WorkerStart


# -- events (process side -> core) ---------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Started:
    """The incarnation ``ref`` said Ready (for a child supervisor: finished its init)."""

    ref: int
    pid: int | None


@dataclass(frozen=True, slots=True)
class StartFailed:
    """The incarnation ``ref`` ended, or was killed, before it said Ready. It is gone."""

    ref: int
    reason: ExitReason


@dataclass(frozen=True, slots=True)
class Exited:
    """The started incarnation ``ref`` is gone (by itself, or after a TerminateWorker)."""

    ref: int
    reason: ExitReason


@dataclass(frozen=True, slots=True)
class Call:
    """A child-API call (start_child, terminate_child, restart_child, delete_child) addressed to the
    supervisor at ``supervisor`` (a path such as "root/executors", or just "executors").
    The answer comes back later as a Reply action with the same ``call_id``."""

    call_id: int
    command: str
    args: dict[str, Any]
    supervisor: str = ""


@dataclass(frozen=True, slots=True)
class Stop:
    """Shut the whole tree down (warm): children in reverse start order, each with its shutdown."""


@dataclass(frozen=True, slots=True)
class TryAgain:
    """Internal: retry the restart of a child left in the ``restarting`` state (OTP's
    ``try_again_restart`` self-cast: queued, so calls and shutdown get handled first)."""

    name: str
    ref: int  # the supervisor's own ref


# -- actions (core -> process side) --------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class StartWorker:
    """Start a worker process; answer with Started(ref, pid) once it said Ready, else StartFailed."""

    ref: int
    child_id: str
    path: str
    start: WorkerStart
    extra_args: tuple[Any, ...]


@dataclass(frozen=True, slots=True)
class TerminateWorker:
    """Stop the worker ``ref``: SIGTERM, wait ``shutdown`` seconds, SIGKILL its process group
    ("brutal_kill": SIGKILL at once; "infinity": never SIGKILL). Answer with Exited (or StartFailed
    when it had not said Ready yet)."""

    ref: int
    shutdown: Shutdown


@dataclass(frozen=True, slots=True)
class Reply:
    call_id: int
    result: Any


@dataclass(frozen=True, slots=True)
class Finished:
    """The root supervisor is gone: the process should exit with ``exit_code`` (0 clean stop or
    auto_shutdown, 1 gave up)."""

    exit_code: int
    reason: ExitReason


Event = Started | StartFailed | Exited | Call | Stop | TryAgain
Action = StartWorker | TerminateWorker | Reply | Finished
