"""No orphans: find and kill every process that belonged to a tree, grandchildren included.

Process groups and PR_SET_PDEATHSIG cover the direct children; a task's own children (a shell that
starts ``sleep``, a program that daemonises or calls setsid) escape both. What they cannot escape is
their environment: the root puts a marker in ``LEASETREE_TREE`` before it forks anything, and every
descendant inherits it. Two sweeps use it:

- the tree's guard (``supervisor/runner.py``): a small process forked by the root that waits on a
  pipe; when the root dies (``kill -9`` included) it kills the tracked process groups and then every
  process that carries the tree's marker;
- an executor at start kills what is left of its previous incarnation (``LEASETREE_CHILD``), so a
  task of a dead executor never runs on beside the task's next delivery.
"""

from __future__ import annotations

import os
import signal
import time

TREE_VAR = "LEASETREE_TREE"
CHILD_VAR = "LEASETREE_CHILD"
SWEEP_SECS = 5.0


def new_token() -> str:
    return f"{os.getpid()}-{os.urandom(6).hex()}"


def processes_with(variable: str, value: str | None = None, prefix: str | None = None) -> list[int]:
    """Live processes (not zombies, not this one) whose environment has ``variable`` equal to
    ``value``, or starting with ``prefix``. Processes we may not read are skipped."""
    me = os.getpid()
    exact = f"{variable}={value}".encode() if value is not None else None
    start = f"{variable}={prefix}".encode() if prefix is not None else None
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == me:
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as handle:
                environ = handle.read().split(b"\0")
            with open(f"/proc/{entry}/stat", "rb") as handle:
                state = handle.read().rsplit(b")", 1)[1].split()[0]
        except OSError:
            continue
        if state == b"Z":
            continue
        if (exact is not None and exact in environ) or (start is not None and any(
                item.startswith(start) for item in environ)):
            found.append(int(entry))
    return found


def kill_all(pids_of, deadline_secs: float = SWEEP_SECS) -> int:
    """SIGKILL what ``pids_of()`` returns until it returns nothing (a process may fork while we
    kill its parent) or the deadline passes; returns how many were killed."""
    killed = 0
    deadline = time.monotonic() + deadline_secs
    while time.monotonic() < deadline:
        pids = pids_of()
        if not pids:
            break
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
                killed += 1
            except (ProcessLookupError, PermissionError):
                pass
        time.sleep(0.01)  # give the kernel a moment to reap before looking again
    return killed


def sweep_predecessors(child_id: str, token: str | None) -> int:
    """Kill processes left by earlier incarnations of ``child_id`` in this tree (their marker names
    another pid), and mark this process so its own leftovers can be found later."""
    if not token:
        return 0
    mine = f"{token}/{child_id}/{os.getpid()}"
    os.environ[CHILD_VAR] = mine
    prefix = f"{token}/{child_id}/"
    return kill_all(lambda: [pid for pid in processes_with(CHILD_VAR, prefix=prefix)
                             if not _has(pid, CHILD_VAR, mine)], deadline_secs=2.0)


def _has(pid: int, variable: str, value: str) -> bool:
    try:
        with open(f"/proc/{pid}/environ", "rb") as handle:
            return f"{variable}={value}".encode() in handle.read().split(b"\0")
    except OSError:
        return False
