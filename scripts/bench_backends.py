"""Lease+ack throughput and wake-up latency of the server backends, printed as a table.

    /work/venv/bin/python scripts/bench_backends.py [--tasks 20000] [--batch 256] [redis postgresql ...]

For each backend: enqueue ``--tasks`` tasks (timed separately), then one client leases ``--batch`` at a
time and acks each batch in one call until the queue is empty: tasks/s is tasks / that time. Wake-up:
a thread blocks in ``lease(wait_secs=...)`` on an empty queue, another handle enqueues one task; the
latency is enqueue start -> lease return (median and max of ``--wakeups`` rounds). Each run uses a
fresh queue and purges it afterwards. A backend whose server does not answer prints a row saying so.
"""

from __future__ import annotations

import argparse
import atexit
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

from children.backends import BackendError, open_backend

# name -> URL of the server on this machine. Add a row here when a backend lands, e.g.
#   "nats": "nats://127.0.0.1:4222",
#   "sqs": "sqs://...",  (moto or a real queue)
SERVERS: dict[str, str] = {
    "redis": "redis://127.0.0.1:6379/0",
    "postgresql": "postgresql://postgres@127.0.0.1:5432/test",
    "nats": "nats://127.0.0.1:4222",
    # a real queue from LEASETREE_BENCH_SQS_URL, else a moto server this script starts
    "sqs": os.environ.get("LEASETREE_BENCH_SQS_URL", "moto"),
}
# moto's ReceiveMessage scans the whole queue, so 20000 tasks would take minutes: fewer for sqs
TASK_CAP: dict[str, int] = {"sqs": 1000}


def moto_url() -> str:
    """Start ``python -m moto.server`` on a free port for this run; the SQS URL that reaches it."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    atexit.register(server.terminate)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            time.sleep(0.05)  # a starting server has nothing to wait on
    return f"sqs://test:test@?endpoint_url=http://127.0.0.1:{port}&region=us-east-1"


def throughput(url: str, tasks: int, batch: int) -> tuple[float, float]:
    """(enqueue tasks/s, lease+ack tasks/s) for one client."""
    backend = open_backend(url, f"bench-{uuid.uuid4().hex[:8]}", Path("."))
    try:
        started = time.perf_counter()
        for i in range(0, tasks, 1000):
            backend.enqueue([b"payload %d" % n for n in range(i, min(tasks, i + 1000))])
        enqueue_rate = tasks / (time.perf_counter() - started)
        done = 0
        started = time.perf_counter()
        while leased := backend.lease(batch, 60.0):
            backend.ack([t.receipt for t in leased])
            done += len(leased)
        elapsed = time.perf_counter() - started
        assert done == tasks, f"leased {done} of {tasks}"
        return enqueue_rate, done / elapsed
    finally:
        backend.purge()
        backend.close()


def wakeups(url: str, rounds: int) -> list[float]:
    """Seconds from the start of an enqueue to the return of a blocked lease, per round."""
    queue = f"bench-{uuid.uuid4().hex[:8]}"
    waiter, producer = open_backend(url, queue, Path(".")), open_backend(url, queue, Path("."))
    out: list[float] = []
    try:
        for _ in range(rounds):
            got: list = []
            thread = threading.Thread(
                target=lambda got=got: got.extend(waiter.lease(1, 60.0, wait_secs=10.0)))
            thread.start()
            # let the waiter reach its blocking call; a round that enqueues early only measures
            # a plain lease, which is faster, so this errs towards the slower number
            time.sleep(0.05)
            started = time.perf_counter()
            producer.enqueue([b"wake"])
            thread.join()
            out.append(time.perf_counter() - started)
            waiter.ack([t.receipt for t in got])
    finally:
        producer.purge()
        waiter.close()
        producer.close()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("backends", nargs="*", default=list(SERVERS), help=", ".join(SERVERS))
    parser.add_argument("--tasks", type=int, default=20000)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--wakeups", type=int, default=20)
    args = parser.parse_args()
    unknown = sorted(set(args.backends) - set(SERVERS))
    if unknown:
        parser.error(f"unknown backend {', '.join(unknown)}; known: {', '.join(SERVERS)}")

    print(f"{args.tasks} tasks, lease+ack in batches of {args.batch}, one client, "
          f"{args.wakeups} wake-up rounds")
    header = f"{'backend':<12}{'enqueue/s':>12}{'lease+ack/s':>14}{'wake p50 ms':>14}{'wake max ms':>14}"
    print(header)
    print("-" * len(header))
    for name in args.backends:
        url = moto_url() if SERVERS[name] == "moto" else SERVERS[name]
        try:
            enqueue_rate, rate = throughput(url, min(args.tasks, TASK_CAP.get(name, args.tasks)), args.batch)
            wake = wakeups(url, args.wakeups)
        except BackendError as exc:
            print(f"{name:<12}unavailable: {exc}")
            continue
        capped = f"  ({TASK_CAP[name]} tasks)" if TASK_CAP.get(name, args.tasks) < args.tasks else ""
        print(f"{name:<12}{enqueue_rate:>12,.0f}{rate:>14,.0f}"
              f"{statistics.median(wake) * 1000:>14.2f}{max(wake) * 1000:>14.2f}{capped}")


if __name__ == "__main__":
    main()
