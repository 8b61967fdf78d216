"""Redis Streams backend against the real server on 127.0.0.1:6379: what the shared conformance suite
cannot see — fencing between two hosts, per-call lease deadlines, the consumer group's PEL, blocking
wake-ups, and recovery from a killed connection."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from children.backends import BackendUnavailable, Outcome, QueueStats, TaskState
from tests.backends import SERVER_URLS, available, require_server, unique_queue

redis = pytest.importorskip("redis")

from children.backends.redis import GROUP, RedisBackend  # noqa: E402

URL = SERVER_URLS["redis"]
pytestmark = pytest.mark.timeout(60)


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


def _client_of(admin: redis.Redis, backend: RedisBackend, blocked_in: str | None = None) -> dict | None:
    for client in admin.client_list():
        if client.get("name") == backend.client_name and (
                blocked_in is None or (client.get("cmd") == blocked_in and "b" in client.get("flags", ""))):
            return client
    return None


def test_stale_receipt_from_another_host_settles_nothing(open_host) -> None:
    host_a, host_b = open_host(), open_host()
    [task_id] = host_a.enqueue([b"job"])
    [first] = host_a.lease(1, lease_secs=0.05)
    # host B blocks until A's lease expires (the wait is cut to the deadline), then reclaims it
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


def test_each_lease_keeps_its_own_deadline(open_host) -> None:
    # Redis tracks idle time per entry; the backend must still honour each call's lease_secs
    host_a, host_b = open_host(), open_host()
    [long_id] = host_a.enqueue([b"long"])
    [long_lease] = host_a.lease(1, lease_secs=60)
    [short_id] = host_a.enqueue([b"short"])
    [short_lease] = host_a.lease(1, lease_secs=0.05)
    reclaimed = host_b.lease(10, lease_secs=30, wait_secs=10)
    assert [t.task_id for t in reclaimed] == [short_id]
    assert host_a.ack([long_lease.receipt, short_lease.receipt]) == {
        long_lease.receipt: Outcome.OK, short_lease.receipt: Outcome.LOST}
    assert long_id != short_id


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


def test_blocked_lease_wakes_on_enqueue_from_another_connection(admin, open_host, wait_until) -> None:
    waiter, producer = open_host(), open_host()
    got: list = []
    thread = threading.Thread(target=lambda: got.extend(waiter.lease(5, 30, wait_secs=30)))
    started = time.monotonic()
    thread.start()
    wait_until(lambda: _client_of(admin, waiter, blocked_in="xread"))
    [task_id] = producer.enqueue([b"wake up"])
    thread.join(timeout=30)
    # woke on the enqueue: a missed wake-up would have returned only after the 30 s wait
    assert [t.task_id for t in got] == [task_id]
    assert time.monotonic() - started < 15


def test_wait_for_work_wakes_on_release_and_on_a_due_delay(admin, open_host, wait_until) -> None:
    holder, watcher = open_host(), open_host()
    holder.enqueue([b"job"])
    [leased] = holder.lease(1, 60)
    woke: list[bool] = []
    thread = threading.Thread(target=lambda: woke.append(watcher.wait_for_work(30)))
    thread.start()
    wait_until(lambda: _client_of(admin, watcher, blocked_in="xread"))
    holder.release([leased.receipt], 0)
    thread.join(timeout=30)
    assert woke == [True]

    # a delayed task: the watcher's block is cut to its due time, no enqueue needed
    [again] = holder.lease(1, 60)
    holder.ack([again.receipt])
    holder.enqueue([b"later"], delay_secs=0.2)
    assert watcher.wait_for_work(20) is True
    assert [t.payload for t in holder.lease(5, 60)] == [b"later"]


def test_killed_blocked_connection_fails_once_then_recovers(admin, open_host, wait_until) -> None:
    backend, producer = open_host(), open_host()
    errors: list[BaseException] = []

    def blocked_lease() -> None:
        try:
            backend.lease(1, 30, wait_secs=30)
        except BaseException as exc:  # noqa: BLE001 - the test inspects what surfaced
            errors.append(exc)

    thread = threading.Thread(target=blocked_lease)
    thread.start()
    client = wait_until(lambda: _client_of(admin, backend, blocked_in="xread"))
    admin.client_kill_filter(_id=client["id"])
    thread.join(timeout=30)
    assert len(errors) == 1 and isinstance(errors[0], BackendUnavailable)
    assert "\n" not in str(errors[0])

    ids = producer.enqueue([b"a", b"b"])
    leased = backend.lease(2, 30)  # reconnects on this call
    assert sorted(t.task_id for t in leased) == sorted(ids)
    assert backend.ack([t.receipt for t in leased]) == {t.receipt: Outcome.OK for t in leased}
    assert backend.stats().ready == 0


def test_killed_idle_connection_loses_nothing(admin, open_host) -> None:
    backend = open_host()
    ids = backend.enqueue([b"%d" % i for i in range(10)])
    leased = backend.lease(10, 30)
    admin.client_kill_filter(_id=_client_of(admin, backend)["id"])
    outcomes = None
    failures = 0
    while outcomes is None:  # the caller's retry loop: at most one failure, then the same call again
        try:
            outcomes = backend.ack([t.receipt for t in leased])
        except BackendUnavailable:
            failures += 1
    assert failures <= 1
    assert set(outcomes.values()) == {Outcome.OK} and len(outcomes) == len(ids)
    assert backend.stats() == QueueStats(0, 0, 0, 0, None)


def test_unreachable_server_is_unavailable_not_a_crash(queue) -> None:
    backend = RedisBackend("redis://127.0.0.1:1/0", queue, Path("."))
    with pytest.raises(BackendUnavailable) as info:
        backend.enqueue([b"x"])
    assert "127.0.0.1:1" in str(info.value)
    backend.close()


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
