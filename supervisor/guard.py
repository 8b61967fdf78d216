"""The tree's guard: a small process that outlives the root just long enough to kill what it left.

It holds the list of the tree's process groups and SIGKILLs them all when the root dies (its
parent-death signal), then every process still carrying the tree's environment marker
(supervisor/sweep.py) -- so after ``kill -9`` of the root the grandchildren of workers, which
PR_SET_PDEATHSIG does not reach, die too.

The guard is a fresh interpreter (``python -I -S``, importing only this module and sweep), not a
fork of the root: a fork would carry the root's 20-odd MB of resident pages for a process whose
whole job is one blocking ``read``. Only when the interpreter cannot be run (privileges dropped to
a user who may not read it) is the guard forked instead.

Lines on its pipe: ``+PGID`` track, ``-PGID`` forget, ``x`` kill what is tracked and exit.
Workers inherit the write end, so they can register groups of their own (ChildContext.track_group).
"""

from __future__ import annotations

import ctypes
import os
import select
import signal
import sys

from supervisor import sweep

PR_SET_PDEATHSIG = 1
_PACKAGE_ROOT = os.path.dirname(os.path.dirname(os.path.realpath(__file__)))
_BOOT = "import sys; sys.path.insert(0, sys.argv[1]); from supervisor.guard import main; main()"


_libc = ctypes.CDLL(None, use_errno=True)


def set_parent_death_signal(signum: int = signal.SIGKILL) -> None:
    """Have the kernel send ``signum`` to this process when the thread that created it exits."""
    if _libc.prctl(PR_SET_PDEATHSIG, signum, 0, 0, 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


class GroupGuard:
    """The root's handle on its guard process: ``track``/``untrack`` groups, ``close`` at the end."""

    def __init__(self) -> None:
        root_pid = os.getpid()
        read_fd, self.fd = os.pipe()
        os.set_inheritable(read_fd, True)
        try:
            # setpgroup=0: out of the root's group, so a terminal's Ctrl-C is the root's business.
            # The environment carries the tree's marker, which the guard sweeps for at the end.
            self.pid = os.posix_spawn(
                sys.executable,
                [sys.executable, "-I", "-S", "-c", _BOOT, _PACKAGE_ROOT, str(read_fd), str(root_pid)],
                dict(os.environ), setpgroup=0)
        except OSError:  # e.g. EACCES after a privilege drop: a fork works wherever we run
            self.pid = os.fork()
            if self.pid == 0:  # pragma: no cover - runs in the guard process
                os.close(self.fd)
                signal.set_wakeup_fd(-1)
                os.setpgid(0, 0)
                os.closerange(3, read_fd)
                os.closerange(read_fd + 1, 1 << 16)
                _serve(read_fd, root_pid)
        finally:
            os.close(read_fd)

    def track(self, pgid: int) -> None:
        self._write(b"+%d\n" % pgid)

    def untrack(self, pgid: int) -> None:
        self._write(b"-%d\n" % pgid)

    def _write(self, line: bytes) -> None:
        try:
            os.write(self.fd, line)
        except OSError as exc:
            import logging  # here, not at the top: the guard's own interpreter never logs

            logging.getLogger("supervisor.guard").warning("group guard unreachable: %s", exc)

    def close(self, timeout: float = 2.0) -> None:
        """Kill whatever is still tracked, let the guard exit and reap it."""
        self._write(b"x\n")
        os.close(self.fd)
        pidfd = os.pidfd_open(self.pid)
        try:
            if not select.select([pidfd], [], [], timeout)[0]:
                os.kill(self.pid, signal.SIGKILL)
            os.waitpid(self.pid, 0)
        finally:
            os.close(pidfd)


def main() -> None:  # pragma: no cover - runs in the guard process
    _serve(int(sys.argv[2]), int(sys.argv[3]))


def _serve(read_fd: int, root_pid: int) -> None:  # pragma: no cover - runs in the guard process
    groups: set[int] = set()
    try:
        # A signal only wakes the select below (its handler does nothing; the wakeup fd carries
        # it): raising from the handler could abandon lines still in the pipe -- a group the root
        # tracked just before it died, which a starved guard had not read yet, would then live on.
        wake_r, wake_w = os.pipe()
        for fd in (wake_r, wake_w):
            os.set_blocking(fd, False)
        signal.set_wakeup_fd(wake_w)
        for signum in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(signum, lambda signum, frame: None)
        for signum in (signal.SIGINT, signal.SIGHUP):
            signal.signal(signum, signal.SIG_IGN)
        set_parent_death_signal(signal.SIGUSR1)
        os.set_blocking(read_fd, False)
        pending = bytearray()
        # The root may have died while this interpreter started (then no signal comes): look first.
        while os.getppid() == root_pid:
            readable = select.select([read_fd, wake_r], [], [])[0]
            if wake_r in readable or _read_lines(read_fd, groups, pending):
                break
        _read_lines(read_fd, groups, pending)  # whatever the root wrote before it died
    finally:
        for pgid in groups:
            try:
                os.killpg(pgid, signal.SIGKILL)
            except OSError:
                pass
        # What left every group (a task that called setsid, a daemonised grandchild) still carries
        # the tree's marker in its environment.
        token = os.environ.get(sweep.TREE_VAR)
        if token:
            sweep.kill_all(lambda: sweep.processes_with(sweep.TREE_VAR, token))
        os._exit(0)


def _read_lines(read_fd: int, groups: set[int], pending: bytearray) -> bool:
    """Apply the pipe's lines until nothing more can be read without blocking; True on ``x`` or at
    end of file (the root is gone or done: kill what is tracked and exit). ``pending`` keeps a
    line cut by the end of one read for the next call."""
    while True:
        try:
            data = os.read(read_fd, 4096)
        except BlockingIOError:
            return False
        if not data:
            return True
        pending += data
        *lines, rest = pending.split(b"\n")
        pending[:] = rest
        if apply_lines([bytes(line) for line in lines], groups):
            return True


def apply_lines(lines: list[bytes], groups: set[int]) -> bool:
    """Track and forget groups; True on ``x`` (kill what is tracked and exit)."""
    for line in lines:
        if line == b"x":
            return True
        if line[:1] == b"+":
            groups.add(int(line[1:]))
        elif line[:1] == b"-":
            groups.discard(int(line[1:]))
    return False
