"""Inside a worker process: the ChildContext a target receives, and the code that runs before it.

Before the target is called, the child
1. asks the kernel to SIGKILL it when the root dies (``PR_SET_PDEATHSIG``), then checks the root is
   still its parent (it may have died before the prctl);
2. becomes the leader of its own process group, so the root can kill it and everything it started
   with one ``killpg``, and a terminal's Ctrl-C reaches only the root;
3. installs SIGTERM/SIGINT handlers that only record (``ctx.stop_requested += 1``); the signal also
   writes a byte to ``ctx.wakeup_fd`` (``signal.set_wakeup_fd``, so it wakes a main thread blocked
   in poll even when the kernel delivered the signal to another thread): the target's loop decides
   what a stop means;
4. starts a heartbeat thread owning the supervision socket (a DEALER to the root's ROUTER at
   ``sup.ipc``, in a zmq Context created here, never the parent's): it sends ``Ready`` as soon as
   the target calls ``ctx.ready()``, then a ``Heartbeat`` with the latest ``ctx.report()`` stats
   every ``heartbeat_secs``.

The target ``module.function(ctx, *args, *extra_args)`` returns None or 0 (exit 0, ``normal``), an
int (that exit code; ``reasons.EXIT_SHUTDOWN`` means ``shutdown``), or raises (traceback logged,
exit 1).
"""

from __future__ import annotations

import gc
import importlib
import logging
import os
import pathlib
import signal
import sys
import threading
from typing import Any

import zmq

from children.protocol import Heartbeat, Ready, encode
from supervisor.guard import set_parent_death_signal

EXIT_ORPHANED = 65  # the root died before this child finished setting up

class ChildContext:
    """What a child process knows about its place in the tree and how it talks to the root.

    Attributes: ``child_id`` ("leaser", "executor.3"), ``path`` ("root/executors/executor.3", also
    the logger name with dots), ``runtime_dir``, ``heartbeat_secs``, ``stop_requested`` (0 none; 1
    after the first SIGTERM/SIGINT: warm stop; 2 or more: cold), ``wakeup_fd`` (readable when a
    signal arrived: register it in your poller and call ``clear_wakeup()`` after), ``logger``.
    """

    def __init__(self, child_id: str, path: str, runtime_dir: pathlib.Path, heartbeat_secs: float,
                 sup_endpoint: str, guard_fd: int | None = None) -> None:
        self.child_id = child_id
        self.path = path
        self.runtime_dir = pathlib.Path(runtime_dir)
        self.heartbeat_secs = heartbeat_secs
        self.stop_requested = 0
        self.logger = logging.getLogger(path.replace("/", "."))
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self.wakeup_fd = self._wake_r
        self._endpoint = sup_endpoint
        self._guard_fd = guard_fd
        self._stats: dict[str, int | float | str] = {}
        self._ready = threading.Event()
        self._ready_sent = threading.Event()  # for tests: Ready has been handed to zmq
        self._poke = threading.Event()
        self._closing = False
        self._thread: threading.Thread | None = None

    # -- the API the children use ----------------------------------------------------------------
    def ready(self) -> None:
        """Set-up is done: send Ready now (the child counts as started), then heartbeats."""
        self._ready.set()
        self._poke.set()

    def report(self, stats: dict[str, int | float | str]) -> None:
        """Latest counters and gauges, sent with the next heartbeat. A key ending in ``_total`` is
        a counter (the root adds up the incarnations of this child); anything else is a gauge.
        Thread-safe: it only swaps a reference."""
        self._stats = dict(stats)

    def clear_wakeup(self) -> None:
        """Empty the wake-up pipe after ``wakeup_fd`` polled readable."""
        try:
            while os.read(self._wake_r, 512):
                pass
        except BlockingIOError:
            pass

    def spawn_guard(self) -> None:
        """A ``preexec_fn`` for subprocesses: the subprocess gets SIGKILL when this child dies.

        Use as ``subprocess.Popen(argv, preexec_fn=ctx.spawn_guard)`` from the main thread (the
        kernel ties the death signal to the creating thread). A subprocess that stays in this
        child's process group is also killed with it by the root; one in a group of its own
        should be reported with ``track_group`` so it cannot outlive a ``kill -9`` of the root.
        """
        set_parent_death_signal(signal.SIGKILL)

    def track_group(self, pgid: int) -> None:
        """Ask the tree's guard to SIGKILL process group ``pgid`` if the root dies; call
        ``untrack_group`` once that group is gone (pids are reused)."""
        self._guard_write(b"+%d\n" % pgid)

    def untrack_group(self, pgid: int) -> None:
        self._guard_write(b"-%d\n" % pgid)

    # -- machinery -------------------------------------------------------------------------------
    def _guard_write(self, line: bytes) -> None:
        if self._guard_fd is not None:
            os.write(self._guard_fd, line)  # < PIPE_BUF: atomic even with other writers

    def _on_signal(self, signum: int, frame: Any) -> None:
        # The byte on wakeup_fd was already written by the C-level handler (set_wakeup_fd).
        self.stop_requested += 1

    def _start_heartbeats(self) -> None:
        self._thread = threading.Thread(target=self._heartbeat_loop, name="heartbeat", daemon=True)
        self._thread.start()

    def _heartbeat_loop(self) -> None:
        zctx = zmq.Context()
        sock = zctx.socket(zmq.DEALER)
        sock.linger = 1000  # the last heartbeat (final counters) should reach the root
        sock.sndhwm = 100
        sock.connect(self._endpoint)
        pid = os.getpid()
        said_ready = False
        try:
            while True:
                if self._ready.is_set() and not said_ready:
                    self._send(sock, Ready(self.child_id, pid))
                    said_ready = True
                    self._ready_sent.set()
                    if not self._closing:
                        self._poke.wait(self.heartbeat_secs)
                        self._poke.clear()
                        continue
                if self._closing:
                    if said_ready:  # the final counters, so they survive this incarnation
                        self._send(sock, Heartbeat(self.child_id, pid, self._stats))
                    return
                if said_ready:
                    self._send(sock, Heartbeat(self.child_id, pid, self._stats))
                self._poke.wait(self.heartbeat_secs if said_ready else None)
                self._poke.clear()
        finally:
            sock.close()
            zctx.term()

    @staticmethod
    def _send(sock: zmq.Socket, message: Any) -> None:
        try:
            sock.send(encode(message), zmq.NOBLOCK)
        except zmq.Again:
            pass  # the root is not reading: it will judge us by the missing heartbeats

    def _close(self) -> None:
        self._closing = True
        self._poke.set()
        if self._thread is not None:
            self._thread.join(timeout=2.0)


def child_main(child_id: str, path: str, runtime_dir: str, heartbeat_secs: float, sup_endpoint: str,
               guard_fd: int | None, root_pid: int, start: tuple[str, str, tuple[Any, ...]],
               extra_args: tuple[Any, ...]) -> None:
    """Entry point of every worker process (runs right after fork); exits with the target's code."""
    # Everything inherited from the root moves to the collector's permanent generation: a
    # collection would otherwise write to each inherited object's header, turning the pages shared
    # with the root into private copies in every child.
    gc.freeze()
    set_parent_death_signal(signal.SIGKILL)
    if os.getppid() != root_pid:
        os._exit(EXIT_ORPHANED)  # the root died before the prctl: nobody will supervise us
    try:
        os.setpgid(0, 0)
    except OSError:
        pass  # the root already made us a group leader
    ctx = ChildContext(child_id, path, pathlib.Path(runtime_dir), heartbeat_secs, sup_endpoint, guard_fd)
    # The C-level handler writes to this fd from whatever thread the kernel picked, so a main
    # thread blocked in poll/select wakes up; the Python handler then runs in the main thread.
    signal.set_wakeup_fd(ctx._wake_w, warn_on_full_buffer=False)
    signal.signal(signal.SIGTERM, ctx._on_signal)
    signal.signal(signal.SIGINT, ctx._on_signal)
    signal.signal(signal.SIGHUP, signal.SIG_DFL)
    ctx._start_heartbeats()
    code = 1
    try:
        module = importlib.import_module(start[0])
        result = getattr(module, start[1])(ctx, *start[2], *extra_args)
        code = 0 if result is None else int(result)
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except BaseException:
        ctx.logger.exception("child %s crashed", path)
        code = 1
    finally:
        ctx._close()
    sys.exit(code)
