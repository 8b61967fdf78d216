"""The contenders: how each one is cleaned, filled (untimed), started, stopped and asked for latency.

Every contender runs the same task body (``benchtask.noop``, or ``/bin/true`` for command tasks) on
2 worker processes. Redis contenders use the database of ``--redis-url`` (db 9 by default) and only
keys containing ``ltbench``; they delete exactly those before and after each run.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import uuid
from pathlib import Path

from harness import RunContext, spawn, stop_tree, wait_exit

Procs = list[subprocess.Popen[bytes]]
FILL_CHUNK = 1000


def python() -> str:
    return sys.executable


def console_script(name: str) -> str:
    """The venv's console script ``name`` (celery, rq, supervise, ...) next to this interpreter."""
    path = Path(sys.executable).parent / name
    return str(path) if path.exists() else name


def redis_purge(url: str) -> None:
    """Delete every key containing 'ltbench' in the bench database (and rq's set members)."""
    import redis

    client = redis.Redis.from_url(url)
    try:
        keys = list(client.scan_iter(match="*ltbench*", count=1000))
        for start in range(0, len(keys), 500):
            client.delete(*keys[start:start + 500])
        for registry in (b"rq:queues", b"rq:workers"):
            stale = [m for m in client.smembers(registry) if b"ltbench" in m]
            if stale:
                client.srem(registry, *stale)
    finally:
        client.close()


class Contender:
    """One row. Subclasses fill, start and (for latency) enqueue one task."""

    name = ""
    note = ""
    exits_when_done = False  # stops by itself after the last task (burst mode)
    done_by_exit = False  # completion = every process exited 0 (command tasks write no done-file)
    modes = ("noop", "sleep")  # the tables this contender appears in
    stop_signal = signal.SIGTERM
    max_tasks = 0  # > 0: a contender too slow for N runs only this many (its note says so)

    def task_count(self, n: int) -> int:
        return min(n, self.max_tasks) if self.max_tasks else n

    def prepare(self, ctx: RunContext) -> None:
        """Clean, then enqueue ``task_count(ctx.n)`` tasks. Not timed."""

    def left(self, ctx: RunContext) -> int | None:
        """Tasks still in the queue after the run (None: no queue to look at). A contender whose
        completion is its exit must leave none: one that gave up early is an error, not a rate."""
        return None

    def start(self, ctx: RunContext) -> Procs:
        raise NotImplementedError

    def finish(self, ctx: RunContext, procs: Procs) -> list[str]:
        """After the last task: let it exit (burst) or stop it. Returns notes for the row."""
        notes: list[str] = []
        if self.exits_when_done and ctx.mode != "latency":
            codes = wait_exit(procs, 30.0)
            if any(c is None for c in codes):
                notes.append("did not exit by itself within 30 s after the last task")
            elif any(codes):
                notes.append(f"exit code {[c for c in codes if c][0]} after the last task")
        if not stop_tree(procs, self.stop_signal):
            notes.append("needed SIGKILL to stop")
        return notes

    def cleanup(self, ctx: RunContext) -> None:
        """Remove what ``prepare`` and the run left behind."""

    def enqueue_one(self, ctx: RunContext, payload: str) -> None:
        """Latency mode: enqueue one ``stamp`` task carrying ``payload``."""
        raise NotImplementedError


# -- peers on Redis --------------------------------------------------------------------------------
class RedisPeer(Contender):
    def prepare(self, ctx: RunContext) -> None:
        redis_purge(ctx.redis_url)
        if ctx.mode != "latency":
            self.fill(ctx, self.task_count(ctx.n))

    def fill(self, ctx: RunContext, count: int) -> None:
        raise NotImplementedError

    def cleanup(self, ctx: RunContext) -> None:
        redis_purge(ctx.redis_url)


class Celery(RedisPeer):
    name = "celery"
    note = "Celery 5 prefork -c 2, Redis broker, early ack (default), prefetch ×4 (default)"
    modes = ("noop", "sleep", "latency")

    def fill(self, ctx: RunContext, count: int) -> None:
        import celery_app

        with celery_app.app.producer_or_acquire() as producer:
            for _ in range(count):
                celery_app.noop.apply_async(producer=producer)

    def start(self, ctx: RunContext) -> Procs:
        return [spawn([console_script("celery"), "-A", "celery_app", "worker", "-P", "prefork", "-c", "2",
                       "-Q", "ltbench-celery", "--without-gossip", "--without-mingle",
                       "--without-heartbeat", "--loglevel", "WARNING"], ctx, "celery.log")]

    def enqueue_one(self, ctx: RunContext, payload: str) -> None:
        import celery_app

        celery_app.stamp.apply_async((payload,))


class Dramatiq(RedisPeer):
    modes = ("noop", "sleep", "latency")

    def __init__(self, prefetch: int | None) -> None:
        self.prefetch = prefetch
        self.name = f"dramatiq-prefetch{prefetch}" if prefetch else "dramatiq"
        self.note = (f"Redis, --processes 2 --threads 1, dramatiq_queue_prefetch={prefetch}" if prefetch
                     else "Redis, --processes 2 --threads 1, default prefetch (threads×2 = 2)")

    def fill(self, ctx: RunContext, count: int) -> None:
        import dramatiq_app

        for _ in range(count):
            dramatiq_app.noop.send()

    def start(self, ctx: RunContext) -> Procs:
        env = {"dramatiq_queue_prefetch": str(self.prefetch)} if self.prefetch else {}
        return [spawn([console_script("dramatiq"), "dramatiq_app", "--processes", "2", "--threads", "1",
                       "--path", str(ctx.bench_dir)], ctx, "dramatiq.log", env)]

    def enqueue_one(self, ctx: RunContext, payload: str) -> None:
        import dramatiq_app

        dramatiq_app.stamp.send(payload)


class Rq(RedisPeer):
    exits_when_done = True
    modes = ("noop", "sleep", "latency")

    def __init__(self, simple: bool, max_tasks: int = 0) -> None:
        self.simple = simple
        self.name = "rq-simple" if simple else "rq"
        self.max_tasks = 0 if simple else max_tasks
        self.note = ("2 × rq worker --burst -w rq.worker.SimpleWorker (no fork per job)" if simple
                     else "2 × rq worker --burst (forks a work-horse per job)"
                     + (f"; ≤ {max_tasks} tasks (≈ 60–120 tasks/s)" if max_tasks else ""))

    def _queue(self, ctx: RunContext):  # noqa: ANN202 - rq's Queue, imported lazily
        import redis
        from rq import Queue

        return Queue("ltbench", connection=redis.Redis.from_url(ctx.redis_url))

    def fill(self, ctx: RunContext, count: int) -> None:
        from rq import Queue

        queue = self._queue(ctx)
        run = uuid.uuid4().hex[:8]
        for start in range(0, count, FILL_CHUNK):
            jobs = [Queue.prepare_data("benchtask.noop", job_id=f"ltbench-{run}-{i}")
                    for i in range(start, min(start + FILL_CHUNK, count))]
            with queue.connection.pipeline() as pipe:
                queue.enqueue_many(jobs, pipeline=pipe)
                pipe.execute()

    def start(self, ctx: RunContext) -> Procs:
        argv = [console_script("rq"), "worker", "-u", ctx.redis_url, "-P", str(ctx.bench_dir), "-q"]
        if ctx.mode != "latency":
            argv.append("--burst")
        if self.simple:
            argv += ["-w", "rq.worker.SimpleWorker"]
        return [spawn([*argv, "-n", f"ltbench-{self.name}-{k}-{uuid.uuid4().hex[:6]}", "ltbench"], ctx,
                      f"rq{k}.log") for k in range(2)]

    def enqueue_one(self, ctx: RunContext, payload: str) -> None:
        # one connection for all samples, as the other contenders keep theirs
        if getattr(self, "_latency_ctx", None) is not ctx:
            self._latency_queue, self._latency_ctx = self._queue(ctx), ctx
        self._latency_queue.enqueue("benchtask.stamp", payload, job_id=f"ltbench-{uuid.uuid4().hex}")


# -- huey (SQLite) ---------------------------------------------------------------------------------
class Huey(Contender):
    name = "huey"
    note = "SqliteHuey, huey_consumer -w 2 -k process (polls: -d 0.1 default)"
    modes = ("noop", "sleep", "latency")
    stop_signal = signal.SIGINT  # huey's graceful signal

    def prepare(self, ctx: RunContext) -> None:
        import huey_app

        huey_app.huey.storage.flush_all()
        if ctx.mode == "latency":
            return
        huey = huey_app.huey
        # one transaction for the whole fill (huey's own enqueue commits per task; not timed anyway)
        rows = [(huey.storage.name, huey.serialize_task(huey_app.noop.s()), 0)
                for _ in range(self.task_count(ctx.n))]
        with huey.storage.db(commit=True) as cursor:
            cursor.executemany("insert into task (queue, data, priority) values (?, ?, ?)", rows)

    def start(self, ctx: RunContext) -> Procs:
        return [spawn([console_script("huey_consumer"), "huey_app.huey", "-w", "2", "-k", "process", "-q"],
                      ctx, "huey.log")]

    def cleanup(self, ctx: RunContext) -> None:
        import huey_app

        huey_app.huey.storage.flush_all()
        huey_app.huey.storage.close()

    def enqueue_one(self, ctx: RunContext, payload: str) -> None:
        import huey_app

        huey_app.stamp(payload)


# -- no queue at all -------------------------------------------------------------------------------
class MpPool(Contender):
    exits_when_done = True

    def __init__(self, chunksize: int) -> None:
        self.chunksize = chunksize
        self.name = "mp-pool" if chunksize == 1 else f"mp-pool-chunk{chunksize}"
        self.note = f"multiprocessing.Pool(2).imap_unordered, chunksize {chunksize}; no queue"

    def start(self, ctx: RunContext) -> Procs:
        return [spawn([python(), str(ctx.bench_dir / "mp_pool.py"), str(ctx.n), str(self.chunksize)],
                      ctx, "mp_pool.log")]


class ZmqRaw(Contender):
    name = "zmq-raw"
    note = "bare pyzmq PUSH/PULL source→2 workers→sink, msgpack, 100 tasks/message; no queue"
    exits_when_done = True

    def start(self, ctx: RunContext) -> Procs:
        return [spawn([python(), str(ctx.bench_dir / "zmq_raw.py"), str(ctx.n), "100", str(ctx.rundir)],
                      ctx, "zmq_raw.log")]


# -- the product and its ancestor, on leasetree backends -------------------------------------------
def sqlite_url(ctx: RunContext) -> str:
    return f"sqlite:///{ctx.rundir / 'tasks.db'}"


def queue_left(url: str, ctx: RunContext) -> int:
    from children.backends import open_backend

    with open_backend(url, "ltbench", ctx.rundir) as backend:
        stats = backend.stats()
    return stats.ready + stats.leased + stats.delayed


def fill_backend(url: str, ctx: RunContext, payloads: list[bytes]) -> None:
    from children.backends import open_backend

    with open_backend(url, "ltbench", ctx.rundir) as backend:
        backend.purge()
        for start in range(0, len(payloads), FILL_CHUNK):
            backend.enqueue(payloads[start:start + FILL_CHUNK])


class Leasetree(Contender):
    exits_when_done = True
    modes = ("noop", "sleep", "command", "latency")

    def __init__(self, backend: str) -> None:
        self.backend = backend
        self.name = f"leasetree-{backend}"
        self.note = f"supervise run --burst, {backend} queue, [executors] count = 2"

    def url(self, ctx: RunContext) -> str:
        return sqlite_url(ctx) if self.backend == "sqlite" else ctx.redis_url

    def config(self, ctx: RunContext) -> Path:
        if ctx.mode == "command":
            task = 'command = "/bin/true"'
        else:
            task = f'callable = "benchtask:{"stamp" if ctx.mode == "latency" else "noop"}"'
        path = ctx.rundir / "leasetree.toml"
        path.write_text(f'[queue]\nurl = "{self.url(ctx)}"\nname = "ltbench"\n\n'
                        f'[executors]\ncount = 2\n{task}\npython_path = ["{ctx.bench_dir}"]\n\n'
                        f'[log]\nlevel = "warning"\n')
        return path

    def prepare(self, ctx: RunContext) -> None:
        if self.backend == "redis":
            redis_purge(ctx.redis_url)
        count = 0 if ctx.mode == "latency" else self.task_count(ctx.n)
        fill_backend(self.url(ctx), ctx, [b"%d" % i for i in range(count)])

    def left(self, ctx: RunContext) -> int | None:
        return queue_left(self.url(ctx), ctx)

    def start(self, ctx: RunContext) -> Procs:
        argv = [console_script("supervise"), "run"]
        if ctx.mode != "latency":
            argv.append("--burst")
        return [spawn([*argv, str(self.config(ctx))], ctx, "supervise.log")]

    def cleanup(self, ctx: RunContext) -> None:
        if self.backend == "redis":
            try:
                fill_backend(self.url(ctx), ctx, [])  # purge through the backend: it knows its keys
            finally:
                redis_purge(ctx.redis_url)

    def enqueue_one(self, ctx: RunContext, payload: str) -> None:
        from children.backends import open_backend

        if not hasattr(self, "_latency_backend"):
            self._latency_backend = open_backend(self.url(ctx), "ltbench", ctx.rundir)
        self._latency_backend.enqueue([payload.encode()])

    def finish(self, ctx: RunContext, procs: Procs) -> list[str]:
        backend = self.__dict__.pop("_latency_backend", None)
        if backend is not None:
            backend.close()
        return super().finish(ctx, procs)


class SeedPort(Contender):
    name = "seed-port"
    exits_when_done = True
    done_by_exit = True
    modes = ("noop", "command")

    def __init__(self, max_tasks: int) -> None:
        self.max_tasks = max_tasks
        self.note = (f"Python 3 port of gtaskqueue_puller, default flags (lease 10, poll/sleep 2 s, one "
                     f"delete per task), SQLite queue; runs /bin/true per task as the seed would; "
                     f"≤ {max_tasks} tasks (≈ 5 tasks/s by design)")

    def prepare(self, ctx: RunContext) -> None:
        fill_backend(sqlite_url(ctx), ctx, [b"%d" % i for i in range(self.task_count(ctx.n))])

    def left(self, ctx: RunContext) -> int | None:
        return queue_left(sqlite_url(ctx), ctx)

    def start(self, ctx: RunContext) -> Procs:
        return [spawn([python(), str(ctx.bench_dir / "seed_port.py"), "--url", sqlite_url(ctx), "--name",
                       "ltbench", "--executable_binary", "/bin/true", "--exit-when-empty"], ctx, "seed.log")]


# -- command floor ---------------------------------------------------------------------------------
class CommandFloor(Contender):
    """A bare way to run /bin/true N times on 2 processes: only in the command table."""

    exits_when_done = True
    done_by_exit = True
    modes = ("command",)


class Xargs(CommandFloor):
    name = "xargs-P2"
    note = "seq N | xargs -P 2 -n 1 /bin/true"

    def start(self, ctx: RunContext) -> Procs:
        args = ctx.rundir / "args"
        args.write_text("x\n" * ctx.n)
        return [spawn(["xargs", "-P", "2", "-n", "1", "/bin/true"], ctx, "xargs.log", stdin_path=args)]


class SpawnLoop(CommandFloor):
    name = "subprocess-run"
    note = "2 processes, each subprocess.run(['/bin/true']) N/2 times"

    def start(self, ctx: RunContext) -> Procs:
        return [spawn([python(), str(ctx.bench_dir / "spawn_loop.py"), str(ctx.n), "/bin/true"], ctx,
                      "spawn.log")]


def all_contenders(seed_max: int, rq_fork_max: int, dramatiq_prefetch: int) -> list[Contender]:
    """Every row, in table order (leasetree first: the ratios are to leasetree-sqlite)."""
    return [
        Leasetree("sqlite"), Leasetree("redis"),
        Celery(), Huey(), Dramatiq(dramatiq_prefetch), Dramatiq(None), Rq(False, rq_fork_max), Rq(True),
        MpPool(1), MpPool(100), ZmqRaw(), SeedPort(seed_max), Xargs(), SpawnLoop(),
    ]
