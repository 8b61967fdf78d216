#!/usr/bin/env python3
"""Is the tree's memory flat over a long run? Drain N no-op callable tasks (default 1,000,000) from
SQLite with 2 executors and print the tree's memory (sum of PSS and of RSS over its processes) at
every tenth of the work, and the change from the first tenth to the last.

    python scripts/bench_memory.py [--tasks 1000000]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))

from bench_pipeline import fill, tree_memory_kb, write_config  # noqa: E402

from children.backends import open_backend  # noqa: E402
from config import load  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", type=int, default=1_000_000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        config = write_config(Path(tmp), "sqlite", False, "")
        fill(config, args.tasks)
        cfg = load(config)
        backend = open_backend(cfg.queue.url, cfg.queue.name, cfg.base_dir)
        process = subprocess.Popen([sys.executable, "-m", "supervisor", "run", "--burst", str(config)],
                                   cwd=REPO)
        samples: list[tuple[int, float, float]] = []
        next_tenth = 1
        started = time.perf_counter()
        while process.poll() is None:
            time.sleep(0.2)
            done = args.tasks - backend.stats().ready
            if done >= next_tenth * args.tasks // 10 and next_tenth <= 9:
                rss, pss = tree_memory_kb(process.pid)
                samples.append((done, rss / 1024, pss / 1024))
                next_tenth += 1
        elapsed = time.perf_counter() - started
        backend.close()
    if process.returncode != 0 or len(samples) < 2:
        print(f"run failed or too short: exit {process.returncode}, {len(samples)} samples")
        return 1
    print(f"{args.tasks:,} no-op tasks, SQLite, 2 executors: {args.tasks / elapsed:,.0f} tasks/s")
    print(f"{'done':>10} {'RSS MB':>8} {'PSS MB':>8}")
    for done, rss, pss in samples:
        print(f"{done:>10,} {rss:>8.1f} {pss:>8.1f}")
    first, last = samples[0], samples[-1]
    print(f"change from the first sample to the last: RSS {100 * (last[1] / first[1] - 1):+.1f} %, "
          f"PSS {100 * (last[2] / first[2] - 1):+.1f} %")
    return 0


if __name__ == "__main__":
    sys.exit(main())
