"""The zmq-raw contender: a bare pyzmq pipeline of leasetree's shape, the practical speed limit.

Usage: ``python zmq_raw.py N BATCH RUNDIR``. Processes: a source (PUSH, binds), 2 workers
(PULL from the source, PUSH to the sink), a sink (PULL, binds) that exits after N completions; the
parent waits for the sink, then ends the others. Messages are msgpack lists of BATCH task ids; a
worker runs the same no-op per id and sends back one batch of done ids. No queue, no acks, no
supervision: what remains is the cost of moving tasks between processes over ipc://.
"""

import os
import signal
import sys
from multiprocessing import Process

import benchtask
import msgpack
import zmq


def source(count: int, batch: int, tasks_ep: str, workers: int) -> None:
    ctx = zmq.Context()
    push = ctx.socket(zmq.PUSH)
    handshakes = push.get_monitor_socket(zmq.EVENT_HANDSHAKE_SUCCEEDED)
    push.bind(tasks_ep)
    # PUSH only round-robins over peers already connected: wait until every worker has finished its
    # handshake, or the first one would get the whole queue (zmq's "slow joiner").
    for _ in range(workers):
        handshakes.recv_multipart()
    for start in range(0, count, batch):
        push.send(msgpack.packb(list(range(start, min(start + batch, count)))))
    signal.pause()  # keep the socket, and what it still queues, alive until the parent ends us


def worker(tasks_ep: str, done_ep: str) -> None:
    ctx = zmq.Context()
    pull = ctx.socket(zmq.PULL)
    pull.setsockopt(zmq.RCVHWM, 2)  # keep work on the source, not buffered in one worker
    pull.connect(tasks_ep)
    push = ctx.socket(zmq.PUSH)
    push.connect(done_ep)
    while True:
        ids = msgpack.unpackb(pull.recv())
        for _ in ids:
            benchtask.noop()
        push.send(msgpack.packb(ids))


def sink(count: int, done_ep: str) -> None:
    ctx = zmq.Context()
    pull = ctx.socket(zmq.PULL)
    pull.bind(done_ep)
    seen = 0
    while seen < count:
        seen += len(msgpack.unpackb(pull.recv()))


def main() -> None:
    count, batch, rundir = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    tasks_ep, done_ep = (f"ipc://{os.path.join(rundir, n)}.ipc" for n in ("tasks", "done"))
    sink_proc = Process(target=sink, args=(count, done_ep))
    sink_proc.start()
    src = Process(target=source, args=(count, batch, tasks_ep, 2))
    src.start()
    workers = [Process(target=worker, args=(tasks_ep, done_ep)) for _ in range(2)]
    for proc in workers:
        proc.start()
    sink_proc.join()
    for proc in [src, *workers]:
        os.kill(proc.pid, signal.SIGKILL)
        proc.join()
    sys.exit(sink_proc.exitcode or 0)


if __name__ == "__main__":
    main()
