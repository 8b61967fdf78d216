"""PostgreSQL backend against the real server on 127.0.0.1:5432: the server-backend cases (fencing
between hosts, LISTEN/NOTIFY wake-ups, terminated connections) plus what is PostgreSQL's own: SKIP
LOCKED, schema creation racing between hosts, the lease plan, configuration errors."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from urllib.parse import quote

import pytest

from children.backends import BackendConfigError
from tests.backends import SERVER_URLS, available, require_server, unique_queue
from tests.integration.server_backend_cases import ServerBackendCases

try:
    import psycopg

    from children.backends.postgresql import _LEASE_ANY, SCHEMA_VERSION, PostgresBackend
except ImportError as exc:  # every test below then FAILS under CI=true and skips elsewhere
    NO_DRIVER = f"psycopg does not import ({str(exc).splitlines()[0]}): pip install 'leasetree[postgresql]'"
else:
    NO_DRIVER = ""

URL = SERVER_URLS["postgresql"]
pytestmark = pytest.mark.timeout(60)


@pytest.fixture(scope="module", autouse=True)
def driver() -> None:
    """First of all (an autouse fixture of the widest scope): the driver imports."""
    if NO_DRIVER:
        require_server("postgresql", NO_DRIVER)


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
def open_host(queue: str) -> Iterator[Callable[[], PostgresBackend]]:
    """Opens backends on the test's queue, one per simulated host; closes them all afterwards."""
    opened: list[PostgresBackend] = []

    def make() -> PostgresBackend:
        backend = PostgresBackend(URL, queue, Path("."))
        opened.append(backend)
        return backend

    yield make
    for backend in opened:
        backend.close()


def _activity(admin: psycopg.Connection, backend: PostgresBackend) -> tuple[int, str, str] | None:
    """(pid, state, last query) of the backend's connection, None when it has none."""
    rows = admin.execute("SELECT pid, state, query FROM pg_stat_activity WHERE application_name = %s",
                         [backend.client_name]).fetchall()
    return rows[0] if rows else None


@pytest.fixture
def blocked(admin: psycopg.Connection) -> Callable[[PostgresBackend], bool]:
    def blocked(backend: PostgresBackend) -> bool:
        # the last statement before a LISTEN wait is the next-due query; idle after it = waiting
        row = _activity(admin, backend)
        return row is not None and row[1] == "idle" and "min(visible_at)" in row[2]

    return blocked


@pytest.fixture
def kill(admin: psycopg.Connection) -> Callable[[PostgresBackend], None]:
    return lambda backend: admin.execute("SELECT pg_terminate_backend(%s)", [_activity(admin, backend)[0]])


@pytest.fixture
def unreachable_url() -> str:
    return "postgresql://postgres:s3cret@127.0.0.1:1/test"


class TestPostgresServer(ServerBackendCases):
    pass


@pytest.fixture
def private_schema(admin: psycopg.Connection) -> Iterator[str]:
    """A URL whose search_path is a fresh, empty schema: the backend creates its tables there."""
    schema = f"lt_{uuid.uuid4().hex[:12]}"
    admin.execute(f"CREATE SCHEMA {schema}")
    separator = "&" if "?" in URL else "?"
    yield f"{URL}{separator}options={quote(f'-csearch_path={schema}')}"
    admin.execute(f"DROP SCHEMA {schema} CASCADE")


def test_a_row_locked_elsewhere_is_skipped_not_waited_on(admin, queue, open_host) -> None:
    backend = open_host()
    locked, free = backend.enqueue([b"locked", b"free"])
    with psycopg.connect(URL) as other, other.transaction():
        other.execute("SELECT 1 FROM leasetree_tasks WHERE id = %s FOR UPDATE", [int(locked)])
        assert [t.task_id for t in backend.lease(2, 30)] == [free]
    assert [t.task_id for t in backend.lease(2, 30)] == [locked]


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


def test_missing_database_is_a_config_error(queue) -> None:
    url = URL.rsplit("/", 1)[0] + "/no_such_db_leasetree"
    backend = PostgresBackend(url, queue, Path("."))
    with pytest.raises(BackendConfigError) as info:
        backend.stats()
    message = str(info.value)
    assert "no_such_db_leasetree" in message and "\n" not in message
    backend.close()
