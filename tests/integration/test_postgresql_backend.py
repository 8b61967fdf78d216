"""PostgreSQL backend against the real server on 127.0.0.1:5432: what the shared conformance suite
cannot see — fencing between two hosts, SKIP LOCKED, LISTEN/NOTIFY wake-ups, recovery from a
terminated connection, and schema creation racing between hosts."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from urllib.parse import quote

import pytest

from children.backends import BackendConfigError, BackendUnavailable, Outcome, QueueStats, TaskState
from tests.backends import SERVER_URLS, available, require_server, unique_queue

psycopg = pytest.importorskip("psycopg")

from children.backends.postgresql import _LEASE_ANY, SCHEMA_VERSION, PostgresBackend  # noqa: E402

URL = SERVER_URLS["postgresql"]
pytestmark = pytest.mark.timeout(60)


@pytest.fixture(scope="module")
def admin() -> Iterator[psycopg.Connection]:
    ok, reason = available("postgresql")
    if not ok:
        require_server("postgresql", reason)
    conn = psycopg.connect(URL, autocommit=True)
    yield conn
    conn.close()


@pytest.fixture
def queue(admin: psycopg.Connection) -> Iterator[str]:
    name = unique_queue("pg")
    yield name
    admin.execute("DELETE FROM leasetree_tasks WHERE queue = %s", [name])


@pytest.fixture
def open_host(queue: str) -> Iterator[Callable[..., PostgresBackend]]:
    """Opens backends on the test's queue, one per simulated host; closes them all afterwards."""
    opened: list[PostgresBackend] = []

    def make(url: str = URL) -> PostgresBackend:
        backend = PostgresBackend(url, queue, Path("."))
        opened.append(backend)
        return backend

    yield make
    for backend in opened:
        backend.close()


@pytest.fixture
def private_schema(admin: psycopg.Connection) -> Iterator[str]:
    """A URL whose search_path is a fresh, empty schema: the backend creates its tables there."""
    schema = f"lt_{uuid.uuid4().hex[:12]}"
    admin.execute(f"CREATE SCHEMA {schema}")
    separator = "&" if "?" in URL else "?"
    yield f"{URL}{separator}options={quote(f'-csearch_path={schema}')}"
    admin.execute(f"DROP SCHEMA {schema} CASCADE")


def _activity(admin: psycopg.Connection, backend: PostgresBackend) -> tuple[int, str, str] | None:
    """(pid, state, last query) of the backend's connection, None when it has none."""
    rows = admin.execute("SELECT pid, state, query FROM pg_stat_activity WHERE application_name = %s",
                         [backend.client_name]).fetchall()
    return rows[0] if rows else None


def _waiting(admin: psycopg.Connection, backend: PostgresBackend) -> bool:
    # the last statement before a LISTEN wait is the next-due query; idle after it = waiting
    row = _activity(admin, backend)
    return row is not None and row[1] == "idle" and "min(visible_at)" in row[2]


def test_stale_receipt_from_another_host_settles_nothing(open_host) -> None:
    host_a, host_b = open_host(), open_host()
    [task_id] = host_a.enqueue([b"job"])
    [first] = host_a.lease(1, lease_secs=0.05)
    # host B waits until A's lease expires (the wait is cut to the deadline), then leases it
    [second] = host_b.lease(1, lease_secs=30, wait_secs=10)
    assert (second.task_id, second.attempt) == (task_id, 2)
    assert second.receipt != first.receipt

    assert host_a.extend([first.receipt], 30) == {first.receipt: Outcome.LOST}
    assert host_a.release([first.receipt], 0) == {first.receipt: Outcome.LOST}
    assert host_a.dead_letter([first.receipt], "stale") == {first.receipt: Outcome.LOST}
    assert host_a.ack([first.receipt]) == {first.receipt: Outcome.LOST}
    assert host_b.get(task_id).state is TaskState.LEASED
    assert host_b.ack([second.receipt]) == {second.receipt: Outcome.OK}
    assert host_b.get(task_id) is None


def test_a_row_locked_elsewhere_is_skipped_not_waited_on(admin, queue, open_host) -> None:
    backend = open_host()
    locked, free = backend.enqueue([b"locked", b"free"])
    with psycopg.connect(URL) as other, other.transaction():
        other.execute("SELECT 1 FROM leasetree_tasks WHERE id = %s FOR UPDATE", [int(locked)])
        assert [t.task_id for t in backend.lease(2, 30)] == [free]
    assert [t.task_id for t in backend.lease(2, 30)] == [locked]


def test_blocked_lease_wakes_on_enqueue_from_another_connection(admin, open_host, wait_until) -> None:
    waiter, producer = open_host(), open_host()
    got: list = []
    thread = threading.Thread(target=lambda: got.extend(waiter.lease(5, 30, wait_secs=30)))
    started = time.monotonic()
    thread.start()
    wait_until(lambda: _waiting(admin, waiter), what="the lease to block on LISTEN")
    [task_id] = producer.enqueue([b"wake up"])
    thread.join(timeout=30)
    # woke on the NOTIFY: a missed one would have returned only after the 30 s wait
    assert [t.task_id for t in got] == [task_id]
    assert time.monotonic() - started < 15


def test_wait_for_work_wakes_on_release_and_on_a_due_delay(admin, open_host, wait_until) -> None:
    holder, watcher = open_host(), open_host()
    holder.enqueue([b"job"])
    [leased] = holder.lease(1, 60)
    woke: list[bool] = []
    thread = threading.Thread(target=lambda: woke.append(watcher.wait_for_work(30)))
    thread.start()
    wait_until(lambda: _waiting(admin, watcher), what="wait_for_work to block on LISTEN")
    holder.release([leased.receipt], 0)
    thread.join(timeout=30)
    assert woke == [True]

    [again] = holder.lease(1, 60)
    holder.ack([again.receipt])
    holder.enqueue([b"later"], delay_secs=0.2)  # the wait is cut to its due time
    assert watcher.wait_for_work(20) is True
    assert [t.payload for t in holder.lease(5, 60)] == [b"later"]


def test_terminated_while_waiting_fails_once_then_recovers(admin, open_host, wait_until) -> None:
    backend, producer = open_host(), open_host()
    errors: list[BaseException] = []

    def blocked_lease() -> None:
        try:
            backend.lease(1, 30, wait_secs=30)
        except BaseException as exc:  # noqa: BLE001 - the test inspects what surfaced
            errors.append(exc)

    thread = threading.Thread(target=blocked_lease)
    thread.start()
    wait_until(lambda: _waiting(admin, backend), what="the lease to block on LISTEN")
    admin.execute("SELECT pg_terminate_backend(%s)", [_activity(admin, backend)[0]])
    thread.join(timeout=30)
    assert len(errors) == 1 and isinstance(errors[0], BackendUnavailable)
    assert "\n" not in str(errors[0])

    ids = producer.enqueue([b"a", b"b"])
    leased = backend.lease(2, 30, wait_secs=5)  # reconnects (and LISTENs again) on this call
    assert sorted(t.task_id for t in leased) == sorted(ids)
    assert backend.ack([t.receipt for t in leased]) == {t.receipt: Outcome.OK for t in leased}


def test_terminated_idle_connection_fails_once_and_loses_nothing(admin, open_host) -> None:
    backend = open_host()
    ids = backend.enqueue([b"%d" % i for i in range(10)])
    leased = backend.lease(10, 30)
    admin.execute("SELECT pg_terminate_backend(%s)", [_activity(admin, backend)[0]])
    receipts = [t.receipt for t in leased]
    with pytest.raises(BackendUnavailable):
        backend.ack(receipts)
    outcomes = backend.ack(receipts)  # the caller's retry: same call, new connection
    assert set(outcomes.values()) == {Outcome.OK} and len(outcomes) == len(ids)
    assert backend.stats() == QueueStats(0, 0, 0, 0, None)


def test_two_hosts_creating_the_schema_at_once(admin, private_schema, queue) -> None:
    hosts = [PostgresBackend(private_schema, queue, Path(".")) for _ in range(4)]
    start = threading.Barrier(len(hosts))
    failures: list[BaseException] = []

    def first_use(backend: PostgresBackend) -> None:
        start.wait()
        try:
            backend.enqueue([b"x"])
        except BaseException as exc:  # noqa: BLE001 - collected and asserted below
            failures.append(exc)

    threads = [threading.Thread(target=first_use, args=(h,)) for h in hosts]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    try:
        assert failures == []
        assert hosts[0].stats().ready == len(hosts)
        schema = private_schema.rsplit("%3D", 1)[1]
        versions = admin.execute(f"SELECT version FROM {schema}.leasetree_schema").fetchall()
        assert versions == [(SCHEMA_VERSION,)]
    finally:
        for h in hosts:
            h.close()


def test_lease_walks_the_index_not_the_table(private_schema, queue) -> None:
    backend = PostgresBackend(private_schema, queue, Path("."))
    try:
        backend.enqueue([b"x"] * 20000)
        backend.enqueue([b"y"] * 5000, tag="other")
        with psycopg.connect(private_schema, autocommit=True) as conn:
            conn.execute("ANALYZE leasetree_tasks")
            plan = "\n".join(r[0] for r in conn.execute(
                "EXPLAIN " + _LEASE_ANY, {"q": queue, "k": 256, "lease": 30}).fetchall())
        assert "leasetree_tasks_due" in plan, plan
        assert "Seq Scan" not in plan, plan
    finally:
        backend.close()


def test_unreachable_server_is_unavailable(queue) -> None:
    backend = PostgresBackend("postgresql://postgres@127.0.0.1:1/test", queue, Path("."))
    with pytest.raises(BackendUnavailable) as info:
        backend.stats()
    assert "127.0.0.1:1" not in str(info.value) or "\n" not in str(info.value)
    backend.close()


def test_missing_database_is_a_config_error(queue) -> None:
    url = URL.rsplit("/", 1)[0] + "/no_such_db_leasetree"
    backend = PostgresBackend(url, queue, Path("."))
    with pytest.raises(BackendConfigError) as info:
        backend.stats()
    message = str(info.value)
    assert "no_such_db_leasetree" in message and "\n" not in message
    backend.close()
