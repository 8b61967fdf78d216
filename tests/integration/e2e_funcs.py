"""Callable tasks for ``test_pipeline_e2e.py`` that also record *when* they ran (loaded by executors
through ``python_path``, next to ``task_funcs``).

Each appends one line ``task_id attempt pid start end payload`` to $LEASETREE_TEST_RECORD when it
returns or raises, so ``harness.records`` still counts runs, and a test can read the times too.
``start`` and ``end`` are ``time.monotonic()``: one clock for every process of the host.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any, NamedTuple


class Run(NamedTuple):
    task_id: str
    attempt: int
    pid: int
    start: float
    end: float
    payload: str


def _append(path: str, line: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line.encode())
    finally:
        os.close(fd)


def timed(task: Any) -> None:
    """``fail``: always raises; ``flaky:N``: raises until attempt N; ``sleep:S``: sleeps S seconds;
    anything else succeeds at once. The run is recorded with its start and end either way."""
    start = time.monotonic()
    kind, _, arg = task.payload.decode(errors="replace").partition(":")
    try:
        if kind == "fail":
            raise RuntimeError(f"failing on purpose (attempt {task.attempt})")
        if kind == "flaky" and task.attempt < int(arg):
            raise RuntimeError(f"flaky attempt {task.attempt}")
        if kind == "sleep":
            time.sleep(float(arg))
    finally:
        path = os.environ.get("LEASETREE_TEST_RECORD")
        if path:
            _append(path, f"{task.id} {task.attempt} {os.getpid()} {start:.6f} {time.monotonic():.6f} "
                          f"{task.payload.decode(errors='replace')}\n")


def long(task: Any) -> None:
    """A long task that says when it starts and when it ends: one line in $LEASETREE_TEST_RECORD
    as it starts, one in ``$LEASETREE_TEST_RECORD.done`` once its ``sleep:S`` is over, so a test
    can act while it is known to be running."""
    path = os.environ["LEASETREE_TEST_RECORD"]
    _append(path, f"{task.id} {task.attempt} {os.getpid()}\n")
    time.sleep(float(task.payload.decode().partition(":")[2]))
    _append(path + ".done", f"{task.id} {task.attempt} {os.getpid()}\n")


def runs(path: Path) -> list[Run]:
    """Every run ``timed`` recorded, in the order they ended."""
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        task_id, attempt, pid, start, end, payload = line.split(" ", 5)
        out.append(Run(task_id, int(attempt), int(pid), float(start), float(end), payload))
    return out


def max_concurrent(spans: list[Run]) -> int:
    """The most runs in progress at one moment."""
    events = sorted([(r.start, 1) for r in spans] + [(r.end, -1) for r in spans])
    now = best = 0
    for _, step in events:  # an end sorts before a start at the same instant
        now += step
        best = max(best, now)
    return best
