"""The Celery contender's app: Redis broker (db from BENCH_REDIS_URL), every key under a private prefix.

Run by the harness as ``celery -A celery_app worker -P prefork -c 2``; enqueued by the harness with
``noop.apply_async()``. Results are ignored (a no-op has none) and acks stay early (the default).
"""

import os

import benchtask
from celery import Celery

QUEUE = "ltbench-celery"

app = Celery("ltbench", broker=os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/9"))
app.conf.update(
    # every key this app touches starts with "ltbench-celery:", so cleanup cannot hit anyone else's
    broker_transport_options={"global_keyprefix": QUEUE + ":"},
    task_default_queue=QUEUE,
    task_ignore_result=True,
    worker_hijack_root_logger=False,
    broker_connection_retry_on_startup=True,
)


@app.task(name="ltbench.noop")
def noop() -> None:
    benchtask.noop()


@app.task(name="ltbench.stamp")
def stamp(enqueued: str) -> None:
    benchtask.stamp(enqueued)
