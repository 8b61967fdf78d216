"""`supervise top CONFIG`: a live view of a running tree, refreshed in place (``rich``, extra ``top``).

Each frame asks the root for ``status`` (children rows, aggregated stats, rates), reads
``/proc/<pid>/stat`` (utime + stime) and ``/proc/<pid>/statm`` (resident pages) for every worker pid
and the root, and asks the backend for its queue stats. CPU % is the CPU time used between two
frames over the wall time between them (``--once`` measures over a short interval of its own).
Building the frame is pure (``build_frame``); only ``main`` talks to processes and the terminal.
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass
from typing import Any

from config.schema import Config
from supervisor.app import duration
from supervisor.exits import EXIT_GAVE_UP, EXIT_OK, EXIT_USAGE

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")
ONCE_SAMPLE_SECS = 0.25  # the interval --once measures CPU over


@dataclass(frozen=True, slots=True)
class ProcSample:
    cpu_secs: float  # user + system, since the process started
    rss_bytes: int


def proc_sample(pid: int) -> ProcSample | None:
    """CPU time and RSS of ``pid`` from /proc; None when it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as handle:
            fields = handle.read().rsplit(b")", 1)[1].split()  # comm may hold spaces and ')'
        with open(f"/proc/{pid}/statm", "rb") as handle:
            resident = int(handle.read().split()[1])
    except (OSError, IndexError, ValueError):
        return None
    # after the comm: state is fields[0], so utime (field 14) is fields[11], stime fields[12]
    return ProcSample((int(fields[11]) + int(fields[12])) / CLOCK_TICKS, resident * PAGE_SIZE)


def sample_all(status: dict[str, Any]) -> dict[int, ProcSample]:
    pids = {row["pid"] for row in status.get("children", []) if row.get("pid")}
    if status.get("pid"):
        pids.add(status["pid"])
    return {pid: s for pid in pids if (s := proc_sample(pid)) is not None}


# -- the frame (pure) ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class Frame:
    children: list[tuple[str, ...]]  # CHILD PID STATE RESTARTS UPTIME CPU RSS
    pipeline: list[tuple[str, str]]
    note: str = ""


def build_frame(status: dict[str, Any], now: dict[int, ProcSample], before: dict[int, ProcSample],
                elapsed: float, queue: Any = None, queue_error: str = "") -> Frame:
    """The rows to show, from one status answer and two /proc samples ``elapsed`` seconds apart."""
    def cpu(pid: int | None) -> str:
        if not pid or pid not in now or pid not in before or elapsed <= 0:
            return "-"
        return f"{100.0 * (now[pid].cpu_secs - before[pid].cpu_secs) / elapsed:.1f}%"

    def rss(pid: int | None) -> str:
        return _bytes(now[pid].rss_bytes) if pid in now else "-"

    root_pid = status.get("pid")
    rows = [("root", str(root_pid or "-"), "running", "-", "-", cpu(root_pid), rss(root_pid))]
    for row in status.get("children", []):
        depth = max(0, (row.get("path") or "").count("/") - 1)
        name = "  " * depth + str(row.get("id", "?"))
        worker = row.get("type", "worker") == "worker"
        pid = row.get("pid") if worker else None
        rows.append((name, str(row.get("pid") or "-") if worker else "(root)", str(row.get("state", "?")),
                     str(row.get("restarts", 0)), duration(row.get("uptime")), cpu(pid), rss(pid)))
    stats = status.get("stats", {})
    leaser, reaper = stats.get("leaser", {}), stats.get("reaper", {})
    executors = [v for k, v in stats.items() if k.startswith("executor.")]
    rates = status.get("rates", {})
    pipeline = [
        ("leased", str(leaser.get("leased_total", 0))),
        ("in flight", str(leaser.get("in_flight", 0))),
        ("running", str(sum(int(e.get("running", 0)) for e in executors))),
        ("done", str(leaser.get("succeeded_total", 0))),
        ("failed", str(leaser.get("failed_total", 0))),
        ("acked", str(reaper.get("acked_total", 0))),
        ("dead", str(reaper.get("dead_total", 0) + leaser.get("dead_lettered_total", 0))),
        ("tasks/s 10s", f"{rates.get('tasks_10s', 0.0):.1f}"),
        ("tasks/s 1min", f"{rates.get('tasks_60s', 0.0):.1f}"),
    ]
    if queue is not None:
        pipeline.append(("queue", f"ready {queue.ready}, leased {queue.leased}, delayed {queue.delayed}, "
                                  f"dead {queue.dead}"))
    else:
        pipeline.append(("queue", f"unavailable: {queue_error}" if queue_error else "-"))
    return Frame(rows, pipeline)


def _bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f}{unit}" if unit == "B" else f"{n:.1f}{unit}"
        n /= 1024
    return str(n)


def render(frame: Frame, title: str) -> Any:
    """The rich renderable of a frame."""
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    children = Table(expand=False)
    for name, justify in (("CHILD", "left"), ("PID", "right"), ("STATE", "left"), ("RESTARTS", "right"),
                          ("UPTIME", "right"), ("CPU", "right"), ("RSS", "right")):
        children.add_column(name, justify=justify)  # type: ignore[arg-type]
    for row in frame.children:
        style = "" if row[2] == "running" else "bold red"
        children.add_row(*row, style=style)
    pipeline = Table(title="pipeline", title_justify="left", show_header=False)
    pipeline.add_column("what")
    pipeline.add_column("value", justify="right")
    for name, value in frame.pipeline:
        pipeline.add_row(name, value)
    parts: list[Any] = [Text(title, style="bold"), children, pipeline]
    if frame.note:
        parts.append(Text(frame.note, style="yellow"))
    return Group(*parts)


# -- the command --------------------------------------------------------------------------------------
class _Source:
    """Status from the control socket, queue stats from the backend (one connection, reopened after
    an error)."""

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.backend: Any = None

    def status(self) -> dict[str, Any]:
        from supervisor import control
        from supervisor.rundir import runtime_dir

        return control.call(runtime_dir(self.cfg.path), "status", {}, timeout=5.0)

    def queue(self) -> tuple[Any, str]:
        from children.backends import BackendError, open_backend

        try:
            if self.backend is None:
                self.backend = open_backend(self.cfg.queue.url, self.cfg.queue.name, self.cfg.base_dir)
            return self.backend.stats(), ""
        except BackendError as exc:
            self.close()
            return None, str(exc)

    def close(self) -> None:
        if self.backend is not None:
            try:
                self.backend.close()
            finally:
                self.backend = None


def main(cfg: Config, once: bool = False, interval: float = 1.0) -> int:
    """Show the tree until Ctrl-C (or one frame with ``once``); exit 1 when no tree runs (``once``)."""
    try:
        from rich.console import Console
        from rich.live import Live
    except ImportError:
        print("supervise: top needs rich (pip install 'leasetree[top]')", file=sys.stderr)
        return EXIT_USAGE
    from supervisor.control import ControlError

    source = _Source(cfg)
    title = f"leasetree {cfg.path}"
    try:
        if once:
            try:
                before, started = sample_all(source.status()), time.monotonic()
                time.sleep(ONCE_SAMPLE_SECS)  # CPU % is a rate: it needs two samples some time apart
                status = source.status()
            except ControlError as exc:
                print(f"supervise: {exc}", file=sys.stderr)
                return EXIT_GAVE_UP
            queue, error = source.queue()
            frame = build_frame(status, sample_all(status), before, time.monotonic() - started, queue, error)
            Console().print(render(frame, title))
            return EXIT_OK
        console = Console()
        before: dict[int, ProcSample] = {}
        last = time.monotonic()
        with Live(console=console, auto_refresh=False, screen=False, transient=False) as live:
            while True:
                try:
                    status = source.status()
                except ControlError as exc:
                    frame, before = Frame([], [], f"{exc}; retrying"), {}
                else:
                    now_samples, now = sample_all(status), time.monotonic()
                    queue, error = source.queue()
                    frame = build_frame(status, now_samples, before, now - last, queue, error)
                    before, last = now_samples, now
                live.update(render(frame, f"{title}  ({time.strftime('%H:%M:%S')}, every {interval:g}s, "
                                          "Ctrl-C quits)"), refresh=True)
                time.sleep(interval)  # the refresh period of a display, not a synchronisation
    except KeyboardInterrupt:
        return EXIT_OK
    finally:
        source.close()
