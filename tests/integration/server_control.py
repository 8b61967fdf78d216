"""Stop, start and disturb the local Redis and PostgreSQL servers, for outage tests and chaos runs.

The commands are the machine's own (the ``env`` doc): PostgreSQL through ``pg_ctlcluster``, Redis
through ``redis-cli shutdown nosave`` and ``redis-server --daemonize yes ...``. Every helper that
takes a server down brings it back in a ``finally`` and waits until it answers, so a failing test
never leaves the machine without its server.

Two ways to cut a tree off its queue:

- ``postgres_down()``: a real stop and start of the cluster. PostgreSQL keeps its tables on disk, so
  the queue survives and the test can check that nothing was lost.
- ``redis_outage()``: Redis here runs with ``--save "" --appendonly no``: a restart would wipe every
  queue on the server, ours and other tests' alike (that data loss is the server's, not ours). So the
  outage is made from the outside without a restart: the server is paused for writes (``CLIENT
  PAUSE ... WRITE``) and the connections of the tree's processes (found by their client name, which
  carries the pid) are killed again and again, which is how a restart or failover looks to a client.
  ``redis_down()`` (a real stop and start, losing every key) is there for a Redis nobody else uses.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

REDIS_START = ["redis-server", "--daemonize", "yes", "--bind", "127.0.0.1", "-::1", "--port", "6379",
               "--save", "", "--appendonly", "no", "--dir", "/var/lib/redis",
               "--logfile", "/var/log/redis/ci.log"]


def _wait(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.05)


# -- PostgreSQL -----------------------------------------------------------------------------------
def postgres_version() -> str:
    """The cluster version of this machine (the one folder under /etc/postgresql)."""
    versions = sorted(os.listdir("/etc/postgresql"))
    if not versions:
        raise RuntimeError("no PostgreSQL cluster under /etc/postgresql")
    return versions[-1]


def _pg_ctl(action: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["pg_ctlcluster", "--skip-systemctl-redirect", postgres_version(), "main",
                           action], capture_output=True, text=True, timeout=60)


def postgres_answers(url: str) -> bool:
    """Whether a new connection to ``url`` can run a query now."""
    import psycopg

    try:
        with psycopg.connect(url, connect_timeout=2) as conn:
            conn.execute("SELECT 1")
        return True
    except psycopg.Error:
        return False


def stop_postgres() -> None:
    """Stop the cluster (fast mode: open transactions roll back, clients are disconnected)."""
    result = _pg_ctl("stop")
    if result.returncode not in (0, 2):  # 2: it was not running
        raise RuntimeError(f"pg_ctlcluster stop failed: {result.stderr.strip()}")


def start_postgres(url: str, timeout: float = 60) -> None:
    """Start the cluster (a no-op when it runs) and wait until ``url`` answers a query."""
    result = _pg_ctl("start")
    if result.returncode != 0 and not postgres_answers(url):
        # "already running" exits 2; anything else is a real failure, said in one line
        raise RuntimeError(f"pg_ctlcluster start failed: {result.stderr.strip()}")
    _wait(lambda: postgres_answers(url), timeout, "PostgreSQL to answer after its start")


@contextlib.contextmanager
def postgres_down(url: str) -> Iterator[None]:
    """Stop PostgreSQL for the body of the ``with``; always start it again and wait until it answers."""
    try:
        stop_postgres()
        yield
    finally:
        start_postgres(url)


# -- Redis ----------------------------------------------------------------------------------------
def _redis(url: str):
    import redis

    return redis.Redis.from_url(url, socket_timeout=5, socket_connect_timeout=2)


def redis_answers(url: str) -> bool:
    import redis

    try:
        return bool(_redis(url).ping())
    except redis.RedisError:
        return False


def kill_redis_clients(url: str, pids: Iterable[int]) -> int:
    """Kill the connections opened by processes ``pids`` (matched by the ``:pid:`` in the client
    name every backend sets: ``leasetree:host:pid:random``); returns how many were killed. Other
    clients of the server, other tests' included, are left alone."""
    needles = [f":{pid}:" for pid in pids]
    client = _redis(url)
    killed = 0
    try:
        for info in client.client_list():
            name = info.get("name", "")
            if name.startswith("leasetree:") and any(n in name for n in needles):
                killed += bool(client.execute_command("CLIENT", "KILL", "ID", info["id"]))
    finally:
        client.close()
    return killed


@contextlib.contextmanager
def redis_outage(url: str, pids: Iterable[int], max_secs: float = 20.0) -> Iterator[None]:
    """An outage of Redis for the processes ``pids`` while the body of the ``with`` runs.

    The server is paused for writes (``CLIENT PAUSE ... WRITE``: every script blocks, reads still
    answer), and a background thread kills the connections of ``pids`` every 50 ms, so their calls
    fail with connection errors and their reconnects block again: what a client sees while a server
    restarts or fails over. Other clients of the server are only delayed, for the length of the body
    at most (``max_secs`` if the test hangs: the pause times out by itself). ``CLIENT UNPAUSE`` and
    the end of the killing come in the ``finally``."""
    import threading

    targets = list(pids)
    stop = threading.Event()

    def killer() -> None:
        while not stop.is_set():
            with contextlib.suppress(Exception):  # a slow answer here is part of the outage
                kill_redis_clients(url, targets)
            stop.wait(0.05)

    client = _redis(url)
    thread = threading.Thread(target=killer, name="redis-outage", daemon=True)
    try:
        client.execute_command("CLIENT", "PAUSE", int(max_secs * 1000), "WRITE")
        thread.start()
        yield
    finally:
        stop.set()
        if thread.is_alive():
            thread.join(5)
        with contextlib.suppress(Exception):
            client.execute_command("CLIENT", "UNPAUSE")
        client.close()


def stop_redis(url: str) -> None:
    """``redis-cli shutdown nosave``: the server exits and, being non-persistent, forgets everything."""
    subprocess.run(["redis-cli", "-h", "127.0.0.1", "-p", "6379", "shutdown", "nosave"],
                   capture_output=True, timeout=30)
    _wait(lambda: not redis_answers(url), 30, "Redis to stop")


def start_redis(url: str, timeout: float = 30) -> None:
    """Start the machine's Redis (a no-op when it answers) and wait until it answers."""
    if redis_answers(url):
        return
    Path("/var/log/redis").mkdir(parents=True, exist_ok=True)
    result = subprocess.run(REDIS_START, capture_output=True, text=True, timeout=30)
    if result.returncode != 0:
        raise RuntimeError(f"redis-server did not start: {result.stderr.strip() or result.stdout.strip()}")
    _wait(lambda: redis_answers(url), timeout, "Redis to answer after its start")


@contextlib.contextmanager
def redis_down(url: str) -> Iterator[None]:
    """Stop Redis for the body of the ``with`` (losing its data); always start it again and wait."""
    try:
        stop_redis(url)
        yield
    finally:
        start_redis(url)
