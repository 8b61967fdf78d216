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


STARVED = textwrap.dedent("""
    import os, signal, subprocess, sys
    sys.path.insert(0, {repo!r})
    from supervisor.guard import GroupGuard
    guard = GroupGuard()
    print(guard.pid, flush=True)
    sys.stdin.readline()  # the test has stopped the guard
    # a group of its own and no tree marker: only the guard's list of groups can reach it
    env = {{k: v for k, v in os.environ.items() if not k.startswith("LEASETREE_")}}
    p = subprocess.Popen(["sleep", "300"], start_new_session=True, env=env)
    guard.track(p.pid)
    print(p.pid, flush=True)
    sys.stdin.readline()  # killed here
""")


def waiting_with_handlers(pid: int) -> bool:
    with open(f"/proc/{pid}/status") as handle:
        status = dict(line.split(":", 1) for line in handle)
    caught = int(status["SigCgt"], 16)
    return status["State"].split()[0] == "S" and bool(caught & (1 << (signal.SIGUSR1 - 1)))


def test_a_group_tracked_just_before_the_root_dies_is_killed_by_a_starved_guard():
    """The root tracks a group and dies before its guard has read the line (the guard is stopped
    here, as a starved one would be): the guard still reads it before killing, not after."""
    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    root = subprocess.Popen([sys.executable, "-c", STARVED.format(repo=repo)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    guard = int(root.stdout.readline())
    # stopped once it waits on its pipe with its handlers set (stopped earlier, the orphaned
    # group's SIGHUP would kill it before it has a handler: that is not starving)
    wait_until(lambda: waiting_with_handlers(guard), 10, "the guard to wait on its pipe")
    os.kill(guard, signal.SIGSTOP)
    root.stdin.write(b"\n")
    root.stdin.flush()
    sleeper = int(root.stdout.readline())
    try:
        root.send_signal(signal.SIGKILL)
        root.wait(timeout=10)
        os.kill(guard, signal.SIGCONT)  # its parent-death signal is pending: it wakes to it
        wait_until(lambda: not alive(sleeper), 5, "the tracked group to be killed")
        wait_until(lambda: not alive(guard), 5, "the guard to exit")
    finally:
        for pid in (sleeper, guard):
            if alive(pid):
                os.kill(pid, signal.SIGKILL)
