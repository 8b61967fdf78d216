"""Running one task: a command (the seed's ``executable_binary INPUT_FILE OUTPUT_FILE``) or a Python
callable, and posting its output. Used by the executor process; no sockets here."""

from __future__ import annotations

import importlib
import os
import signal
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# After SIGTERM to a timed-out command's process group, SIGKILL follows this much later.
KILL_GRACE_SECS = 5.0
ERROR_TAIL_BYTES = 400

@dataclass(slots=True)
class Task:
    """What a callable receives."""

    id: str
    payload: bytes
    attempt: int
    tag: str


class TaskTimeout(Exception):
    """Raised inside a callable that ran past ``timeout_secs``."""


class BadTarget(Exception):
    """The configured command or callable cannot be used; one line, for the operator."""


def load_callable(spec: str, python_path: list[str]) -> Callable[[Task], Any]:
    """Import ``package.module:function`` once; raises BadTarget with one line."""
    for folder in reversed(python_path):
        if folder not in sys.path:
            sys.path.insert(0, folder)
    module_name, _, function_name = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:
        raise BadTarget(f"executors.callable = {spec!r}: cannot import {module_name!r}: "
                        f"{exc.__class__.__name__}: {exc}") from None
    function = getattr(module, function_name, None)
    if not callable(function):
        raise BadTarget(f"executors.callable = {spec!r}: {module_name} has no function {function_name!r}")
    return function


def call_task(function: Callable[[Task], Any], task: Task) -> tuple[bool, bytes, str]:
    """Run a callable task; returns (ok, output, error)."""
    try:
        result = function(task)
    except TaskTimeout:
        return False, b"", "timeout: ran past executors.timeout_secs"
    except KeyboardInterrupt:
        raise
    except BaseException as exc:  # noqa: BLE001 - a task's failure (SystemExit included) is its own
        return False, b"", f"{exc.__class__.__name__}: {exc}"[:ERROR_TAIL_BYTES * 2]
    if result is None:
        return True, b"", ""
    if isinstance(result, bytes):
        return True, result, ""
    if isinstance(result, str):
        return True, result.encode(), ""
    return False, b"", f"callable returned {type(result).__name__}; expected bytes, str or None"


def post_output(url: str, output: bytes, timeout_secs: float) -> str:
    """POST the output; returns "" on a 2xx, else the error (the task then counts as failed and is
    retried, as the seed deleted a task only after its output was posted)."""
    # imported here: urllib.request pulls in http, email and ssl (OpenSSL), about 8 MB resident
    # in every process of the tree, for a feature most trees leave off
    import urllib.error
    import urllib.request

    request = urllib.request.Request(url, data=output, method="POST",
                                     headers={"Content-Type": "application/octet-stream"})
    try:
        with urllib.request.urlopen(request, timeout=timeout_secs) as response:
            status = response.status
    except urllib.error.HTTPError as exc:
        return f"output_url answered {exc.code}"
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        return f"output_url failed: {reason}"
    return "" if 200 <= status < 300 else f"output_url answered {status}"


class Spawned:
    """A process started with posix_spawn: the little of ``subprocess.Popen`` the executor uses."""

    __slots__ = ("pid", "returncode")

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.returncode: int | None = None

    def poll(self) -> int | None:
        if self.returncode is None:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def wait(self) -> int:
        if self.returncode is None:
            _, status = os.waitpid(self.pid, 0)
            self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode


@dataclass(slots=True)
class CommandRun:
    """One command task in flight."""

    task: Task
    receipt: str
    process: Spawned
    pidfd: int
    started: float
    deadline: float
    infile: str
    outfile: str
    errfile: str
    slot: int = 0
    killed_at: float | None = None
    timed_out: bool = False


def start_command(argv: list[str], task: Task, receipt: str, workdir: Path, now: float,
                  timeout_secs: float, serial: int, env: dict[str, str] | None = None,
                  slot: int = 0) -> CommandRun:
    """Write the payload to an input file and start ``argv + [infile, outfile]`` in a session and
    process group of its own; the payload never reaches a command line or a shell. ``env`` is the
    environment to start from (default ``os.environ``; the executor passes its own copy, made once).
    ``serial`` names the task's files; stderr goes to the file of ``slot`` (which of the executor's
    slots runs it), truncated and reused: creating and removing a third file a task cost about 4 %
    of a /bin/true task's throughput. Raises OSError (e.g. not found).

    posix_spawn rather than subprocess: a vfork-style spawn with no Python code on the way costs a
    third of Popen's CPU per task. Every descriptor this process opens is close-on-exec (Python's
    default, and libzmq's), so the task inherits only the three set up here. A task outliving its
    executor is killed by the executor's next incarnation (supervisor/sweep.py), or, if the root
    dies, by the tree's guard."""
    # plain os calls on str paths: this runs once a task, and pathlib's layers cost more than the I/O
    base = f"{workdir}/t{serial}"
    infile, outfile, errfile = base + ".in", base + ".out", f"{workdir}/slot{slot}.err"
    _write_new(infile, task.payload)
    # The output file exists, empty, when the command starts, so a program may open it for update
    # or pass it on (the default `/bin/cat INPUT OUTPUT` then succeeds, as with the seed's temp files).
    _write_new(outfile, b"")
    env = dict(os.environ if env is None else env)
    env["SUPERVISE_TASK_ID"] = task.id
    env["SUPERVISE_TASK_ATTEMPT"] = str(task.attempt)
    env["SUPERVISE_TASK_TAG"] = task.tag
    pid = os.posix_spawnp(argv[0], [*argv, infile, outfile], env, setsid=True, file_actions=[
        (os.POSIX_SPAWN_OPEN, 0, "/dev/null", os.O_RDONLY, 0),
        (os.POSIX_SPAWN_OPEN, 1, errfile, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600),
        (os.POSIX_SPAWN_DUP2, 1, 2),
    ])
    return CommandRun(task, receipt, Spawned(pid), os.pidfd_open(pid), now, now + timeout_secs,
                      infile, outfile, errfile, slot)


def _write_new(path: str, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
    finally:
        os.close(fd)


def signal_group(run: CommandRun, signum: int) -> None:
    try:
        os.killpg(run.process.pid, signum)
    except (ProcessLookupError, PermissionError):
        pass


def finish_command(run: CommandRun) -> tuple[bool, bytes, str]:
    """Collect a command that exited; kill what it left in its group; remove its input and output
    files (its slot's stderr file stays for the slot's next task)."""
    code = run.process.wait()
    # Anything the command left behind in its process group goes with it.
    signal_group(run, signal.SIGKILL)
    os.close(run.pidfd)
    output = b""
    try:
        with open(run.outfile, "rb") as handle:
            output = handle.read()
    except FileNotFoundError:
        pass
    error = ""
    if run.timed_out:
        error = "timeout: ran past executors.timeout_secs; process group killed"
    elif code != 0:
        tail = _tail(run.errfile)
        reason = f"killed by {signal.Signals(-code).name}" if code < 0 else f"exit {code}"
        error = f"{reason}: {tail}" if tail else reason
    for path in (run.infile, run.outfile):
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
    return (code == 0 and not run.timed_out), output, error


def _tail(path: str) -> str:
    try:
        with open(path, "rb") as handle:
            handle.seek(0, os.SEEK_END)
            size = handle.tell()
            handle.seek(max(0, size - ERROR_TAIL_BYTES))
            data = handle.read()
    except OSError:
        return ""
    lines = [line for line in data.decode(errors="replace").splitlines() if line.strip()]
    return lines[-1].strip() if lines else ""


def check_timeout(run: CommandRun, now: float) -> float | None:
    """Enforce the timeout: SIGTERM to the group at the deadline, SIGKILL after the grace.
    Returns when to look again (None once the SIGKILL went out)."""
    if now < run.deadline:
        return run.deadline
    if run.killed_at is None:
        run.timed_out = True
        run.killed_at = now
        signal_group(run, signal.SIGTERM)
        return now + KILL_GRACE_SECS
    if now >= run.killed_at + KILL_GRACE_SECS:
        signal_group(run, signal.SIGKILL)
        return None
    return run.killed_at + KILL_GRACE_SECS
