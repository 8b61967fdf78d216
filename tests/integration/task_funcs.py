"""Callable tasks for the end-to-end tests (loaded by executors through ``python_path``).

Every task appends one line ``task_id attempt pid`` to the file named by $LEASETREE_TEST_RECORD
(O_APPEND writes of one short line are atomic), so a test can count how often each task ran. What
the task does is chosen by its payload: ``ok``, ``fail``, ``flaky:N`` (fails until attempt N),
``crash`` (kills its own executor), ``sleep:S``, ``echo:TEXT``, ``gil:S`` (blocks S seconds in C
holding the GIL, so the executor's heartbeat thread stops as under a runaway C extension),
``leak:MB`` (keeps MB more of touched memory alive in the executor, a leaking callable).
"""

import ctypes
import os
import signal
import time

_LEAKED: list[bytes] = []  # what ``leak:MB`` tasks keep alive, for the executor's lifetime


def _record(task) -> None:
    path = os.environ.get("LEASETREE_TEST_RECORD")
    if path:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, f"{task.id} {task.attempt} {os.getpid()} {task.payload[:40]!r}\n".encode())
        finally:
            os.close(fd)


def run(task):
    _record(task)
    kind, _, arg = task.payload.decode(errors="replace").partition(":")
    if kind == "fail":
        raise RuntimeError(f"failing on purpose (attempt {task.attempt})")
    if kind == "flaky" and task.attempt < int(arg):
        raise RuntimeError(f"flaky attempt {task.attempt}")
    if kind == "crash":
        os.kill(os.getpid(), signal.SIGKILL)
    if kind == "sleep":
        time.sleep(float(arg))
    if kind == "gil":
        # ctypes.PyDLL keeps the GIL across the call (CDLL would release it): libc sleep(3) then
        # stalls every thread of the interpreter, the heartbeat thread included
        ctypes.PyDLL(None).sleep(int(arg))
    if kind == "leak":
        _LEAKED.append(b"\x01" * (int(arg) * 1024 * 1024))  # written, so it is resident
    if kind == "echo":
        return arg.upper()
    return None


def noop(task):
    return None
