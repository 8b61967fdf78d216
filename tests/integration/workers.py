"""Module-level worker entry points for the integration tests (``(module, function, args)`` data).

Each takes the ChildContext first. Workers that take ``log`` append one line per event
("start <id> <pid>", "stop <id> <pid> <stop_requested>") to that file with O_APPEND, so a test can
read the order in which things happened across processes.
"""

from __future__ import annotations

import os
import select
import subprocess
import time

from supervisor.reasons import EXIT_SHUTDOWN
from tests.integration.harness import wait_until  # noqa: F401 - the tree tests import it from here


def _note(log: str | None, line: str) -> None:
    if log:
        fd = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            os.write(fd, (line + "\n").encode())
        finally:
            os.close(fd)


def _wait_for_stop(ctx, timeout: float | None = None) -> bool:
    """Block until a stop signal arrived (True) or ``timeout`` passed (False)."""
    deadline = None if timeout is None else time.monotonic() + timeout
    while not ctx.stop_requested:
        left = None if deadline is None else max(0.0, deadline - time.monotonic())
        if not select.select([ctx.wakeup_fd], [], [], left)[0] and deadline is not None:
            return False
        ctx.clear_wakeup()
    return True


def idle(ctx, log: str | None = None, *extra) -> int:
    """Says Ready, idles until told to stop, exits 0."""
    _note(log, f"start {ctx.child_id} {os.getpid()}")
    ctx.ready()
    _wait_for_stop(ctx)
    _note(log, f"stop {ctx.child_id} {os.getpid()} {ctx.stop_requested}")
    return 0


def crash_after(ctx, ms: int, code: int = 3, log: str | None = None) -> int:
    """Says Ready, exits with ``code`` after ``ms`` milliseconds (0 = normal, 64 = shutdown)."""
    _note(log, f"start {ctx.child_id} {os.getpid()}")
    ctx.ready()
    if _wait_for_stop(ctx, ms / 1000.0):
        return 0
    return code


def exit_shutdown(ctx) -> int:
    ctx.ready()
    return EXIT_SHUTDOWN


def ignore_sigterm(ctx, log: str | None = None) -> int:
    """Says Ready and never stops on its own: only a SIGKILL ends it."""
    _note(log, f"start {ctx.child_id} {os.getpid()}")
    ctx.ready()
    while True:
        select.select([ctx.wakeup_fd], [], [])
        ctx.clear_wakeup()
        _note(log, f"ignored {ctx.child_id} {os.getpid()} {ctx.stop_requested}")


def ignore_sigterm_with_shell(ctx, pidfile: str, log: str | None = None) -> int:
    """Starts ``sh -c 'sleep 300; true'`` in this worker's process group (its ``sleep`` is a
    grandchild of this worker), writes "<sh pid> <sleep pid>" to ``pidfile``, says Ready, and never
    stops on its own: only the SIGKILL of its group after the shutdown timeout ends it all."""
    proc = subprocess.Popen(["sh", "-c", "sleep 300; true"])
    _record_shell(proc, pidfile)
    return ignore_sigterm(ctx, log)


def start_when_exists(ctx, gate: str, log: str | None = None) -> int:
    """Says Ready only once ``gate`` exists (a start as slow as the test wants), then idles."""
    while not os.path.exists(gate):
        if _wait_for_stop(ctx, 0.01):
            return 0
    return idle(ctx, log)


def slow_stop(ctx, secs: float, log: str | None = None) -> int:
    """Says Ready; when told to stop, takes ``secs`` seconds to finish (a drain)."""
    _note(log, f"start {ctx.child_id} {os.getpid()}")
    ctx.ready()
    _wait_for_stop(ctx)
    deadline = time.monotonic() + secs
    while time.monotonic() < deadline and ctx.stop_requested < 2:  # a cold stop cuts the drain short
        select.select([ctx.wakeup_fd], [], [], max(0.0, deadline - time.monotonic()))
        ctx.clear_wakeup()
    _note(log, f"stop {ctx.child_id} {os.getpid()} {ctx.stop_requested}")
    return 0


def never_ready(ctx) -> int:
    """Never says Ready."""
    _wait_for_stop(ctx)
    return 0


def fail_start(ctx, *extra) -> int:
    raise RuntimeError("cannot start: configuration missing")


def fail_start_if_exists(ctx, path: str, log: str | None = None) -> int:
    """Fails to start while ``path`` exists; otherwise behaves like ``idle``."""
    if os.path.exists(path):
        raise RuntimeError(f"{path} exists")
    return idle(ctx, log)


def block_gil(ctx) -> int:
    """Says Ready, then blocks in C holding the GIL (ctypes.PyDLL does not release it): its
    heartbeat thread stops too, as it would under a runaway C extension."""
    import ctypes

    ctx.ready()
    # Once Ready is handed to zmq, zmq's own IO thread (native code, no GIL) puts it on the wire
    # even while this thread holds the GIL below; before that, the GIL would keep it unsent.
    if not ctx._ready_sent.wait(5):
        return 1
    ctypes.PyDLL(None).sleep(60)
    return 0


def spawn_sleep(ctx, pidfile: str) -> int:
    """Starts ``sh -c 'sleep 300; true'`` (a shell that starts sleep), writes
    "<sh pid> <sleep pid>" to ``pidfile``, says Ready, idles."""
    proc = subprocess.Popen(["sh", "-c", "sleep 300; true"])
    return _record_shell_and_idle(ctx, proc, pidfile)


def spawn_tracked(ctx, pidfile: str) -> int:
    """Like ``spawn_sleep`` but the shell gets a session (and process group) of its own, dies with
    this worker (``ctx.spawn_guard``) and its group is reported to the tree's guard."""
    proc = subprocess.Popen(["sh", "-c", "sleep 300; true"], start_new_session=True,
                            preexec_fn=ctx.spawn_guard)
    ctx.track_group(proc.pid)
    return _record_shell_and_idle(ctx, proc, pidfile)


def _record_shell_and_idle(ctx, proc, pidfile: str) -> int:
    _record_shell(proc, pidfile)
    ctx.ready()
    _wait_for_stop(ctx)
    return 0


def _record_shell(proc, pidfile: str) -> None:
    """Write "<shell pid> <its child's pid>" to ``pidfile`` (atomically), once the shell forked."""
    deadline = time.monotonic() + 5
    sleeper = None
    while sleeper is None and time.monotonic() < deadline:
        try:
            with open(f"/proc/{proc.pid}/task/{proc.pid}/children") as f:
                found = f.read().split()
            sleeper = int(found[0]) if found else None
        except FileNotFoundError:
            break
        if sleeper is None:
            select.select([], [], [], 0.005)  # the shell is forking: look again shortly
    tmp = pidfile + ".tmp"
    with open(tmp, "w") as f:
        f.write(f"{proc.pid} {sleeper}")
    os.replace(tmp, pidfile)


def count_up(ctx, per_beat: int = 5) -> int:
    """Reports ``work_total`` growing by ``per_beat`` each heartbeat and a gauge ``busy``."""
    ctx.ready()
    total = 0
    while not _wait_for_stop(ctx, ctx.heartbeat_secs / 2):
        total += per_beat
        ctx.report({"work_total": total, "busy": 1})
    return 0


# -- helpers for the tests that drive a real tree --------------------------------------------------


def run_tree(tree, script):
    """Run ``tree`` in this (main) thread while ``script(runtime_dir)`` runs in another thread;
    returns (exit code, script's result). If the script fails, the tree is stopped cold and the
    script's exception re-raised."""
    import threading

    from supervisor import control

    outcome: dict = {}

    def body() -> None:
        try:
            wait_until(lambda: control.is_listening(tree.runtime_dir), 10, what="the control socket")
            outcome["result"] = script(tree.runtime_dir)
        except BaseException as exc:  # hand it to the main thread
            outcome["error"] = exc
            try:
                control.call(tree.runtime_dir, "stop", {"cold": True}, timeout=2)
                control.call(tree.runtime_dir, "stop", {"cold": True}, timeout=2)
            except Exception:
                pass

    thread = threading.Thread(target=body, daemon=True)
    thread.start()
    code = tree.run()
    thread.join(30)
    if "error" in outcome:
        raise outcome["error"]
    return code, outcome.get("result")


def pid_alive(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False


def main(argv: list[str]) -> int:
    """``python -m tests.integration.workers RUNDIR PIDFILE``: a tree with an idle worker, a pool
    of two and a worker whose shell starts ``sleep`` (for the kill -9 test)."""
    import logging

    from supervisor.spec import ChildSpec, SupervisorStart, SupFlags
    from supervisor.tree import Tree

    logging.basicConfig(level=logging.INFO)
    rundir, pidfile = argv
    me = "tests.integration.workers"
    pool = SupervisorStart(SupFlags("simple_one_for_one"), (ChildSpec("e", (me, "idle", ())),),
                           initial_extra_args=((), ()))
    children = [ChildSpec("idle", (me, "idle", ())), ChildSpec("pool", pool),
                ChildSpec("sleeper", (me, "spawn_sleep", (pidfile,))),
                ChildSpec("tracked", (me, "spawn_tracked", (pidfile + ".tracked",)))]
    return Tree(SupFlags(), children, rundir, heartbeat_secs=0.2).run()


if __name__ == "__main__":
    import sys

    sys.exit(main(sys.argv[1:]))
