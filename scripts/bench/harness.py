"""Run one contender once and measure it: wall time, CPU seconds and peak RSS of its process tree.

What is timed, for every contender alike: from launching its worker processes (the queue is filled
before, untimed) to the moment the last task body has finished. Completion is read from the
done-file that each task body appends one byte to (see ``benchtask``), or, for command tasks that
cannot write it, from the contender's processes all exiting 0.

CPU is the user+system time of every process of the contender over the same window: for the
processes still alive at that moment, psutil's ``cpu_times`` (own + reaped children's, so forked
work-horses and pool children count); for the ones that already exited and were reaped by us,
the growth of ``getrusage(RUSAGE_CHILDREN)``. Startup CPU (imports, forks) is inside the window, as
startup time is inside the wall time. Peak RSS is the largest sum of RSS over the live tree, sampled
every 25 ms during the first second and every 100 ms after (RSS counts shared pages once per
process, so forked pools look bigger than they are; the same holds for every contender).
"""

from __future__ import annotations

import os
import resource
import signal
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import psutil

POLL_SECS = 0.005  # how often the done-file is read: 5 ms is < 0.5 % of the shortest full run


@dataclass
class RunContext:
    """Everything one run of one contender needs; ``rundir`` is fresh for the run."""

    n: int
    rundir: Path
    bench_dir: Path  # scripts/bench, put on PYTHONPATH of every contender
    redis_url: str
    timeout_secs: float
    mode: str = "noop"  # noop | command | latency
    sleep_ms: float = 0.0
    env: dict[str, str] = field(default_factory=dict)

    @property
    def done_file(self) -> Path:
        return self.rundir / "done"

    def done_count(self) -> int:
        """How many task bodies have finished (bytes in the done-file)."""
        try:
            return os.stat(self.done_file).st_size
        except FileNotFoundError:
            return 0


@dataclass
class Measurement:
    wall_secs: float | None = None
    cpu_secs: float | None = None
    peak_rss: int = 0  # bytes
    first_secs: float | None = None  # launch -> first task done: the startup cost
    error: str = ""
    notes: list[str] = field(default_factory=list)


def spawn(argv: list[str], ctx: RunContext, log_name: str, extra_env: dict[str, str] | None = None,
          stdin_path: Path | None = None) -> subprocess.Popen[bytes]:
    """Start one process of a contender in its own session (so its group can be signalled),
    with stdout and stderr going to ``rundir/log_name`` and stdin from ``stdin_path`` (or nothing)."""
    env = dict(ctx.env)
    env.update(extra_env or {})
    log = open(ctx.rundir / log_name, "ab")  # the child holds its own copy; ours is closed below
    stdin = open(stdin_path, "rb") if stdin_path else subprocess.DEVNULL
    try:
        return subprocess.Popen(argv, env=env, cwd=ctx.rundir, stdout=log, stderr=subprocess.STDOUT,
                                stdin=stdin, start_new_session=True)
    finally:
        log.close()
        if stdin_path:
            stdin.close()


def last_log_line(ctx: RunContext) -> str:
    """The last non-empty line of any log in the run dir: the most likely reason for a failure."""
    lines: list[str] = []
    for log in sorted(ctx.rundir.glob("*.log")):
        lines += [ln.strip() for ln in log.read_text(errors="replace").splitlines() if ln.strip()]
    return lines[-1][:160] if lines else "(no output)"


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


class Tree:
    """The live processes under the contender's roots."""

    def __init__(self, roots: list[subprocess.Popen[bytes]]) -> None:
        self.roots = roots

    def processes(self) -> list[psutil.Process]:
        found: list[psutil.Process] = []
        for root in self.roots:
            try:
                proc = psutil.Process(root.pid)
                found += [proc, *proc.children(recursive=True)]
            except psutil.Error:
                continue  # already gone
        return found

    def rss(self) -> int:
        total = 0
        for proc in self.processes():
            try:
                total += proc.memory_info().rss
            except psutil.Error:
                pass
        return total

    def cpu_secs(self) -> float:
        total = 0.0
        for proc in self.processes():
            try:
                t = proc.cpu_times()
                total += t.user + t.system + t.children_user + t.children_system
            except psutil.Error:
                pass
        return total


def stop_tree(roots: list[subprocess.Popen[bytes]], sig: int = signal.SIGTERM, grace_secs: float = 15.0,
              ) -> bool:
    """Ask every root's process group to stop with ``sig``; SIGKILL whatever is left after
    ``grace_secs`` (descendants in other groups included). True if all stopped in time."""
    descendants = Tree(roots).processes()
    for root in roots:
        if root.poll() is None:
            try:
                os.killpg(root.pid, sig)
            except ProcessLookupError:
                pass
    deadline = time.monotonic() + grace_secs
    clean = True
    for root in roots:
        try:
            root.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            clean = False
    for proc in descendants:
        try:
            if proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE:
                proc.kill()
                clean = False
        except psutil.Error:
            pass
    for root in roots:
        if root.poll() is None:
            try:
                os.killpg(root.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            root.wait()
    return clean


def wait_exit(roots: list[subprocess.Popen[bytes]], timeout_secs: float) -> list[int | None]:
    """Wait up to ``timeout_secs`` for every root to exit; their return codes (None: still running)."""
    deadline = time.monotonic() + timeout_secs
    for root in roots:
        try:
            root.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            pass
    return [root.poll() for root in roots]


def drain(ctx: RunContext, start: Callable[[RunContext], list[subprocess.Popen[bytes]]],
          target: int, done_by_exit: bool = False) -> tuple[Measurement, list[subprocess.Popen[bytes]]]:
    """Launch the contender and wait until ``target`` tasks are done, an error, or the timeout.

    Returns the measurement and the still-owned processes (the caller stops or awaits them).
    """
    m = Measurement()
    ru0 = _children_cpu()
    t0 = time.perf_counter()
    roots = start(ctx)
    tree = Tree(roots)
    next_sample = t0
    while True:
        now = time.perf_counter()
        codes = [root.poll() for root in roots]
        if done_by_exit:
            done = target if all(c == 0 for c in codes) else 0
        else:
            done = ctx.done_count()
        if done and m.first_secs is None and not done_by_exit:
            m.first_secs = now - t0
        if done >= target:
            break
        failed = [c for c in codes if c not in (None, 0)]
        if failed:
            m.error = f"exited {failed[0]} after {done}/{target} tasks: {last_log_line(ctx)}"
            break
        if all(c is not None for c in codes):
            if ctx.done_count() < target:  # exited 0 with work left: read once more, then give up
                m.error = f"exited after {ctx.done_count()}/{target} tasks: {last_log_line(ctx)}"
                break
            continue
        if now - t0 > ctx.timeout_secs:
            m.error = f"timeout after {ctx.timeout_secs:.0f} s ({done}/{target} tasks done)"
            break
        if now >= next_sample:
            m.peak_rss = max(m.peak_rss, tree.rss())
            next_sample = now + (0.025 if now - t0 < 1.0 else 0.1)
        time.sleep(POLL_SECS)
    if not m.error:
        m.wall_secs = now - t0
        m.cpu_secs = tree.cpu_secs() + _children_cpu() - ru0
        m.peak_rss = max(m.peak_rss, tree.rss())
    return m, roots
