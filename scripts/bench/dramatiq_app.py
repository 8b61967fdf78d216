"""The Dramatiq contender's broker and actors: Redis (BENCH_REDIS_URL), keys under a private namespace.

Run by the harness as ``dramatiq dramatiq_app --processes 2 --threads 1``; its prefetch comes from
the ``dramatiq_queue_prefetch`` environment variable (dramatiq's own knob; default threads·2).
"""

import os

import benchtask
import dramatiq
from dramatiq.brokers.redis import RedisBroker

NAMESPACE = "ltbench-dramatiq"

broker = RedisBroker(url=os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/9"), namespace=NAMESPACE)
dramatiq.set_broker(broker)


@dramatiq.actor(queue_name="ltbench", max_retries=0)
def noop() -> None:
    benchtask.noop()


@dramatiq.actor(queue_name="ltbench", max_retries=0)
def stamp(enqueued: str) -> None:
    benchtask.stamp(enqueued)
