#!/usr/bin/env python3
"""Drain N no-op callable tasks and M `/bin/true` command tasks through `supervise run --burst` with
2 executors, and print tasks/s, CPU seconds per 1,000 tasks and the tree's peak RSS.

    python scripts/bench_pipeline.py [--tasks 100000] [--commands 5000] [--repeat 3] [--backend sqlite]

The queue is filled before the clock starts; the time runs from starting `supervise` to its exit, so
start-up and shutdown (about 0.3 s) are included. CPU is that of the whole tree (root, guard, leaser,
executors, reaper) from getrusage of the waited-for process tree; memory is sampled every 50 ms
over every process of the tree, as the sum of RSS and the sum of PSS (shared pages split).
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from children.backends import open_backend  # noqa: E402
from config import load  # noqa: E402

NOOP = "def noop(task):\n    return None\n"
URLS = {"sqlite": "sqlite:///bench.db", "redis": "redis://127.0.0.1:6379/9",
        "postgresql": "postgresql://root@127.0.0.1:5432/test"}


def write_config(folder: Path, backend: str, command: bool, extra: str) -> Path:
    (folder / "benchtasks.py").write_text(NOOP)
    target = 'command = ["/bin/true"]' if command else \
        f'callable = "benchtasks:noop"\npython_path = ["{folder}"]'
    path = folder / "bench.toml"
    path.write_text(f'[queue]\nurl = "{URLS[backend]}"\nname = "bench-{os.getpid()}"\n'
                    f"[executors]\ncount = 2\n{target}\n[log]\nlevel = \"warning\"\n{extra}\n")
    return path


def fill(config: Path, count: int) -> None:
    cfg = load(config)
    with open_backend(cfg.queue.url, cfg.queue.name, cfg.base_dir) as backend:
        backend.purge()
        for start in range(0, count, 5000):
            backend.enqueue([b"x"] * min(5000, count - start))


def tree_memory_kb(root: int) -> tuple[int, int]:
    """(RSS, PSS) of ``root`` and all its descendants, in KiB. RSS counts a page shared by forked
    processes once per process; PSS splits it among them, so the PSS sum is what the tree really
    holds."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as handle:
                fields = handle.read().rsplit(b")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(entry))
    rss = pss = 0
    stack = [root]
    while stack:
        pid = stack.pop()
        stack.extend(children.get(pid, []))
        try:
            with open(f"/proc/{pid}/smaps_rollup") as handle:
                for line in handle:
                    if line.startswith("Rss:"):
                        rss += int(line.split()[1])
                    elif line.startswith("Pss:"):
                        pss += int(line.split()[1])
        except OSError:
            continue
    return rss, pss


def run_once(config: Path, count: int) -> tuple[float, float, int, int]:
    fill(config, count)
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    process = subprocess.Popen([sys.executable, "-m", "supervisor", "run", "--burst", str(config)],
                               cwd=REPO)
    peak_rss = peak_pss = 0
    while process.poll() is None:
        rss, pss = tree_memory_kb(process.pid)
        peak_rss, peak_pss = max(peak_rss, rss), max(peak_pss, pss)
        time.sleep(0.05)
    elapsed = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if process.returncode != 0:
        raise SystemExit(f"supervise exited {process.returncode}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return count / elapsed, cpu / count * 1000, peak_rss, peak_pss


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", type=int, default=100_000)
    parser.add_argument("--commands", type=int, default=5_000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--backend", choices=sorted(URLS), default="sqlite")
    parser.add_argument("--extra", default="", help="extra TOML appended to the config")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for label, command, count in (("no-op callable", False, args.tasks),
                                      ("/bin/true command", True, args.commands)):
            if count <= 0:
                continue
            folder = Path(tmp) / label.replace(" ", "-").replace("/", "")
            folder.mkdir()
            config = write_config(folder, args.backend, command, args.extra)
            runs = [run_once(config, count) for _ in range(args.repeat)]
            rates = [r[0] for r in runs]
            rows.append((label, count, statistics.median(rates), min(rates), max(rates),
                         statistics.median(r[1] for r in runs), max(r[2] for r in runs) / 1024,
                         max(r[3] for r in runs) / 1024))
    print(f"backend: {args.backend}, 2 executors, {args.repeat} runs each")
    print(f"{'tasks':<18} {'N':>8} {'median/s':>10} {'min–max/s':>17} {'CPU s/1k':>9} "
          f"{'peak RSS MB':>12} {'peak PSS MB':>12}")
    for label, count, median, low, high, cpu, rss, pss in rows:
        print(f"{label:<18} {count:>8} {median:>10,.0f} {f'{low:,.0f}–{high:,.0f}':>17} {cpu:>9.3f} "
              f"{rss:>12.1f} {pss:>12.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
