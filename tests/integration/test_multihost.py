"""Many trees on one queue, kills and server outages, end to end on Redis and PostgreSQL.

Each test runs ``supervise run`` for real against the server on this machine, on a queue of its own
(purged afterwards), and counts runs through the record file that ``task_funcs.run`` appends to.
The SQLite versions of the first three live in ``test_pipeline_e2e.py``.

Server outages are real stops and starts. PostgreSQL is the machine's cluster (its queue is on disk
and survives; the test always starts it again). The machine's Redis keeps nothing on disk and every
test shares it, so a restart would wipe every queue on it: that loss is the server's, not ours, and
proves nothing about leasetree. The Redis case runs on a ``redis-server`` of the test's own instead
(``server_control.PrivateRedis``: a free port, every write in its append-only file before it answers),
which is SHUTDOWN mid-run and started again on the same port and folder.
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import signal
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager as ContextManager
from pathlib import Path
from typing import Any

import pytest

from children.backends import open_backend
from supervisor import control
from supervisor.rundir import runtime_dir
from tests.backends import SERVER_URLS, available, require_server, unique_queue
from tests.integration import server_control
from tests.integration.harness import RunningTree, enqueue, queue_stats, records, wait_until, write_config

pytestmark = pytest.mark.timeout(60)

SERVERS = ["redis", "postgresql"]
Outage = Callable[[], ContextManager[None]]  # a `with` that stops a server and starts it again


@pytest.fixture(params=SERVERS)
def queue(request) -> Iterator[dict[str, str]]:
    """The ``[queue]`` section of a queue of its own on one server; purged after the test."""
    kind = request.param
    ok, why = available(kind)
    if not ok:
        require_server(kind, why)
    section = {"url": SERVER_URLS[kind], "name": unique_queue("multihost")}
    yield section
    with contextlib.suppress(Exception), open_backend(section["url"], section["name"]) as backend:
        backend.purge()


def drained(config: Path) -> bool:
    stats = queue_stats(config)
    return stats.ready == 0 and stats.leased == 0 and stats.delayed == 0


def status_now(tree: RunningTree) -> dict[str, Any]:
    """``supervise status --json``'s answer, asked in this process: ten times faster than the
    command (no interpreter to start), so the kills below follow each other at the chaos's pace."""
    try:
        return control.call(runtime_dir(tree.config, create=False), "status", {}, timeout=10)
    except control.ControlError:
        return {}


def worker_pids(tree: RunningTree) -> dict[str, int]:
    return {c["id"]: c["pid"] for c in status_now(tree).get("children", [])
            if c.get("type") == "worker" and c.get("pid")}


def restarts(status: dict[str, Any]) -> dict[str, tuple[int, int]]:
    """Every child's (pid, restarts) from a ``status --json`` answer."""
    return {c["id"]: (c.get("pid"), c.get("restarts", 0)) for c in status["children"]}


def test_kill_9_of_random_children_under_load_loses_nothing(tmp_path, queue):
    config = write_config(tmp_path, queue=queue, leaser={"lease_secs": 3},
                          supervisor={"intensity": 1000, "period_secs": 60, "heartbeat_secs": 0.5})
    record = tmp_path / "runs.txt"
    total = 600  # about 6 s of work for two executors: the ten kills land while it runs
    enqueue(config, ["sleep:0.02"] * total)
    rng = random.Random(11)
    kills: list[tuple[str, int]] = []
    with RunningTree(config, record) as tree:
        tree.wait_ready()
        while len(kills) < 10:
            pids = worker_pids(tree)
            victim = rng.choice(sorted(pids))
            with contextlib.suppress(ProcessLookupError):
                os.kill(pids[victim], signal.SIGKILL)
                kills.append((victim, len(records(record))))
            time.sleep(rng.uniform(0.1, 0.3))  # the chaos cadence itself, not a synchronisation
        wait_until(lambda: drained(config), 40, "the queue to drain after the kills")
        assert tree.process.poll() is None, "the tree gave up: " + tree.output()
        assert tree.wait_ready(), "the tree is not whole after the kills"
    assert kills[-1][1] < total, "the kills came after the work was done"
    runs = records(record)
    assert len(runs) == total, f"lost {total - len(runs)} tasks"
    assert queue_stats(config).dead == 0


def test_two_trees_on_one_queue_one_killed_whole_the_other_finishes(tmp_path, queue):
    first = write_config(tmp_path, "a.toml", queue=queue, leaser={"lease_secs": 2})
    second = write_config(tmp_path, "b.toml", queue=queue, leaser={"lease_secs": 2})
    record = tmp_path / "runs.txt"
    total = 300  # about 4 s of work for four executors
    with RunningTree(first, record) as a, RunningTree(second, record) as b:
        a.wait_ready()
        b.wait_ready()
        a_pids = set(a.child_pids().values())
        enqueue(first, ["sleep:0.05"] * total)  # both trees are up: both get a share
        wait_until(lambda: len(records(record)) >= 30, 30, "work to start")
        a.process.send_signal(signal.SIGKILL)  # the root: the whole tree goes with it
        a.process.wait(timeout=10)
        wait_until(lambda: a.leftovers() == [], 10, "every process of the killed tree to be gone")
        assert len(records(record)) < total, "tree a was killed after the work was done"
        wait_until(lambda: drained(second), 40, "tree b to finish everything")
        assert b.process.poll() is None, b.output()
    runners = {int(line.split()[2]) for line in record.read_text().splitlines()}
    assert runners & a_pids and runners - a_pids, "both trees should have run tasks"
    assert len(records(record)) == total
    assert queue_stats(second).dead == 0


def test_task_longer_than_its_lease_runs_once_with_a_second_tree_on_the_queue(tmp_path, queue):
    first = write_config(tmp_path, "a.toml", queue=queue, leaser={"lease_secs": 1}, executors={"count": 1})
    second = write_config(tmp_path, "b.toml", queue=queue, leaser={"lease_secs": 1}, executors={"count": 1})
    record = tmp_path / "runs.txt"
    enqueue(first, ["sleep:4"])
    with RunningTree(first, record) as a:
        wait_until(lambda: len(records(record)) == 1, 30, "the task to start on tree a")
        with RunningTree(second, record) as b:
            b.wait_ready()
            wait_until(lambda: drained(first), 30, "the long task to finish")
            assert a.process.poll() is None and b.process.poll() is None
    assert list(records(record).values()) == [1]
    assert queue_stats(first).dead == 0


def _backend_errors(tree: RunningTree) -> int:
    status = status_now(tree)
    return sum(int(stats.get("backend_errors_total", 0)) for stats in status.get("stats", {}).values())


@contextlib.contextmanager
def _outage_server(kind: str, folder: Path) -> Iterator[tuple[str, Outage]]:
    """(the URL of a server of ``kind``, a ``with`` that stops it and starts it again). PostgreSQL:
    the machine's cluster. Redis: a private persistent ``redis-server``, stopped in a finally."""
    ok, why = available(kind)  # the driver, and for PostgreSQL the server
    if ok and kind == "redis" and shutil.which("redis-server") is None:
        ok, why = False, "no redis-server binary to start a private server"
    if not ok:
        require_server(kind, why)
    if kind == "postgresql":
        url = SERVER_URLS["postgresql"]
        yield url, lambda: server_control.postgres_down(url)
        return
    with server_control.private_redis(folder) as server:
        yield server.url, server.down


# its own finally may take ~120 s to bring PostgreSQL back (pg_ctlcluster start, then the wait for an
# answer): the timeout is well past that, so pytest-timeout never cuts the restart short
@pytest.mark.timeout(300)
@pytest.mark.parametrize("kind", SERVERS)
def test_server_outage_mid_run_loses_nothing_and_no_child_restarts(tmp_path, kind):
    with _outage_server(kind, tmp_path / "redis") as (url, outage):
        queue = {"url": url, "name": unique_queue("outage")}
        try:
            _outage_mid_run(tmp_path, queue, outage)
        finally:
            with contextlib.suppress(Exception), open_backend(queue["url"], queue["name"]) as backend:
                backend.purge()


def _outage_mid_run(tmp_path: Path, queue: dict[str, str], outage: Outage) -> None:
    config = write_config(tmp_path, queue=queue, leaser={"lease_secs": 5})
    record = tmp_path / "runs.txt"
    total = 600  # about 6 s of work for two executors: the outage comes in the middle
    enqueue(config, ["sleep:0.02"] * total)
    with RunningTree(config, record) as tree:
        before = restarts(tree.wait_ready())
        wait_until(lambda: len(records(record)) >= 40, 30, "work to start")
        errors_before = _backend_errors(tree)
        with outage():
            # the outage lasts until the tree has felt it several times over (retries fail too)
            wait_until(lambda: _backend_errors(tree) >= errors_before + 4, 20,
                       "the tree to see repeated backend errors")
            ran_during = len(records(record))
        assert ran_during < total, "the outage came after the work was done"
        wait_until(lambda: drained(config), 40, "the queue to drain after the outage")
        assert tree.process.poll() is None, "the tree gave up: " + tree.output()
        after = restarts(tree.wait_ready())
    assert after == before, "children were restarted by the outage"
    runs = records(record)
    assert len(runs) == total, f"lost {total - len(runs)} tasks"
    assert queue_stats(config).dead == 0
