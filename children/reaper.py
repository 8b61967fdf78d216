"""The reaper process: settles finished tasks in the backend in batches and tells the leaser.

Successes are acked; failures are released with backoff, or dead-lettered once they used
``max_attempts``. A batch flushes at ``batch_size`` items or ``max_latency_ms`` after its first item,
split to the backend's caps. A backend error is retried with backoff, never dropped: the items stay
in the batch. On a stop it flushes everything it holds before it exits.
"""

from __future__ import annotations

import logging
import os
import random
import time
from pathlib import Path
from typing import Any

import zmq

from children import protocol as p
from children.backends import BackendError, BackendUnavailable, Outcome, open_backend
from children.backends.deferred import open_when_possible
from children.batcher import Batcher
from children.inbox import waiting_messages
from children.ratelimit import host_share
from children.retry import ACK, DEAD, RELEASE, backoff_delay, dead_reason, settle_action
from config.schema import Config
from supervisor.instrument import instrument
from supervisor.rundir import endpoint

PING_SECS = 1.0
MAX_ERROR_BACKOFF_SECS = 30.0
_SETTLED = {ACK: p.ACKED, RELEASE: p.RELEASED, DEAD: p.DEAD}


def main(ctx: Any, config: dict[str, Any]) -> int:
    cfg = Config.from_dict(config)
    return Reaper(ctx, cfg).run()


class Reaper:
    def __init__(self, ctx: Any, cfg: Config) -> None:
        self.ctx = ctx
        self.cfg = cfg
        self.log = logging.getLogger(getattr(ctx, "path", "reaper"))
        # never a failed start over the queue: see children/backends/deferred.py
        self.backend = open_when_possible(
            lambda: open_backend(cfg.queue.url, cfg.queue.name, cfg.base_dir), self.log, "reaper")
        self.batch = Batcher(int(cfg.reaper.batch_size), float(cfg.reaper.max_latency_ms) / 1000.0)
        self.bucket = host_share(float(cfg.leaser.requests_per_sec))
        self.rng = random.Random()
        self.errors_in_row = 0
        self.stats: dict[str, Any] = {"acked_total": 0, "released_total": 0, "dead_total": 0,
                                      "lost_total": 0, "backend_calls_total": 0,
                                      "backend_errors_total": 0}
        # metrics: per-call latency, counts and errors go into the reported stats
        self.backend = instrument(self.backend, self.stats)

    def run(self) -> int:
        zctx = zmq.Context()
        sock = self.sock = zctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.IDENTITY, b"reaper")
        sock.setsockopt(zmq.LINGER, 200)
        sock.setsockopt(zmq.RECONNECT_IVL, 10)  # we start before the leaser binds
        sock.setsockopt(zmq.SNDHWM, 0)
        sock.setsockopt(zmq.RCVHWM, 0)
        sock.connect(endpoint(Path(self.ctx.runtime_dir), "leaser"))
        self.hello()
        self.ctx.ready()
        poller = zmq.Poller()
        poller.register(sock, zmq.POLLIN)
        poller.register(self.ctx.wakeup_fd, zmq.POLLIN)
        last_sent = time.monotonic()
        try:
            while True:
                now = time.monotonic()
                draining = self.ctx.stop_requested > 0
                if self.batch.due(now, draining):
                    self.flush(now, draining)
                    last_sent = time.monotonic()
                if draining and not len(self.batch):
                    return 0
                if self.ctx.stop_requested >= 2 and self.errors_in_row:
                    # cold and the backend is failing: what is left comes back by lease expiry
                    self.log.warning("cold stop with %d settlements unflushed", len(self.batch))
                    return 0
                due_at = self.batch.due_at()
                wake = last_sent + PING_SECS if due_at is None else min(last_sent + PING_SECS, due_at)
                events = dict(poller.poll(max(0, int((wake - time.monotonic()) * 1000) + 1)))
                if self.ctx.wakeup_fd in events:
                    self.ctx.clear_wakeup()
                if sock in events:
                    self.receive(time.monotonic())
                if time.monotonic() - last_sent >= PING_SECS:
                    self.send(p.Ping("reaper", os.getpid()))
                    last_sent = time.monotonic()
                self.ctx.report(dict(self.stats, pending=len(self.batch)))
        finally:
            self.backend.close()
            sock.close()
            zctx.term()

    def hello(self) -> None:
        self.send(p.Hello("reaper", "reaper", os.getpid(), 0, [], []))

    def send(self, message: p.Message) -> None:
        try:
            self.sock.send(p.encode(message), zmq.NOBLOCK)
        except zmq.Again:
            pass  # no leaser now; it re-sends what we have not confirmed

    def receive(self, now: float) -> None:
        for message in waiting_messages(self.sock, self.log, "the leaser"):
            if isinstance(message, p.Settle):
                for item in message.items:
                    self.batch.add(item[1], item, now)
            elif isinstance(message, p.Sync):
                self.hello()
            else:
                self.log.warning("dropped an unexpected %s", type(message).__name__)

    # -- settling ----------------------------------------------------------------------------
    def flush(self, now: float, draining: bool) -> None:
        # batch_size is when to flush; a flush takes everything waiting, in calls of at most the
        # backend's cap, so a burst of completions costs few calls rather than many small ones
        cap = max(1, self.backend.limits.max_ack_batch)
        items = self.batch.take(None if draining else 4 * cap)
        groups: dict[str, list[list[Any]]] = {ACK: [], RELEASE: [], DEAD: []}
        for item in items:
            groups[settle_action(item[2], item[4], int(self.cfg.retry.max_attempts))].append(item)
        failed: list[list[Any]] = []
        receipts_out: list[str] = []
        outcomes_out: list[str] = []
        for action, group in groups.items():
            for start in range(0, len(group), cap):
                chunk = group[start:start + cap]
                try:
                    results = self.call(action, chunk)
                except BackendError as exc:
                    # a permanent-looking fault too (a file made read-only under us): the items
                    # wait with backoff rather than the reaper crash-looping through its restarts
                    self.stats["backend_errors_total"] += 1
                    self.errors_in_row += 1
                    if self.errors_in_row in (1, 10) or self.errors_in_row % 100 == 0:
                        level = logging.WARNING if isinstance(exc, BackendUnavailable) else logging.ERROR
                        self.log.log(level, "backend %s failed (%d in a row), will retry: %s",
                                     action, self.errors_in_row, exc)
                    failed.extend(chunk)
                    continue
                self.errors_in_row = 0
                for item in chunk:
                    outcome = results.get(item[1], Outcome.RETRY)
                    if outcome == Outcome.RETRY:
                        failed.append(item)
                        continue
                    settled = _SETTLED[action] if outcome == Outcome.OK else p.LOST
                    self.stats[f"{settled}_total"] += 1
                    receipts_out.append(item[1])
                    outcomes_out.append(settled)
        if receipts_out:
            self.send(p.Settled(receipts_out, outcomes_out))
        if failed:
            pause = min(MAX_ERROR_BACKOFF_SECS, 0.05 * 2 ** min(self.errors_in_row, 10))
            self.batch.put_back([(i[1], i) for i in failed], now, now + pause * self.rng.uniform(1, 1.5))

    def call(self, action: str, chunk: list[list[Any]]) -> dict[str, Outcome]:
        wait = self.bucket.wait_secs(time.monotonic())
        if wait > 0:
            time.sleep(wait)  # requests_per_sec: the cap is the point, a short block is the cost
        self.bucket.take(time.monotonic())
        self.stats["backend_calls_total"] += 1
        receipts = [i[1] for i in chunk]
        if action == ACK:
            return self.backend.ack(receipts)
        retry = self.cfg.retry
        if action == RELEASE:
            delays = [backoff_delay(i[4], float(retry.backoff_secs), float(retry.backoff_max_secs),
                                    self.rng.uniform(1.0, 2.0)) for i in chunk]
            return self.backend.release(receipts, delays, [i[3] for i in chunk])
        reasons = [dead_reason(i[4], i[3]) for i in chunk]
        return self.backend.dead_letter(receipts, reasons)
