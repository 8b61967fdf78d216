"""Redis Streams backend against the real server on 127.0.0.1:6379: the server-backend cases
(fencing between hosts, blocking wake-ups, killed connections) plus what is Redis's own: the consumer
group's pending list, XCLAIM on extend, one stream per tag, consumers forgotten on close."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from children.backends import Outcome
from tests.backends import SERVER_URLS, available, require_server, unique_queue
from tests.integration.server_backend_cases import ServerBackendCases

try:
    import redis

    from children.backends.redis import GROUP, RedisBackend
except ImportError as exc:  # every test below then FAILS under CI=true and skips elsewhere
    NO_DRIVER = f"redis-py does not import ({str(exc).splitlines()[0]}): pip install 'leasetree[redis]'"
else:
    NO_DRIVER = ""

URL = SERVER_URLS["redis"]
pytestmark = pytest.mark.timeout(60)


@pytest.fixture(scope="module", autouse=True)
def driver() -> None:
    """First of all (an autouse fixture of the widest scope): the driver imports."""
    if NO_DRIVER:
        require_server("redis", NO_DRIVER)


@pytest.fixture(scope="module")
def admin() -> Iterator[redis.Redis]:
    ok, reason = available("redis")
    if not ok:
        require_server("redis", reason)
    client = redis.Redis.from_url(URL)
    yield client
    client.close()


@pytest.fixture
def queue(admin: redis.Redis) -> Iterator[str]:
    name = unique_queue("redis")
    yield name
    keys = list(admin.scan_iter(match=f"leasetree:{{{name}}}:*"))
    if keys:
        admin.delete(*keys)


@pytest.fixture
def open_host(queue: str) -> Iterator[Callable[[], RedisBackend]]:
    """Opens backends on the test's queue, one per simulated host; closes them all afterwards."""
    opened: list[RedisBackend] = []

    def make() -> RedisBackend:
        backend = RedisBackend(URL, queue, Path("."))
        opened.append(backend)
        return backend

    yield make
    for backend in opened:
        backend.close()


def _client_of(admin: redis.Redis, backend: RedisBackend) -> dict:
    """The backend's connection in CLIENT LIST (found by the name it sets), {} when it has none."""
    return next((c for c in admin.client_list() if c.get("name") == backend.client_name), {})


@pytest.fixture
def blocked(admin: redis.Redis) -> Callable[[RedisBackend], bool]:
    def blocked(backend: RedisBackend) -> bool:
        client = _client_of(admin, backend)
        return client.get("cmd") == "xread" and "b" in client.get("flags", "")

    return blocked


@pytest.fixture
def kill(admin: redis.Redis) -> Callable[[RedisBackend], None]:
    return lambda backend: admin.client_kill_filter(_id=_client_of(admin, backend)["id"])


@pytest.fixture
def unreachable_url() -> str:
    return "redis://:s3cret@127.0.0.1:1/0"


class TestRedisServer(ServerBackendCases):
    pass


def test_reclaim_moves_the_pel_entry_to_the_new_consumer(admin, queue, open_host) -> None:
    host_a, host_b = open_host(), open_host()
    host_a.enqueue([b"job"])
    host_a.lease(1, lease_secs=0.05)
    stream = f"leasetree:{{{queue}}}:s:"
    [pending] = admin.xpending_range(stream, GROUP, "-", "+", 10)
    assert pending["consumer"].decode() == host_a.consumer
    host_b.lease(1, lease_secs=30, wait_secs=10)
    [pending] = admin.xpending_range(stream, GROUP, "-", "+", 10)
    assert pending["consumer"].decode() == host_b.consumer
    assert host_a.consumer != host_b.consumer
    assert host_a.consumer.split(":")[1] == str(os.getpid())


def test_extend_keeps_the_lease_and_resets_idle(admin, queue, open_host, wait_until) -> None:
    host_a, host_b = open_host(), open_host()
    host_a.enqueue([b"job"])
    [leased] = host_a.lease(1, lease_secs=0.3)
    stream = f"leasetree:{{{queue}}}:s:"

    def idle_ms() -> int:
        [pending] = admin.xpending_range(stream, GROUP, "-", "+", 10)
        assert pending["consumer"].decode() == host_a.consumer
        return pending["time_since_delivered"]

    wait_until(lambda: idle_ms() >= 200)
    assert host_a.extend([leased.receipt], 60) == {leased.receipt: Outcome.OK}
    assert idle_ms() < 200  # XCLAIM to the same consumer reset it
    # well past the first deadline, nothing is leasable
    assert host_b.lease(1, lease_secs=30, wait_secs=0.5) == []
    assert host_a.ack([leased.receipt]) == {leased.receipt: Outcome.OK}


def test_tags_lease_oldest_first_across_streams(open_host) -> None:
    backend = open_host()
    first = backend.enqueue([b"1"], tag="red")
    second = backend.enqueue([b"2"])
    third = backend.enqueue([b"3"], tag="blue")
    assert [t.task_id for t in backend.lease(1, 30, tag="blue")] == third
    assert [t.task_id for t in backend.lease(5, 30)] == first + second


def test_close_forgets_the_consumer_when_it_holds_nothing(admin, queue, open_host) -> None:
    holder, finished = open_host(), open_host()
    holder.enqueue([b"a", b"b"])
    holder.lease(1, 60)
    [done] = finished.lease(1, 60)
    finished.ack([done.receipt])
    stream = f"leasetree:{{{queue}}}:s:"

    def consumers() -> set[str]:
        return {c["name"].decode() for c in admin.xinfo_consumers(stream, GROUP)}

    assert {holder.consumer, finished.consumer} <= consumers()
    finished.close()
    holder.close()  # still holds a pending entry: it stays, so the entry can be reclaimed
    assert finished.consumer not in consumers()
    assert holder.consumer in consumers()
