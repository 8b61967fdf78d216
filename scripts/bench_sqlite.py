#!/usr/bin/env python
"""Throughput of the SQLite backend: enqueue, and lease+ack in batches, on a short and a long queue.

For each queue size: a fresh database file, the queue filled by ``enqueue`` in big batches (timed),
then ``lease(batch)`` + ``ack(receipts)`` in a loop over the first ``--measure`` tasks (timed, one
thread, one connection: the cost of the backend alone). Repeated ``--runs`` times; prints the median
and the min-max of each figure. A flat lease+ack rate from the short to the long queue means the
indexes do their job.

    python scripts/bench_sqlite.py                  # 10 k and 1 M tasks, 3 runs
    python scripts/bench_sqlite.py --sizes 10000 --runs 5 --profile
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from children.backends.sqlite import SqliteBackend  # noqa: E402


def one_run(folder: Path, size: int, measure: int, batch: int, payload_bytes: int,
            profile: cProfile.Profile | None) -> tuple[float, float, float]:
    """(enqueue tasks/s, lease+ack tasks/s, stats() ms) on a fresh file holding ``size`` tasks."""
    path = folder / f"bench-{size}.db"
    for suffix in ("", "-wal", "-shm"):
        Path(f"{path}{suffix}").unlink(missing_ok=True)
    backend = SqliteBackend(f"sqlite:///{path.name}", "bench", folder)
    payload = os.urandom(payload_bytes)
    chunk = [payload] * 10_000
    started = time.perf_counter()
    for first in range(0, size, len(chunk)):
        backend.enqueue(chunk[: min(len(chunk), size - first)])
    enqueue_rate = size / (time.perf_counter() - started)
    started = time.perf_counter()
    assert backend.stats().ready == size
    stats_ms = 1000 * (time.perf_counter() - started)

    todo = min(measure, size)
    done = 0
    if profile:
        profile.enable()
    started = time.perf_counter()
    while done < todo:
        leased = backend.lease(min(batch, todo - done), 300.0)
        results = backend.ack([task.receipt for task in leased])
        done += len(results)
    elapsed = time.perf_counter() - started
    if profile:
        profile.disable()
    backend.close()
    return enqueue_rate, done / elapsed, stats_ms


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="10000,1000000", help="queue sizes, comma-separated")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--batch", type=int, default=256, help="tasks per lease and per ack")
    parser.add_argument("--measure", type=int, default=100_000, help="tasks leased+acked per run")
    parser.add_argument("--payload", type=int, default=100, help="payload bytes")
    parser.add_argument("--dir", default=None, help="folder for the database (default: a temp dir)")
    parser.add_argument("--profile", action="store_true", help="print where lease+ack time goes")
    args = parser.parse_args()

    sizes = [int(s) for s in args.sizes.split(",")]
    profile = cProfile.Profile() if args.profile else None
    with tempfile.TemporaryDirectory(prefix="bench-sqlite-", dir=args.dir) as tmp:
        rows = []
        for size in sizes:
            runs = [one_run(Path(tmp), size, args.measure, args.batch, args.payload, profile)
                    for _ in range(args.runs)]
            rows.append((size, [r[0] for r in runs], [r[1] for r in runs], [r[2] for r in runs]))

    def cell(values: list[float]) -> str:
        return f"{statistics.median(values):>9,.0f} ({min(values):,.0f}-{max(values):,.0f})"

    print(f"sqlite backend, batch {args.batch}, payload {args.payload} B, {args.runs} runs, "
          f"sqlite {__import__('sqlite3').sqlite_version}")
    print(f"{'queue size':>11} | {'enqueue tasks/s median (min-max)':<36} | "
          f"{'lease+ack tasks/s median (min-max)':<36} | stats() ms")
    print(f"{'-' * 11}-+-{'-' * 36}-+-{'-' * 36}-+-{'-' * 10}")
    for size, enqueue_rates, lease_rates, stats_ms in rows:
        print(f"{size:>11,} | {cell(enqueue_rates):<36} | {cell(lease_rates):<36} | "
              f"{statistics.median(stats_ms):>10.1f}")
    if len(rows) > 1:
        first, last = statistics.median(rows[0][2]), statistics.median(rows[-1][2])
        print(f"lease+ack at {rows[-1][0]:,} vs {rows[0][0]:,}: {100 * (last / first - 1):+.1f} %")
    if profile:
        pstats.Stats(profile).sort_stats("tottime").print_stats(12)


if __name__ == "__main__":
    main()
