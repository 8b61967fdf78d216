"""Benchmark the supervision tree with real processes; prints a table.

    python scripts/bench_supervisor.py [--quick] [--kills N] [--children N]

- restart latency: SIGKILL of a worker -> its replacement's Ready received by the root
  (p50 / p99 over --kills kills; target p50 <= 30 ms);
- idle CPU of a tree with 4 idle workers (root + guard + workers), over 30 s (--quick: 5 s);
  target <= 1 % of one core;
- time to start and to stop a pool of --children workers (200): from the tree's start to the
  last Ready, and from the stop request to the return of the tree's run.
"""

from __future__ import annotations

import argparse
import logging
import os
import resource
import shutil
import signal
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import supervisor.tree as tree_module  # noqa: E402
from supervisor import control  # noqa: E402
from supervisor.events import Started  # noqa: E402
from supervisor.runner import ProcessRunner  # noqa: E402
from supervisor.spec import ChildSpec, SupervisorStart, SupFlags  # noqa: E402
from supervisor.tree import Tree  # noqa: E402

IDLE = ChildSpec("w", ("tests.integration.workers", "idle", ()))
READY_TIMEOUT_SECS = 120.0


def new_rundir() -> Path:
    path = Path(tempfile.mkdtemp(prefix="ltb-"))
    os.chmod(path, 0o700)
    return path


def hook_started(on_started) -> None:
    """Call ``on_started(event, monotonic time)`` whenever the root turns a Ready into Started
    (installs a ProcessRunner subclass in supervisor.tree, for the next trees this script runs)."""
    class HookedRunner(ProcessRunner):
        def on_message(self, message, now):
            event = super().on_message(message, now)
            if isinstance(event, Started):
                on_started(event, time.monotonic())
            return event
    tree_module.ProcessRunner = HookedRunner


def in_background(tree: Tree, script, marks: dict | None = None) -> tuple[int, object]:
    """Run ``tree`` here and ``script()`` in a thread, then stop the tree; ``marks["returned"]``
    is when the tree's run returned (before the thread is joined and anything is cleaned up)."""
    result: dict = {}

    def body() -> None:
        try:
            deadline = time.monotonic() + 30
            while not control.is_listening(tree.runtime_dir):
                if time.monotonic() > deadline:
                    raise RuntimeError("tree did not come up")
                time.sleep(0.01)
            result["value"] = script()
        except BaseException as exc:
            result["error"] = exc
        finally:
            try:
                control.call(tree.runtime_dir, "stop", timeout=5)
            except control.ControlError:
                pass

    thread = threading.Thread(target=body, daemon=True)
    thread.start()
    code = tree.run()
    if marks is not None:
        marks["returned"] = time.monotonic()
    thread.join(60)
    if "error" in result:
        raise result["error"]
    return code, result.get("value")


def bench_restart_latency(kills: int) -> list[float]:
    rundir = new_rundir()
    started = threading.Event()
    last: dict = {}

    def on_started(event, at):
        last["at"] = at
        started.set()
    hook_started(on_started)
    tree = Tree(SupFlags("one_for_one", intensity=kills * 2, period=3600),
                             [ChildSpec(f"w{i}", IDLE.start) for i in range(4)], rundir, heartbeat_secs=1.0)

    def script() -> list[float]:
        latencies = []
        for n in range(kills):
            rows = control.call(rundir, "status")["children"]
            while any(r["state"] != "running" for r in rows):
                time.sleep(0.005)
                rows = control.call(rundir, "status")["children"]
            victim = rows[n % len(rows)]["pid"]
            started.clear()
            t0 = time.monotonic()
            os.kill(victim, signal.SIGKILL)
            if not started.wait(10):
                raise RuntimeError("no restart within 10 s")
            latencies.append(last["at"] - t0)
        return latencies

    try:
        return in_background(tree, script)[1]
    finally:
        shutil.rmtree(rundir, ignore_errors=True)


def cpu_seconds_of(pids: list[int]) -> float:
    total = 0.0
    for pid in pids:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


def bench_idle_cpu(seconds: float) -> tuple[float, float, float]:
    """(% of a core used by the root, by its guard, by the 4 workers) over ``seconds`` of an idle
    tree. The guard (supervisor/guard.py) is a process of the tree too, so it counts."""
    rundir = new_rundir()
    tree = Tree(SupFlags(), [ChildSpec(f"w{i}", IDLE.start) for i in range(4)], rundir, heartbeat_secs=1.0)

    def script():
        while any(r["state"] != "running" for r in control.call(rundir, "status")["children"]):
            time.sleep(0.01)
        workers = [r["pid"] for r in control.call(rundir, "status")["children"]]
        guard = [tree._runner.guard.pid]
        root0, guard0 = cpu_seconds_of([os.getpid()]), cpu_seconds_of(guard)
        workers0 = cpu_seconds_of(workers)
        t0 = time.monotonic()
        time.sleep(seconds)  # measuring an idle period is the point here
        wall = time.monotonic() - t0
        return ((cpu_seconds_of([os.getpid()]) - root0) / wall * 100,
                (cpu_seconds_of(guard) - guard0) / wall * 100,
                (cpu_seconds_of(workers) - workers0) / wall * 100)

    try:
        return in_background(tree, script)[1]
    finally:
        shutil.rmtree(rundir, ignore_errors=True)


def bench_many(count: int) -> tuple[float, float]:
    """(seconds to start ``count`` pool members, seconds to stop them)."""
    rundir = new_rundir()
    pool = SupervisorStart(SupFlags("simple_one_for_one"), (IDLE,),
                           initial_extra_args=tuple(() for _ in range(count)))
    ready = threading.Event()
    seen = {"n": 0, "at": 0.0}

    def on_started(event, at):
        seen["n"] += 1
        if seen["n"] == count:
            seen["at"] = at
            ready.set()
    hook_started(on_started)
    tree = Tree(SupFlags(), [ChildSpec("pool", pool)], rundir, heartbeat_secs=1.0)
    marks: dict = {}

    def script():
        if not ready.wait(READY_TIMEOUT_SECS):
            raise RuntimeError(f"only {seen['n']} of {count} children said Ready within "
                               f"{READY_TIMEOUT_SECS:g} s")
        marks["stop"] = time.monotonic()

    t0 = time.monotonic()
    try:
        in_background(tree, script, marks)
    finally:
        shutil.rmtree(rundir, ignore_errors=True)
    return seen["at"] - t0, marks["returned"] - marks["stop"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="5 s idle measurement instead of 30 s")
    parser.add_argument("--kills", type=int, default=100)
    parser.add_argument("--children", type=int, default=200)
    parser.add_argument("--verbose", action="store_true", help="show the tree's logs")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO if args.verbose else logging.CRITICAL)
    os.chdir(Path(__file__).resolve().parents[1])  # workers are imported as tests.integration.workers

    latencies = sorted(bench_restart_latency(args.kills))
    p50 = statistics.median(latencies) * 1000
    p99 = latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))] * 1000
    idle_secs = 5.0 if args.quick else 30.0
    root_cpu, guard_cpu, workers_cpu = bench_idle_cpu(idle_secs)
    start_secs, stop_secs = bench_many(args.children)
    rows = [
        ("restart latency p50 (SIGKILL -> Ready)", f"{p50:.1f} ms", "<= 30 ms"),
        ("restart latency p99", f"{p99:.1f} ms", ""),
        ("  over kills", f"{len(latencies)}", ">= 50"),
        (f"idle CPU, root ({idle_secs:g} s, 4 workers)", f"{root_cpu:.2f} % of a core", ""),
        ("idle CPU, guard", f"{guard_cpu:.2f} % of a core", ""),
        ("idle CPU, root + guard + 4 workers", f"{root_cpu + guard_cpu + workers_cpu:.2f} % of a core",
         "<= 1 %"),
        (f"start {args.children} children", f"{start_secs:.2f} s", ""),
        (f"stop {args.children} children", f"{stop_secs:.2f} s", ""),
    ]
    width = max(len(r[0]) for r in rows)
    print(f"{'measure':<{width}}  {'value':>20}  target")
    for name, value, target in rows:
        print(f"{name:<{width}}  {value:>20}  {target}")
    print(f"(max RSS of the root: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
