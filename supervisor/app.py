"""leasetree's own tree, built from the config: reaper, executor pool, leaser; and the commands that
talk to a running tree (status, stop).

```
root (strategy from [supervisor])
├── reaper     worker   — first: completions always have a home
├── executors  supervisor, simple_one_for_one, `count` executor processes
└── leaser     worker   — last: it never leases before anyone can run; stopped first, so it can drain
```
The leaser stops first on a warm stop and drains: it releases what it has not dispatched, waits for
the running tasks and forwards their outcomes to the reaper, then exits; the executors then stop
idle, and the reaper flushes every settlement before it goes.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import sys
import time
from typing import Any

from children.backends import SCHEMES, BackendError, open_backend, redact_url, scheme_of
from config.schema import Config
from supervisor.exits import EXIT_GAVE_UP, EXIT_OK, EXIT_USAGE
from supervisor.logconfig import setup_logging
from supervisor.rundir import RuntimeDirError, runtime_dir
from supervisor.spec import ChildSpec, SupervisorStart, SupFlags

log = logging.getLogger("root")


class PreflightError(Exception):
    """The config is valid but cannot run here (bad command, unreachable module, bad database)."""


def shutdown_of(value: Any) -> float | str:
    return value if isinstance(value, str) else float(value)


def executor_count(cfg: Config) -> int:
    return int(cfg.executors.count) or (os.cpu_count() or 1)


def build_tree(cfg: Config, burst: bool = False) -> tuple[SupFlags, tuple[ChildSpec, ...]]:
    """The root's flags and children for this config (pure)."""
    data = cfg.to_dict()
    sup = cfg.supervisor
    intensity, period = int(sup.intensity), float(sup.period_secs)
    executor = ChildSpec(
        id="executor", start=("children.executor", "main", (data,)),
        restart=cfg.executors.restart, shutdown=shutdown_of(cfg.executors.shutdown_secs))
    pool = ChildSpec(
        id="executors",
        start=SupervisorStart(
            SupFlags("simple_one_for_one", intensity, period), (executor,),
            initial_extra_args=tuple((i,) for i in range(executor_count(cfg)))),
        restart="permanent", shutdown="infinity")
    reaper = ChildSpec(id="reaper", start=("children.reaper", "main", (data,)),
                       restart=cfg.reaper.restart, shutdown=shutdown_of(cfg.reaper.shutdown_secs))
    # In --burst mode the leaser exits normally once the queue is empty: it is a transient,
    # significant child, and the root shuts down with it (OTP's auto_shutdown).
    leaser = ChildSpec(id="leaser", start=("children.leaser", "main", (data, burst)),
                       restart="transient" if burst else cfg.leaser.restart,
                       shutdown=shutdown_of(cfg.leaser.shutdown_secs), significant=burst)
    flags = SupFlags(sup.strategy, intensity, period, "any_significant" if burst else "never")
    return flags, (reaper, pool, leaser)


def preflight(cfg: Config) -> None:
    """Fail fast, with one line, on what would otherwise make every child crash at start."""
    try:
        backend = open_backend(cfg.queue.url, cfg.queue.name, cfg.base_dir)
        backend.close()
    except BackendError as exc:
        raise PreflightError(str(exc)) from None
    ex = cfg.executors
    if ex.callable:
        module = ex.callable.partition(":")[0]
        saved = list(sys.path)
        sys.path[:0] = list(ex.python_path)
        try:
            found = importlib.util.find_spec(module) is not None
        except (ImportError, ValueError):
            found = False
        finally:
            sys.path[:] = saved
        if not found:
            raise PreflightError(f"executors.callable = {ex.callable!r}: module {module!r} not found "
                                 f"(python_path = {list(ex.python_path)!r})")
    elif ex.command:
        program = ex.command[0]
        resolved = shutil.which(program) if os.sep not in program else program
        if not resolved or not os.path.isfile(resolved):
            raise PreflightError(f"executors.command = {list(ex.command)!r}: {program!r} not found")
        if not os.access(resolved, os.X_OK):
            raise PreflightError(f"executors.command = {list(ex.command)!r}: {program!r} is not executable")


def preload(cfg: Config) -> None:
    """Import the children and the backend's module now, in the root."""
    for module in ("children.leaser", "children.executor", "children.reaper", "supervisor.tree",
                   "multiprocess.popen_fork", "subprocess"):  # the runner forks through these
        importlib.import_module(module)
    scheme = scheme_of(cfg.queue.url).split("+")[-1]
    if scheme in SCHEMES:
        try:
            importlib.import_module(SCHEMES[scheme][0])
        except ImportError:
            pass  # preflight reports a missing driver in one line


def run(cfg: Config, burst: bool = False) -> int:
    """Run the tree in the foreground until it is stopped; returns the process exit code."""
    from supervisor.tree import Tree, TreeAlreadyRunning  # the process side is loaded only to run

    setup_logging(cfg.log.level, cfg.log.format)
    from supervisor.control import is_listening
    from supervisor.privileges import PrivilegeError, drop_privileges

    try:
        # Load every module the tree will use while we can still read anything (the children are
        # forked from this process), then drop: the database, the runtime dir (its path depends on
        # the uid) and every child belong to the configured user, and no task ever runs as root.
        preload(cfg)
        drop_privileges(cfg.supervisor.user, cfg.supervisor.group)
    except PrivilegeError as exc:
        print(f"supervise: {exc}", file=sys.stderr)
        return EXIT_USAGE
    from supervisor.metrics import MetricsError, QueueProbe, check_available
    from supervisor.notify import Notifier
    from supervisor.reload import ConfigReloader

    try:
        if cfg.metrics.listen and check_available():
            raise PreflightError(f"metrics.listen = {cfg.metrics.listen!r}: {check_available()}")
        preflight(cfg)
        folder = runtime_dir(cfg.path)
        if is_listening(folder):
            raise PreflightError(f"a tree is already running for {cfg.path} (runtime dir {folder})")
    except (PreflightError, RuntimeDirError) as exc:
        print(f"supervise: {exc}", file=sys.stderr)
        return EXIT_USAGE
    flags, children = build_tree(cfg, burst)
    log.info("starting: queue %s (%s), %d executors, runtime dir %s", redact_url(cfg.queue.url),
             cfg.queue.name, executor_count(cfg), folder)
    probe = QueueProbe(cfg.queue.url, cfg.queue.name, cfg.base_dir) if cfg.metrics.listen else None
    tree = Tree(flags, children, runtime_dir=folder, heartbeat_secs=float(cfg.supervisor.heartbeat_secs),
                heartbeat_timeout_secs=float(cfg.supervisor.heartbeat_timeout_secs), name="root",
                notifier=Notifier.from_env(), reloader=ConfigReloader(cfg, burst),
                metrics_listen=cfg.metrics.listen, queue_probe=probe)
    try:
        return tree.run()
    except (TreeAlreadyRunning, MetricsError) as exc:
        print(f"supervise: {exc}", file=sys.stderr)
        return EXIT_USAGE


def _call(cfg: Config, command: str, args: dict[str, Any], timeout: float = 5.0) -> Any:
    return _call_at(cfg.path, command, args, timeout, cfg.supervisor.user, cfg.supervisor.group)


def _call_at(path: Any, command: str, args: dict[str, Any], timeout: float = 5.0,
             user: str = "", group: str = "") -> Any:
    """A control call to the tree run from the config at ``path`` (its runtime dir follows from the
    path and the user alone, so a tree can be reached even when its config no longer validates)."""
    from supervisor import control
    from supervisor.privileges import PrivilegeError, drop_privileges

    try:
        drop_privileges(user, group)  # to find that user's runtime dir
    except PrivilegeError as exc:
        raise control.ControlError(str(exc)) from None

    return control.call(runtime_dir(path), command, args, timeout)


def status(cfg: Config, as_json: bool = False) -> int:
    """Print the running tree's children and task counters."""
    from supervisor.control import ControlError

    try:
        result = _call(cfg, "status", {})
    except ControlError as exc:
        print(f"supervise: {exc}", file=sys.stderr)
        return EXIT_GAVE_UP
    if as_json:
        print(json.dumps(result, indent=2, sort_keys=True, default=str))
        return EXIT_OK
    print(format_status(result))
    return EXIT_OK


def format_status(result: dict[str, Any]) -> str:
    lines = [f"{'CHILD':<14} {'PID':>7} {'STATE':<11} {'RESTARTS':>8} {'UPTIME':>9}"]
    for child in result.get("children", []):
        uptime = child.get("uptime")
        lines.append(f"{child.get('id', '?'):<14} {child.get('pid') or '-':>7} {child.get('state', '?'):<11} "
                     f"{child.get('restarts', 0):>8} {duration(uptime):>9}")
    stats = result.get("stats", {})
    leaser, reaper = stats.get("leaser", {}), stats.get("reaper", {})
    executors = [v for k, v in stats.items() if k.startswith("executor.")]
    running = sum(int(e.get("running", 0)) for e in executors)
    lines.append("")
    lines.append(
        f"tasks: leased {leaser.get('leased_total', 0)}, running {running}, "
        f"done {leaser.get('succeeded_total', 0)}, failed {leaser.get('failed_total', 0)}, "
        f"acked {reaper.get('acked_total', 0)}, released {reaper.get('released_total', 0)}, "
        f"dead-lettered {reaper.get('dead_total', 0) + leaser.get('dead_lettered_total', 0)}")
    rates = result.get("rates", {})
    if rates:
        lines.append("rates: " + ", ".join(f"{k} {v:.1f}/s" for k, v in sorted(rates.items())))
    last = (result.get("reload") or {}).get("last")
    if last:
        generation = result["reload"].get("generation", 0)
        state = "running" if result["reload"].get("running") else ("failed" if not last.get("ok") else
                                                                    "done")
        detail = last.get("error") or "; ".join(last.get("problems") or []) or \
            ", ".join(last.get("changed") or []) or "no change"
        lines.append(f"reload: generation {generation} {state}: {detail}")
    return "\n".join(lines)


def reload(cfg: Config) -> int:
    """Ask the running tree to re-read its config. Exit 2 (and the reason on stderr) when it
    refused the new config, which leaves the running one in place."""
    from supervisor.control import ControlError, NoTreeRunning

    try:
        result = _call(cfg, "reload", {}, timeout=30.0)
    except NoTreeRunning as exc:
        print(f"supervise: {exc}", file=sys.stderr)
        return EXIT_GAVE_UP
    except ControlError as exc:
        print(f"supervise: {exc}", file=sys.stderr)
        return EXIT_USAGE
    if isinstance(result, dict) and result.get("queued"):
        print("reload queued behind the one in progress")
    elif isinstance(result, dict) and not result.get("changed"):
        print(f"reloaded (generation {result.get('generation')}): no change")
    elif isinstance(result, dict):
        print(f"reloading (generation {result.get('generation')}): changed {', '.join(result['changed'])}; "
              f"restarting {', '.join(result.get('restarting') or []) or 'none'} one at a time; "
              f"executors {result.get('executors')}")
    return EXIT_OK


def duration(secs: Any) -> str:
    """An uptime for people: 42s, 3m07s, 5h02m."""
    if not isinstance(secs, (int, float)):
        return "-"
    secs = int(secs)
    if secs < 60:
        return f"{secs}s"
    if secs < 3600:
        return f"{secs // 60}m{secs % 60:02d}s"
    return f"{secs // 3600}h{secs % 3600 // 60:02d}m"


def _alive(pid: int) -> bool:
    """True while ``pid`` runs; a zombie (exited, not yet reaped by its parent) counts as gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as handle:
            return handle.read().rsplit(b")", 1)[1].split()[0] != b"Z"
    except OSError:
        return False


def stop(cfg: Config, cold: bool = False) -> int:
    """Ask the running tree to stop (warm: drain; cold: kill tasks and release them) and wait for it
    to be gone."""
    return stop_at(cfg.path, cold, cfg.supervisor.user, cfg.supervisor.group)


def stop_at(path: Any, cold: bool = False, user: str = "", group: str = "") -> int:
    """``stop`` by the config's path alone: works when the config on disk is broken."""
    from supervisor.control import ControlError

    try:
        result = _call_at(path, "stop", {"cold": cold}, user=user, group=group)
    except ControlError as exc:
        print(f"supervise: {exc}", file=sys.stderr)
        return EXIT_GAVE_UP
    pid = result.get("pid") if isinstance(result, dict) else None
    # Like supervisorctl, return once it is gone: the tree bounds its own shutdown (shutdown_secs).
    while pid and _alive(int(pid)):
        time.sleep(0.05)  # waiting on another process with no handle to it: a short poll is all there is
    print("stopped" if cold else "stopped (drained)")
    return EXIT_OK
