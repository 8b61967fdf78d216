"""Stop, start and disturb the local Redis and PostgreSQL servers, for outage tests and chaos runs.

The commands are the machine's own (the ``env`` doc): PostgreSQL through ``pg_ctlcluster``, Redis
through ``redis-cli shutdown nosave`` and ``redis-server --daemonize yes ...``. Every helper that
takes a server down brings it back in a ``finally`` and waits until it answers, so a failing test
never leaves the machine without its server.

Two ways to cut a tree off its queue:

- ``postgres_down()``: a real stop and start of the cluster. PostgreSQL keeps its tables on disk, so
  the queue survives and the test can check that nothing was lost.
- ``PrivateRedis``: the machine's Redis runs with ``--save "" --appendonly no`` and every test shares
  it, so a restart of it would wipe every queue on the server, ours and other tests' alike (that data
  loss is the server's, not ours). A real stop and start of Redis is done on a ``redis-server`` of the
  test's own instead, on a free port, persisting every write (``--appendonly yes --appendfsync
  always``): ``down()`` SHUTDOWNs it and starts it again on the same port and folder.
- ``redis_outage()``: an outage made from the outside without a restart: the server is paused for
  writes (``CLIENT PAUSE ... WRITE``) and the connections of the tree's processes (found by their
  client name, which carries the pid) are killed again and again, which is how a failover looks to a
  client. ``redis_down()`` (a real stop and start, losing every key) is there for a Redis nobody else
  uses.

``local_servers_up()`` and ``start_local()`` are the net under all of these: the session fixture in
``tests/conftest.py`` starts again, at the end of every session, any machine server that answered at
its start and no longer does.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

REDIS_START = ["redis-server", "--daemonize", "yes", "--bind", "127.0.0.1", "-::1", "--port", "6379",
               "--save", "", "--appendonly", "no", "--dir", "/var/lib/redis",
               "--logfile", "/var/log/redis/ci.log"]

NATS_START = ["start-stop-daemon", "--start", "--oknodo", "--background", "--exec", "/usr/sbin/nats-server",
              "--", "-a", "127.0.0.1", "-p", "4222", "-js", "-sd", "/var/lib/nats-server",
              "-l", "/var/log/nats-server.log"]
#: the machine's servers (the ``env`` doc, scripts/services.sh): name -> port on 127.0.0.1
LOCAL_PORTS = {"postgresql": 5432, "redis": 6379, "nats": 4222}


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


# -- a private Redis that persists ----------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class PrivateRedis:
    """A ``redis-server`` of one test's own on a free port, which writes every change to its
    append-only file before it answers: a SHUTDOWN and a start on the same port and folder lose
    nothing. ``start()`` waits until it answers; ``stop()`` (in a ``finally``) ends it for good."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.port = _free_port()
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 30) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        process = self.process = subprocess.Popen(
            ["redis-server", "--bind", "127.0.0.1", "--port", str(self.port), "--save", "",
             "--appendonly", "yes", "--appendfsync", "always", "--dir", str(self.folder),
             "--logfile", str(self.folder / "redis.log")],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

        def answers() -> bool:
            if process.poll() is not None:
                log = self.folder / "redis.log"
                tail = log.read_text(errors="replace").strip().splitlines()[-1:] if log.exists() else []
                raise RuntimeError(f"redis-server on port {self.port} exited {process.returncode}: "
                                   f"{' '.join(tail)}")
            return redis_answers(self.url)  # False while it loads its append-only file, too

        _wait(answers, timeout, f"the private redis-server on port {self.port} to answer")

    def shutdown(self, timeout: float = 30) -> None:
        """``SHUTDOWN``: the server syncs its append-only file and exits, as an operator stops it."""
        process = self.process
        if process is None or process.poll() is not None:
            self.process = None
            return
        subprocess.run(["redis-cli", "-h", "127.0.0.1", "-p", str(self.port), "shutdown"],
                       capture_output=True, timeout=30)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
            raise RuntimeError(f"redis-server on port {self.port} did not exit on SHUTDOWN") from None
        finally:
            self.process = None

    def stop(self) -> None:
        """End the server whatever its state (SHUTDOWN, else SIGKILL); safe to call twice."""
        try:
            self.shutdown(timeout=10)
        except (RuntimeError, subprocess.TimeoutExpired):
            pass
        if self.process is not None:  # redis-cli itself timed out
            self.process.kill()
            self.process.wait()
            self.process = None

    @contextlib.contextmanager
    def down(self) -> Iterator[None]:
        """SHUTDOWN for the body of the ``with``; always started again (same port and folder) after."""
        try:
            self.shutdown()
            yield
        finally:
            self.start()


@contextlib.contextmanager
def private_redis(folder: Path) -> Iterator[PrivateRedis]:
    """A started ``PrivateRedis`` in ``folder`` for the body of the ``with``; stopped in a finally."""
    server = PrivateRedis(folder)
    try:
        server.start()
        yield server
    finally:
        server.stop()


# -- the machine's servers, for the session's net ------------------------------------------------
def port_open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


def local_servers_up() -> set[str]:
    """The machine's servers that accept a connection now."""
    return {name for name, port in LOCAL_PORTS.items() if port_open(port)}


def start_local(name: str, timeout: float = 120) -> None:
    """Start the machine's server ``name`` with the machine's own command and wait until it listens
    (TCP only: no driver needed, so it also works for a session whose drivers are missing); a no-op
    when it listens already."""
    if port_open(LOCAL_PORTS[name]):
        return
    if name == "postgresql":
        result = _pg_ctl("start")
    elif name == "redis":
        Path("/var/log/redis").mkdir(parents=True, exist_ok=True)
        result = subprocess.run(REDIS_START, capture_output=True, text=True, timeout=30)
    else:
        result = subprocess.run(NATS_START, capture_output=True, text=True, timeout=30)
    if result.returncode != 0 and not port_open(LOCAL_PORTS[name]):
        raise RuntimeError(f"{name} did not start: {result.stderr.strip() or result.stdout.strip()}")
    _wait(lambda: port_open(LOCAL_PORTS[name]), timeout, f"{name} to listen on {LOCAL_PORTS[name]}")
