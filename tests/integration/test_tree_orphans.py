"""No orphans, ever: after ``kill -9`` of the root, everything that was in the tree is gone within
5 s -- workers (PR_SET_PDEATHSIG), the shell a worker started and the ``sleep`` that shell started
(the group guard kills the workers' process groups and the groups they reported)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from supervisor import control
from tests.integration.workers import pid_alive, wait_until

ROOT = Path(__file__).resolve().parents[2]


def children_of(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(p) for p in f.read().split()]
    except FileNotFoundError:
        return []


def descendants(pid: int) -> set[int]:
    out: set[int] = set()
    todo = [pid]
    while todo:
        for child in children_of(todo.pop()):
            if child not in out:
                out.add(child)
                todo.append(child)
    return out


@pytest.fixture
def rundir():
    path = Path(tempfile.mkdtemp(prefix="lt-"))
    os.chmod(path, 0o700)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def survivors(pids: set[int]) -> list[str]:
    """The pids still alive, each with its command line (for the failure message)."""
    out = []
    for pid in sorted(p for p in pids if pid_alive(p)):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue  # gone meanwhile
        out.append(f"{pid} {cmd[:80]}")
    return out


def start_root(rundir: Path) -> tuple[subprocess.Popen, set[int]]:
    pidfile = rundir / "sleeper.pids"
    root = subprocess.Popen([sys.executable, "-m", "tests.integration.workers", str(rundir), str(pidfile)],
                            cwd=ROOT, stderr=subprocess.DEVNULL)
    wait_until(lambda: control.is_listening(rundir), 15, what="the control socket")
    wait_until(lambda: all(r["state"] == "running" for r in control.call(rundir, "status")["children"])
               and pidfile.exists() and Path(str(pidfile) + ".tracked").exists(), 15, what="tree up")
    everything = descendants(root.pid)
    for name in (pidfile, Path(str(pidfile) + ".tracked")):
        everything |= {int(p) for p in name.read_text().split()}  # the shells and their sleeps
    return root, everything


@pytest.mark.timeout(40)
def test_kill_9_of_the_root_leaves_nothing_behind(rundir: Path) -> None:
    root, everything = start_root(rundir)
    # idle + 2 pool members + 2 workers with shells + 2 sleeps + the guard
    assert len(everything) >= 10
    os.kill(root.pid, signal.SIGKILL)
    root.wait()
    try:
        wait_until(lambda: not survivors(everything), 5.0, what="every process of the tree to die")
    except AssertionError as exc:
        raise AssertionError(f"{exc}; alive: {survivors(everything)}") from None


@pytest.mark.timeout(40)
def test_a_normal_stop_leaves_nothing_behind(rundir: Path) -> None:
    root, everything = start_root(rundir)
    root.send_signal(signal.SIGTERM)
    assert root.wait(20) == 0
    wait_until(lambda: not [p for p in everything if pid_alive(p)], 5.0, what="everything gone")
