"""The tree's guard kills every descendant of a tree whose root died by SIGKILL, setsid'd
grandchildren included; an executor's next incarnation kills what its predecessor's tasks left."""

import os
import signal
import subprocess
import sys
import textwrap

import pytest

from supervisor import sweep
from tests.integration.harness import wait_until

pytestmark = pytest.mark.timeout(60)

ROOT = textwrap.dedent("""
    import os, subprocess, sys, time
    sys.path.insert(0, {repo!r})
    from supervisor import sweep
    from supervisor.guard import GroupGuard
    os.environ[sweep.TREE_VAR] = sweep.new_token()
    guard = GroupGuard()  # what the root starts; it kills marked processes when the root dies
    # a grandchild that leaves our process group and session, and its own child
    p = subprocess.Popen(["/bin/sh", "-c", "sleep 300 & echo $!; exec sleep 301"],
                         stdout=subprocess.PIPE, start_new_session=True)
    print(p.pid, p.stdout.readline().decode().strip(), flush=True)
    time.sleep(300)
""")


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as handle:
            return handle.read().rsplit(b")", 1)[1].split()[0] != b"Z"
    except OSError:
        return False


def test_guard_kills_setsid_grandchildren_after_kill_9_of_the_root():
    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    root = subprocess.Popen([sys.executable, "-c", ROOT.format(repo=repo)], stdout=subprocess.PIPE)
    try:
        pids = [int(x) for x in root.stdout.readline().split()]
        assert len(pids) == 2 and all(alive(p) for p in pids)
        root.send_signal(signal.SIGKILL)
        root.wait(timeout=10)
        wait_until(lambda: not any(alive(p) for p in pids), 5, "the grandchildren to be killed")
    finally:
        if root.poll() is None:
            root.kill()
        for pid in pids if "pids" in locals() else []:
            if alive(pid):
                os.kill(pid, signal.SIGKILL)


def test_sweep_predecessors_kills_leftovers_of_an_earlier_incarnation_only(monkeypatch):
    token = sweep.new_token()
    env = dict(os.environ, **{sweep.CHILD_VAR: f"{token}/executor.0/1"})
    other = dict(os.environ, **{sweep.CHILD_VAR: f"{token}/executor.1/2"})
    old = subprocess.Popen(["sleep", "300"], env=env)
    bystander = subprocess.Popen(["sleep", "300"], env=other)
    try:
        monkeypatch.setitem(os.environ, sweep.CHILD_VAR, "")
        killed = sweep.sweep_predecessors("executor.0", token)
        assert killed >= 1
        assert old.wait(timeout=5) == -signal.SIGKILL
        assert bystander.poll() is None
        assert os.environ[sweep.CHILD_VAR] == f"{token}/executor.0/{os.getpid()}"
    finally:
        for process in (old, bystander):
            if process.poll() is None:
                process.kill()
                process.wait()
