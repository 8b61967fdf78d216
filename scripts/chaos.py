"""The long chaos run: a real tree under load, its children killed and frozen at random; prints a table.

    /work/venv/bin/python scripts/chaos.py --backend sqlite|redis|postgresql|nats
                                           [--minutes 2] [--tasks 2000] [--seed 1] [--json OUT]

What it does:
1. enqueues ``--tasks`` tasks on a fresh queue (``sleep:S``, S sized so the work lasts about the whole
   run); each run of a task appends a line to a record file (``tests/integration/task_funcs.py``);
2. runs ``supervise run`` on it with ``--executors`` executors, a 2 s heartbeat timeout and an
   intensity no chaos reaches;
3. for ``--minutes``: every 0.3-1 s picks the leaser, an executor or the reaper at random and either
   ``kill -9``s it or freezes it (SIGSTOP for a random 0.5-3 s, then SIGCONT): a freeze past the
   heartbeat timeout gets it killed by the root. Just before each event it reads the tree's status
   (what ``supervise status --json`` prints): what was in flight then (tasks running, by the
   executors' ``running`` gauges or the leaser's, whichever is larger, + the leaser's ``unsettled``)
   is what that event may cost in duplicate runs;
4. waits for the queue to drain, reads the tree's state, stops it warmly, and prints the table.

Lost = a task that left the queue without ever having run; unfinished = a task still in the queue
after the drain deadline. Exit 1 if anything was lost or unfinished or the tree gave up, 2 if the
backend's server cannot be reached, else 0. ``--json`` also writes the figures to a file (the test
``tests/integration/test_chaos.py`` reads them).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from children.backends import BackendError, TaskState, open_backend  # noqa: E402
from supervisor import control  # noqa: E402
from supervisor.rundir import runtime_dir  # noqa: E402
from tests.backends import SERVER_URLS  # noqa: E402
from tests.integration.harness import SUPERVISE, RunningTree, records, write_config  # noqa: E402

BACKENDS = ("sqlite", "redis", "postgresql", "nats")
HEARTBEAT_TIMEOUT_SECS = 2.0  # a freeze of 0.5-3 s outlasts it about 40 % of the time
STOP_SECS = (0.5, 3.0)
GAP_SECS = (0.3, 1.0)
KILL_SHARE = 0.6  # the rest are freezes


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backend", choices=BACKENDS, default="sqlite")
    parser.add_argument("--url", default="", help="queue URL (default: the server on this machine)")
    parser.add_argument("--minutes", type=float, default=2.0, help="how long the chaos lasts")
    parser.add_argument("--tasks", type=int, default=2000)
    parser.add_argument("--task-secs", type=float, default=0.0,
                        help="how long one task sleeps (default: so the work lasts the whole run)")
    parser.add_argument("--executors", type=int, default=2)
    parser.add_argument("--lease-secs", type=float, default=10.0)
    parser.add_argument("--drain-secs", type=float, default=120.0,
                        help="how long to wait for the queue to drain after the chaos")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    parser.add_argument("--keep", action="store_true", help="keep the work folder (config, log, records)")
    args = parser.parse_args(argv)
    if args.minutes <= 0 or args.tasks <= 0 or args.executors <= 0:
        parser.error("--minutes, --tasks and --executors must be above 0")
    return args


def queue_url(args: argparse.Namespace) -> str:
    if args.url:
        return args.url
    return "sqlite:///tasks.db" if args.backend == "sqlite" else SERVER_URLS[args.backend]


def status_now(tree: RunningTree) -> dict[str, Any] | None:
    """What ``supervise status --json`` prints, asked from this process: no interpreter to start, so
    the in-flight figures are milliseconds old when the event lands, not half a second."""
    try:
        return control.call(runtime_dir(tree.config, create=False), "status", {}, timeout=10)
    except control.ControlError:
        return None


def workers(status: dict[str, Any]) -> dict[str, int]:
    """Worker id -> pid, from a ``status --json`` answer (supervisors nest their children)."""
    found: dict[str, int] = {}
    stack = list(status.get("children", []))
    while stack:
        child = stack.pop()
        stack.extend(child.get("children", []))
        if child.get("type", "worker") == "worker" and child.get("pid"):
            found[child["id"]] = child["pid"]
    return found


def in_flight(status: dict[str, Any]) -> dict[str, int]:
    """What a crash could run twice now: tasks running in executors, and finished ones not yet acked."""
    stats = status.get("stats", {})
    leaser = stats.get("leaser", {})
    running = sum(int(s.get("running", 0)) for k, s in stats.items() if k.startswith("executor."))
    return {"running": running, "unsettled": int(leaser.get("unsettled", 0)),
            "leaser_running": int(leaser.get("running", 0)), "ledger": int(leaser.get("in_flight", 0))}


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as handle:
            return handle.read().rsplit(b")", 1)[1].split()[0] != b"Z"
    except OSError:
        return False


def role(child_id: str) -> str:
    return "executor" if child_id.startswith("executor.") else child_id


def chaos(tree: RunningTree, record: Path, seconds: float, rng: random.Random) -> list[dict[str, Any]]:
    """Kill and freeze children of ``tree`` at random for ``seconds``; one dict per event, with what
    was in flight just before it and how many tasks had started by then (``started``)."""
    events: list[dict[str, Any]] = []
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        if tree.process.poll() is not None:
            break  # the tree gave up: the table will say so
        status = status_now(tree)
        pids = workers(status or {})
        if not pids:
            continue
        victim = rng.choice(sorted(pids))
        pid = pids[victim]
        event: dict[str, Any] = {"victim": victim, "pid": pid, "started": len(records(record)),
                                 **in_flight(status or {})}
        if rng.random() < KILL_SHARE:
            event["kind"] = "kill"
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        else:
            event["kind"] = "stop"
            event["secs"] = round(rng.uniform(*STOP_SECS), 2)
            try:
                os.kill(pid, signal.SIGSTOP)
                time.sleep(event["secs"])  # the freeze itself, not a synchronisation
            except ProcessLookupError:
                pass
            finally:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGCONT)
            # killed by the root at the heartbeat timeout while frozen (SIGKILL works on a stopped
            # process; the root reaps it at once)
            event["killed"] = not alive(pid)
        events.append(event)
        time.sleep(rng.uniform(*GAP_SECS))  # the chaos cadence, not a synchronisation
    return events


def wait_drained(config_url: str, name: str, base_dir: Path, deadline: float) -> tuple[bool, float]:
    """Poll the queue until nothing is ready, leased or delayed; (drained, seconds waited)."""
    start = time.monotonic()
    with open_backend(config_url, name, base_dir) as backend:
        while True:
            try:
                stats = backend.stats()
                if stats.ready == stats.leased == stats.delayed == 0:
                    return True, time.monotonic() - start
            except BackendError:
                pass  # a transient fault of the server: ask again
            if time.monotonic() > deadline:
                return False, time.monotonic() - start
            time.sleep(0.2)


def tally(ids: list[str], runs: dict[str, int], backend) -> dict[str, int]:
    """Lost, unfinished, dead and duplicate counts from the record file and what is left in the queue."""
    wanted = set(ids)
    never_ran = [task_id for task_id in ids if task_id not in runs]
    left = {task_id: backend.get(task_id) for task_id in never_ran}
    dead = {t.task_id for t in backend.list_tasks(TaskState.DEAD, limit=len(ids) + 1)}
    return {
        "lost": sum(1 for info in left.values() if info is None),
        "unfinished": sum(1 for info in left.values() if info is not None and info.state != TaskState.DEAD),
        "dead": len(dead),
        "ran": sum(1 for task_id in ids if task_id in runs),
        "duplicates": sum(count - 1 for task_id, count in runs.items() if task_id in wanted),
        "runs": sum(runs.values()),
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    folder = Path(tempfile.mkdtemp(prefix=f"leasetree-chaos-{args.backend}-"))
    url, name = queue_url(args), f"chaos-{uuid.uuid4().hex[:10]}"
    seconds = args.minutes * 60
    # sized to keep the executors busy for the whole run even without the chaos's slowdowns
    task_secs = args.task_secs or round(seconds * args.executors / args.tasks, 4)
    rng = random.Random(args.seed)
    config = write_config(
        folder, "chaos.toml", queue={"url": url, "name": name},
        leaser={"lease_secs": args.lease_secs},
        executors={"count": args.executors},
        retry={"max_attempts": 100},  # a task whose executor is killed again and again must not die
        supervisor={"intensity": 100_000, "period_secs": 60, "heartbeat_secs": 0.5,
                    "heartbeat_timeout_secs": HEARTBEAT_TIMEOUT_SECS, "shutdown_secs": 20})
    record = folder / "runs.txt"
    summary: dict[str, Any] = {"backend": args.backend, "seconds": seconds, "tasks": args.tasks,
                               "task_secs": task_secs, "executors": args.executors, "slots": 1,
                               "seed": args.seed}
    try:
        with open_backend(url, name, folder) as backend:
            ids: list[str] = []
            for start in range(0, args.tasks, 500):
                count = min(500, args.tasks - start)
                ids += backend.enqueue([f"sleep:{task_secs}".encode()] * count)
        with RunningTree(config, record) as tree:
            tree.wait_ready(timeout=60)
            started = time.monotonic()
            events = chaos(tree, record, seconds, rng)
            summary["chaos_secs"] = round(time.monotonic() - started, 1)
            summary["ran_during_chaos"] = len(records(record))
            drained, waited = wait_drained(url, name, folder, time.monotonic() + args.drain_secs)
            summary["drained"], summary["drain_secs"] = drained, round(waited, 1)
            final = status_now(tree) if tree.process.poll() is None else None
            summary["tree"] = describe(final, tree)
            if final is not None:
                summary["tree"]["stop_exit"] = stop_warmly(tree)
                summary["tree"]["leftovers"] = len(tree.leftovers())  # none, after a clean stop
            summary["log"] = tree.output() if summary["tree"]["state"] != "running" else ""
        with open_backend(url, name, folder) as backend:
            summary.update(tally(ids, dict(records(record)), backend))
            backend.purge()
        summary["events"] = events
        return summary
    finally:
        if args.backend == "nats":
            with contextlib.suppress(Exception):
                from tests.integration.nats_js import drop_queue
                drop_queue(url, name)
        if args.keep:
            print(f"work folder kept: {folder}", file=sys.stderr)
        else:
            shutil.rmtree(folder, ignore_errors=True)


def stop_warmly(tree: RunningTree) -> int | None:
    """``supervise stop`` (a drain) and the tree's exit code, None if it did not exit in time.

    The stop command waits until the root's pid is gone; the root is our child, so we reap it while
    the command waits (a zombie still answers ``kill(pid, 0)``)."""
    command = subprocess.Popen([*SUPERVISE, "stop", str(tree.config)], env=tree.env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        return tree.wait_exit(timeout=60)
    except subprocess.TimeoutExpired:
        return None
    finally:
        try:
            command.wait(timeout=30)
        except subprocess.TimeoutExpired:
            command.kill()
            command.wait()


def describe(status: dict[str, Any] | None, tree: RunningTree) -> dict[str, Any]:
    """The tree's state at the end: running or not, and each worker's restarts."""
    if status is None:
        return {"state": f"exited {tree.process.returncode}", "restarts": {}}
    restarts: dict[str, int] = {}
    for child in status.get("children", []):
        restarts[role(child["id"])] = restarts.get(role(child["id"]), 0) + int(child.get("restarts", 0))
    states = {c["id"]: c.get("state") for c in status.get("children", [])}
    state = "running" if all(s == "running" for s in states.values()) else \
        "running (" + ", ".join(f"{k} {v}" for k, v in sorted(states.items()) if v != "running") + ")"
    return {"state": state, "restarts": restarts}


def figures(summary: dict[str, Any]) -> dict[str, Any]:
    """The derived figures: events by kind and victim, and duplicates against what was in flight."""
    events = summary["events"]
    kills = [e for e in events if e["kind"] == "kill"]
    stops = [e for e in events if e["kind"] == "stop"]
    deaths = kills + [e for e in stops if e["killed"]]  # every event that ended a process
    # Callable tasks run inline in their executor, whose own `running` gauge is only refreshed
    # between tasks: the leaser's view of what runs is the steadier of the two.
    at_risk = sum(max(e["running"], e["leaser_running"]) + e["unsettled"] for e in deaths)
    return {
        "kills": len(kills), "stops": len(stops), "stops_killed": sum(1 for e in stops if e["killed"]),
        "deaths": len(deaths), "at_risk": at_risk,
        "deaths_under_load": sum(1 for e in deaths if e["started"] < summary["tasks"]),
        "max_in_flight": max((e["ledger"] for e in events), default=0),
        "by_role": {r: sum(1 for e in deaths if role(e["victim"]) == r)
                    for r in ("leaser", "executor", "reaper")},
    }


def table(summary: dict[str, Any]) -> str:
    f = figures(summary)
    ratio = f"{summary['duplicates'] / f['at_risk']:.2f}" if f["at_risk"] else "-"
    tree = summary["tree"]
    restarts = ", ".join(f"{k} {v}" for k, v in sorted(tree["restarts"].items())) or "-"
    rows = [
        ("backend", f"{summary['backend']} ({summary['executors']} executors, seed {summary['seed']})"),
        ("chaos", f"{summary['chaos_secs']} s; tasks sleep {summary['task_secs']} s"),
        ("tasks", summary["tasks"]),
        ("started while the chaos lasted", summary["ran_during_chaos"]),
        ("kills (kill -9)", f"{f['kills']}"),
        ("stops (SIGSTOP 0.5-3 s)", f"{f['stops']}, {f['stops_killed']} of them killed by the root"),
        ("processes ended", "{deaths}: leaser {leaser}, executors {executor}, reaper {reaper}".format(
            deaths=f["deaths"], **f["by_role"])),
        ("  of them with tasks left to start", f["deaths_under_load"]),
        ("lost", summary["lost"]),
        ("unfinished", summary["unfinished"]),
        ("dead letters", summary["dead"]),
        ("duplicates (runs - tasks)", summary["duplicates"]),
        ("in flight at those ends (sum)", f["at_risk"]),
        ("duplicates / in flight", ratio),
        ("executor deaths x slots", f["by_role"]["executor"] * summary["slots"]),
        ("largest ledger seen", f["max_in_flight"]),
        ("drain after the chaos",
         f"{summary['drain_secs']} s" + ("" if summary["drained"] else " (NOT drained)")),
        ("tree at the end", f"{tree['state']}; restarts: {restarts}"
         + (f"; warm stop exit {tree['stop_exit']}, {tree['leftovers']} processes left"
            if "stop_exit" in tree else "")),
    ]
    width = max(len(str(k)) for k, _ in rows)
    lines = [f"| {'figure':<{width}} | value", f"|{'-' * (width + 2)}|------"]
    lines += [f"| {k:<{width}} | {v}" for k, v in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.backend != "sqlite":  # a server must answer before anything starts
        try:
            with open_backend(queue_url(args), "chaos-probe", Path.cwd()) as probe:
                probe.stats()
        except BackendError as exc:
            print(f"chaos: --backend {args.backend}: {exc}", file=sys.stderr)
            return 2
    summary = run(args)
    summary["figures"] = figures(summary)
    print(table(summary))
    if args.json:
        args.json.write_text(json.dumps(summary, indent=1))
    failed = summary["lost"] or summary["unfinished"] or summary["tree"]["state"] != "running"
    if failed and summary.get("log"):
        print(summary["log"], file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
