"""Exit reasons: how an OS process's end maps onto OTP's ``normal`` / ``shutdown`` / crash.

The mapping (docs/supervision.md has the table):

- exit code 0 -> ``normal``;
- exit code ``EXIT_SHUTDOWN`` (64) -> ``shutdown``: a child that decides to stop itself for good
  reason, like OTP's ``exit(shutdown)``; a transient child is then not restarted;
- ended by the supervisor's own stop (the SIGTERM it sent, the SIGKILL after the shutdown timeout,
  brutal_kill), or exit 0 / 64 after that SIGTERM -> ``shutdown``;
- anything else -> abnormal, with a readable detail: ``exit 3``, ``killed by SIGSEGV``,
  ``heartbeat timeout``, ``failed to start: ...``.

Only ``supervisor.strategy`` decides what a reason means for a restart; this module only names them.
"""

from __future__ import annotations

import signal
from dataclasses import dataclass
from typing import Literal

EXIT_SHUTDOWN = 64
"""Exit code a child uses to say "I stopped on purpose" (OTP ``shutdown``); 64 is EX_USAGE's
neighbourhood in sysexits and is used by nothing in this project."""

EXIT_RECYCLE = 66
"""Exit code of a worker that retires on purpose to be replaced (an executor after
``max_tasks_per_child`` or ``max_memory_mb``). Its replacement does not count against the restart
intensity: a recycle is maintenance, not a crash, and a busy pool recycles often (Celery does not
count these either). A deviation from OTP, documented in docs/supervision.md."""

Kind = Literal["normal", "shutdown", "abnormal"]


@dataclass(frozen=True, slots=True)
class ExitReason:
    """Why a child (process or child supervisor) ended.

    ``kind`` is what the restart decision reads; ``detail`` is for people (logs, status).
    """

    kind: Kind
    detail: str = ""

    @property
    def abnormal(self) -> bool:
        return self.kind == "abnormal"

    def __str__(self) -> str:
        if self.kind == "abnormal":
            return self.detail or "abnormal"
        return f"{self.kind} ({self.detail})" if self.detail else self.kind


NORMAL = ExitReason("normal")
RECYCLED = ExitReason("normal", "recycled")
SHUTDOWN = ExitReason("shutdown")


def shutdown(detail: str = "") -> ExitReason:
    return ExitReason("shutdown", detail)


def abnormal(detail: str) -> ExitReason:
    return ExitReason("abnormal", detail)


def signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


def from_exitcode(exitcode: int, stopped_by_us: bool = False) -> ExitReason:
    """The reason for a process that ended with ``exitcode`` (multiprocessing style: ``-N`` means
    killed by signal N).

    ``stopped_by_us``: the supervisor had asked it to stop (SIGTERM or SIGKILL of a shutdown).
    """
    if stopped_by_us and (exitcode < 0 or exitcode in (0, EXIT_SHUTDOWN)):
        return SHUTDOWN
    if exitcode == 0:
        return NORMAL
    if exitcode == EXIT_RECYCLE:
        return RECYCLED
    if exitcode == EXIT_SHUTDOWN:
        return SHUTDOWN
    if exitcode < 0:
        return abnormal(f"killed by {signal_name(-exitcode)}")
    return abnormal(f"exit {exitcode}")
