"""The Huey contender's app: SqliteHuey on the file named by BENCH_HUEY_DB.

Run by the harness as ``huey_consumer huey_app.huey -w 2 -k process``.
"""

import os

import benchtask
from huey import SqliteHuey

huey = SqliteHuey("ltbench", filename=os.environ.get("BENCH_HUEY_DB", "ltbench-huey.db"))


@huey.task()
def noop() -> None:
    benchtask.noop()


@huey.task()
def stamp(enqueued: str) -> None:
    benchtask.stamp(enqueued)
