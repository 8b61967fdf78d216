"""Side-by-side speed benchmark: leasetree against Celery, Huey, Dramatiq, RQ, multiprocessing.Pool, a raw
zmq pipeline and a port of the seed puller, on this machine, in one run.

    python scripts/bench/run.py                 # no-op tasks, N=20000, 3 repeats, round-robin
    python scripts/bench/run.py --quick         # N=2000, 1 repeat
    python scripts/bench/run.py --commands      # /bin/true per task (N=5000)
    python scripts/bench/run.py --sleep-ms 1 10 # tasks that sleep: overhead as a share of useful work
    python scripts/bench/run.py --latency       # enqueue -> start on an idle worker, p50/p99
    python scripts/bench/run.py --all --markdown docs/bench.md --png bench.png

Every contender drains the same N tasks, pre-filled (not timed), with 2 worker processes; the clock
runs from launching its workers to the last task body done (``harness.py`` says exactly how, and
how CPU and RSS are counted). Repeats alternate between contenders. A contender that fails shows
``error: <reason>`` in its row; the run goes on. See docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import compileall
import math
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent.parent
DEFAULT_REDIS = "redis://127.0.0.1:6379/9"  # db 9: the benchmark's own, away from the test suites


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="N=2000 (commands 500), 1 repeat, fewer samples")
    p.add_argument("-n", type=int, help="no-op tasks per run (default 20000; 2000 with --quick)")
    p.add_argument("--repeats", type=int, help="runs per contender, round-robin (default 3; 1 with --quick)")
    p.add_argument("--commands", action="store_true", help="the /bin/true command table")
    p.add_argument("--commands-n", type=int, help="command tasks per run (default 5000; 500 with --quick)")
    p.add_argument("--sleep-ms", type=float, nargs="+", default=[], metavar="MS",
                   help="tables of tasks that sleep MS milliseconds (N sized for ≈ 5 s of ideal work)")
    p.add_argument("--latency", action="store_true", help="the enqueue -> start latency table")
    p.add_argument("--noop", action="store_true", help="also the no-op table when another table is chosen")
    p.add_argument("--all", action="store_true", help="every table (sleep 1 and 10 ms)")
    p.add_argument("--only", help="comma-separated contenders to run (prefix match: 'rq' = rq, rq-simple)")
    p.add_argument("--skip", help="comma-separated contenders to leave out (prefix match)")
    p.add_argument("--markdown", type=Path, metavar="FILE", help="also write the tables as Markdown")
    p.add_argument("--png", type=Path, metavar="FILE", help="also write a bar chart (matplotlib, Agg)")
    p.add_argument("--redis-url", default=DEFAULT_REDIS,
                   help=f"Redis of the Redis contenders ({DEFAULT_REDIS})")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds one contender run may take (300)")
    p.add_argument("--seed-max", type=int, default=100,
                   help="cap on seed-port tasks: it drains ≈ 5 tasks/s by design (100)")
    p.add_argument("--rq-fork-max", type=int, default=4000,
                   help="cap on tasks of the forking rq row: ≈ 60–120 tasks/s here (4000)")
    p.add_argument("--dramatiq-prefetch", type=int, default=100, help="the tuned dramatiq prefetch (100)")
    p.add_argument("--samples", type=int, help="latency samples per contender (200; 50 with --quick)")
    p.add_argument("--interval-ms", type=float, default=20.0, help="latency: one enqueue every MS (20)")
    p.add_argument("--keep", action="store_true", help="keep each run's folder (logs, queue files)")
    args = p.parse_args(argv)
    if args.all:
        args.commands = args.latency = args.noop = True
        args.sleep_ms = args.sleep_ms or [1.0, 10.0]
    if not (args.commands or args.sleep_ms or args.latency):
        args.noop = True
    args.n = args.n or (2000 if args.quick else 20000)
    args.repeats = args.repeats or (1 if args.quick else 3)
    args.commands_n = args.commands_n or (500 if args.quick else 5000)
    args.samples = args.samples or (50 if args.quick else 200)
    for name in ("n", "repeats", "commands_n", "samples", "seed_max", "rq_fork_max", "dramatiq_prefetch"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} = {getattr(args, name)}: must be at least 1")
    if any(ms <= 0 for ms in args.sleep_ms):
        p.error(f"--sleep-ms {args.sleep_ms}: every value must be above 0")
    return args


def one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:200]


def select(contenders: list, mode: str, args: argparse.Namespace) -> list:
    def matches(name: str, spec: str | None) -> bool:
        return bool(spec) and any(name == s or name.startswith(s + "-") for s in spec.split(","))

    chosen = [c for c in contenders if mode in c.modes]
    if args.only:
        chosen = [c for c in chosen if matches(c.name, args.only)]
    if args.skip:
        chosen = [c for c in chosen if not matches(c.name, args.skip)]
    return chosen


class Bench:
    """Runs the tables; owns the scratch folder and the base environment of every contender."""

    def __init__(self, args: argparse.Namespace, workroot: Path) -> None:
        self.args = args
        self.workroot = workroot
        self.seq = 0
        self.env = dict(os.environ)
        self.env["PYTHONPATH"] = os.pathsep.join(
            [str(BENCH_DIR), str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])])
        self.env["BENCH_REDIS_URL"] = args.redis_url
        self.env["BENCH_HUEY_DB"] = str(workroot / "huey.db")
        self.env["PYTHONDONTWRITEBYTECODE"] = "1"
        # The peers run from site-packages, byte-compiled by pip when they were installed; an
        # editable leasetree and the bench's own modules would be compiled from source at every
        # start (PYTHONDONTWRITEBYTECODE): compile them once, as an install would.
        for folder in (REPO / "supervisor", REPO / "children", REPO / "config", BENCH_DIR):
            compileall.compile_dir(folder, quiet=1)
        os.environ["BENCH_REDIS_URL"] = args.redis_url  # read by the peer app modules the harness imports
        os.environ["BENCH_HUEY_DB"] = self.env["BENCH_HUEY_DB"]

    def context(self, name: str, n: int, mode: str, sleep_ms: float = 0.0):  # -> RunContext
        from harness import RunContext

        self.seq += 1
        rundir = self.workroot / f"{self.seq:03d}-{name}"
        rundir.mkdir(mode=0o700)
        env = dict(self.env)
        env["BENCH_DONE_FILE"] = str(rundir / "done")
        env["BENCH_SLEEP_MS"] = str(sleep_ms) if sleep_ms else ""
        return RunContext(n=n, rundir=rundir, bench_dir=BENCH_DIR, redis_url=self.args.redis_url,
                          timeout_secs=self.args.timeout, mode=mode, sleep_ms=sleep_ms, env=env)

    def done_with(self, ctx) -> None:
        if not self.args.keep:
            shutil.rmtree(ctx.rundir, ignore_errors=True)

    def run_once(self, contender, n: int, mode: str, sleep_ms: float = 0.0):  # -> Measurement
        from harness import Measurement, drain, stop_tree

        ctx = self.context(contender.name, n, mode, sleep_ms)
        target = contender.task_count(n)
        procs = []
        try:
            contender.prepare(ctx)
            # a command task (/bin/true) cannot write the done-file: such runs end when all exit 0
            by_exit = contender.done_by_exit or mode == "command"
            m, procs = drain(ctx, contender.start, target, by_exit)
            notes = contender.finish(ctx, procs)
            procs = []
            if not m.error:  # after a failure, how it stopped is noise
                m.notes += notes
            left = contender.left(ctx) if by_exit and not m.error and mode != "latency" else None
            if left:
                m.error = f"exited with {left} of {target} task(s) still in the queue"
            if not by_exit and not m.error and ctx.done_count() > target:
                m.notes.append(f"{ctx.done_count() - target} task(s) ran twice")
        except Exception as exc:  # any failure of one contender is its row's error, never the run's
            m = Measurement(error=one_line(exc))
        finally:
            if procs:
                stop_tree(procs, grace_secs=5.0)
            try:
                contender.cleanup(ctx)
            except Exception as exc:
                print(f"  {contender.name}: cleanup failed: {one_line(exc)}", file=sys.stderr)
            self.done_with(ctx)
        return m

    def throughput(self, contenders: list, n: int, mode: str, sleep_ms: float = 0.0) -> list:
        from report import Row

        rows = {c.name: Row(c.name, c.task_count(n), c.note) for c in contenders}
        for rep in range(self.args.repeats):
            for c in contenders:
                row = rows[c.name]
                if row.errors and not row.rates:
                    continue  # it failed before: do not spend another timeout on it
                m = self.run_once(c, n, mode, sleep_ms)
                row.add(m)
                shown = m.error or f"{row.tasks / m.wall_secs:,.0f} tasks/s, cpu {m.cpu_secs:.2f} s"
                print(f"  [{rep + 1}/{self.args.repeats}] {c.name}: {shown}", file=sys.stderr, flush=True)
        return list(rows.values())

    def latency(self, contenders: list) -> list:
        from harness import Measurement
        from report import Row

        rows = []
        for c in contenders:
            row = Row(c.name, self.args.samples, c.note.replace(" --burst", "").split("; ≤")[0])
            ctx = self.context(c.name, self.args.samples, "latency")
            procs = []
            try:
                c.prepare(ctx)
                procs = c.start(ctx)
                row.latency_ms = self.sample_latency(c, ctx, procs)
                if not row.latency_ms:
                    row.errors.append("no task started")
            except Exception as exc:
                row.add(Measurement(error=one_line(exc)))
            finally:
                if procs:
                    c.finish(ctx, procs)
                try:
                    c.cleanup(ctx)
                except Exception as exc:
                    print(f"  {c.name}: cleanup failed: {one_line(exc)}", file=sys.stderr)
                self.done_with(ctx)
            shown = (f"p50 {sorted(row.latency_ms)[len(row.latency_ms) // 2]:.1f} ms" if row.latency_ms
                     else f"error: {row.errors[0] if row.errors else '?'}")
            print(f"  latency {c.name}: {shown}", file=sys.stderr, flush=True)
            rows.append(row)
        return rows

    def sample_latency(self, c, ctx, procs) -> list[float]:
        from harness import last_log_line

        def lines() -> list[str]:
            try:
                return ctx.done_file.read_text().splitlines()
            except FileNotFoundError:
                return []

        def wait_lines(count: int, timeout: float, what: str) -> None:
            deadline = time.monotonic() + timeout
            while len(lines()) < count:
                codes = [p.poll() for p in procs]
                if any(code is not None for code in codes):
                    raise RuntimeError(f"exited {codes} {what}: {last_log_line(ctx)}")
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{what}: {len(lines())}/{count} tasks started in {timeout:.0f} s")
                time.sleep(0.005)

        c.enqueue_one(ctx, "warmup")  # the first task pays for imports and connections; not sampled
        wait_lines(1, 60.0, "waiting for the warm-up task")
        interval = self.args.interval_ms / 1000.0
        start = time.monotonic()
        for i in range(self.args.samples):
            c.enqueue_one(ctx, repr(time.time()))
            time.sleep(max(0.0, start + (i + 1) * interval - time.monotonic()))
        wait_lines(self.args.samples + 1, 30.0, "waiting for the samples")
        out = []
        for line in lines():
            enq, _, started = line.partition(" ")
            if enq != "warmup":
                out.append((float(started) - float(enq)) * 1000.0)
        return out


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    sys.path[:0] = [str(BENCH_DIR), str(REPO)]
    from contenders import all_contenders
    from report import footnotes, latency_table, render_markdown, render_text, throughput_table, write_png

    contenders = all_contenders(args.seed_max, args.rq_fork_max, args.dramatiq_prefetch)
    workroot = Path(tempfile.mkdtemp(prefix="ltbench-"))
    bench = Bench(args, workroot)
    tables: list[tuple[str, list, str]] = []  # (title, rows, kind)
    started = time.monotonic()
    try:
        if args.noop:
            title = f"No-op tasks: N={args.n}, 2 workers, {args.repeats} repeat(s)"
            print(title, file=sys.stderr)
            tables.append((title, bench.throughput(select(contenders, "noop", args), args.n, "noop"), ""))
        if args.commands:
            title = f"/bin/true per task: N={args.commands_n}, 2 workers, {args.repeats} repeat(s)"
            print(title, file=sys.stderr)
            rows = bench.throughput(select(contenders, "command", args), args.commands_n, "command")
            tables.append((title, rows, ""))
        for ms in args.sleep_ms:
            n = math.ceil(2 * (1.0 if args.quick else 5.0) * 1000.0 / ms)
            title = f"Tasks sleeping {ms:g} ms: N={n} (ideal {n * ms / 2000:.1f} s on 2 workers), " \
                    f"{args.repeats} repeat(s)"
            print(title, file=sys.stderr)
            tables.append((title, bench.throughput(select(contenders, "sleep", args), n, "noop", ms),
                           f"sleep:{ms}"))
        if args.latency:
            title = (f"Enqueue → start latency on an idle worker: {args.samples} tasks, one every "
                     f"{args.interval_ms:g} ms")
            print(title, file=sys.stderr)
            tables.append((title, bench.latency(select(contenders, "latency", args)), "latency"))
    finally:
        if not args.keep:
            shutil.rmtree(workroot, ignore_errors=True)

    text, markdown = [], [f"Measured {time.strftime('%Y-%m-%d %H:%M')} on {os.cpu_count()} CPUs, "
                          f"Python {sys.version.split()[0]}; total {time.monotonic() - started:.0f} s.", ""]
    for title, rows, kind in tables:
        if kind == "latency":
            header, cells = latency_table(rows)
        else:
            header, cells = throughput_table(rows, float(kind.split(":")[1]) if kind else 0.0)
        notes = footnotes(rows)
        text.append(render_text(title, header, cells, notes))
        markdown.append(render_markdown(title, header, cells, notes))
    print("\n\n".join(text))
    if args.markdown:
        args.markdown.write_text("\n".join(markdown))
    if args.png:
        write_png(args.png, [(t, rows) for t, rows, kind in tables if kind != "latency"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
