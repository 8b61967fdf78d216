"""The task body every contender runs, so that all of them do exactly the same work.

A task marks itself done by appending one byte to the file named by ``BENCH_DONE_FILE`` (one
``write(2)`` on an ``O_APPEND`` descriptor, about a microsecond): the harness reads the file's size to
know how many task bodies have finished. That is cheaper than a Redis INCR (a network round trip per
task) and the same for every contender, including those with no broker at all (mp-pool, zmq-raw).

``BENCH_SLEEP_MS`` (optional) makes each task sleep first, for the overhead-vs-useful-work table.
``stamp`` is the latency task: its payload is the enqueue time; it appends "enqueued started" lines.
"""

from __future__ import annotations

import os
import time

_SLEEP_SECS = float(os.environ.get("BENCH_SLEEP_MS") or 0) / 1000.0
_fd: int | None = None


def _forget_fd() -> None:
    # Each process opens a descriptor of its own: a forked child drops the one it inherited.
    # A fork hook rather than a getpid() check, which is a system call on every task.
    global _fd
    _fd = None


os.register_at_fork(after_in_child=_forget_fd)


def _done_fd() -> int:
    global _fd
    if _fd is None:
        _fd = os.open(os.environ["BENCH_DONE_FILE"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    return _fd


def noop(*_args: object, **_kwargs: object) -> None:
    """The no-op task: optionally sleep BENCH_SLEEP_MS, then mark one task done."""
    if _SLEEP_SECS:
        time.sleep(_SLEEP_SECS)
    os.write(_done_fd(), b".")


def stamp(task: object = None, *args: object) -> None:
    """The latency task: append "<enqueue time> <start time>" (Unix seconds).

    The enqueue time is the payload: ``task.payload`` (leasetree's callable gets a task object) or
    the first positional argument (the peers' APIs pass it as an argument).
    """
    started = time.time()
    payload = getattr(task, "payload", task)
    if isinstance(payload, bytes):
        payload = payload.decode()
    os.write(_done_fd(), f"{payload} {started!r}\n".encode())
