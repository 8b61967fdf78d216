"""NATS JetStream backend against a real server: fencing, wake-ups, reconnects, documented limits.

Uses the server on 127.0.0.1:4222 (LEASETREE_TEST_NATS_URL overrides it); the reconnect tests start
a private ``nats-server -js`` on a free port so they can kill and restart it. The shared conformance
suite covers the rest of the interface.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from children.backends.base import (
    BackendConfigError,
    BackendUnavailable,
    Outcome,
    TaskState,
)
from tests.backends import require_server
from tests.integration.nats_js import drop_queue

try:
    import nats
    from nats.js.errors import NotFoundError

    from children.backends.nats import NatsBackend
except ImportError as exc:  # every test below then FAILS under CI=true and skips elsewhere
    NO_DRIVER = f"nats-py does not import ({str(exc).splitlines()[0]}): pip install 'leasetree[nats]'"
else:
    NO_DRIVER = ""

URL = os.environ.get("LEASETREE_TEST_NATS_URL", "nats://127.0.0.1:4222")
pytestmark = pytest.mark.timeout(60)


@pytest.fixture(scope="module", autouse=True)
def driver() -> None:
    """First of all (an autouse fixture of the widest scope): the driver imports."""
    if NO_DRIVER:
        require_server("nats", NO_DRIVER)


def _reachable(url: str) -> bool:
    host, _, port = url.split("://", 1)[1].rpartition(":")
    try:
        with socket.create_connection((host, int(port)), timeout=1):
            return True
    except OSError:
        return False


async def _consumer_waiting(url: str, name: str, consumer: str) -> int:
    nc = await nats.connect(url, allow_reconnect=False)
    try:
        info = await nc.jetstream().consumer_info(f"LT_{name}_TASKS", consumer)
        return info.num_waiting or 0
    except NotFoundError:
        return 0  # the leasing thread has not created its consumer yet
    finally:
        await nc.close()


@pytest.fixture
def queue() -> Iterator[str]:
    if not _reachable(URL):
        require_server("nats", f"no NATS server with JetStream at {URL}")
    name = f"t-{uuid.uuid4().hex[:12]}"
    yield name
    drop_queue(URL, name)


@pytest.fixture
def backend(queue: str) -> Iterator[NatsBackend]:
    handle = NatsBackend(URL, queue)
    yield handle
    handle.close()


@pytest.fixture
def other(queue: str) -> Iterator[NatsBackend]:
    """A second handle on the same queue: another host's leaser."""
    handle = NatsBackend(URL, queue)
    yield handle
    handle.close()


def test_roundtrip_counts_attempts_from_num_delivered(backend: NatsBackend) -> None:
    ids = backend.enqueue([b"a", b"b"], tag="")
    got = backend.lease(10, 30.0)
    assert [(t.task_id, t.payload, t.attempt) for t in got] == [(ids[0], b"a", 1), (ids[1], b"b", 1)]
    assert backend.stats().leased == 2
    assert backend.release([got[0].receipt]) == {got[0].receipt: Outcome.OK}
    again = backend.lease(10, 30.0)
    assert [(t.task_id, t.attempt) for t in again] == [(ids[0], 2)]
    assert backend.ack([again[0].receipt, got[1].receipt]) == {
        again[0].receipt: Outcome.OK, got[1].receipt: Outcome.OK}
    stats = backend.stats()
    assert (stats.ready, stats.leased, stats.delayed, stats.dead) == (0, 0, 0, 0)


def test_stale_receipt_cannot_settle_the_redelivery(backend: NatsBackend, other: NatsBackend,
                                                    wait_until) -> None:
    [task_id] = backend.enqueue([b"x"])
    [first] = backend.lease(1, 1.0)  # AckWait 1 s, never extended
    [second] = other.lease(1, 1.0, wait_secs=10)  # the redelivery, to another holder
    assert (second.task_id, second.attempt) == (task_id, 2)
    stale = first.receipt
    assert backend.extend([stale], 1.0) == {stale: Outcome.LOST}
    assert backend.release([stale], 0.0) == {stale: Outcome.LOST}
    assert backend.dead_letter([stale], "stale") == {stale: Outcome.LOST}
    assert backend.ack([stale]) == {stale: Outcome.LOST}
    info = backend.get(task_id)
    assert info is not None and info.state == TaskState.LEASED and info.attempt == 2
    assert other.ack([second.receipt]) == {second.receipt: Outcome.OK}
    assert backend.get(task_id) is None


def test_receipt_of_the_second_delivery_is_stale_after_the_third(backend: NatsBackend) -> None:
    [task_id] = backend.enqueue([b"x"])
    backend.lease(1, 1.0)
    [second] = backend.lease(1, 1.0, wait_secs=10)
    [third] = backend.lease(1, 1.0, wait_secs=10)
    assert [second.attempt, third.attempt] == [2, 3]
    assert backend.ack([second.receipt]) == {second.receipt: Outcome.LOST}
    assert backend.ack([third.receipt]) == {third.receipt: Outcome.OK}
    assert backend.get(task_id) is None


def test_settled_receipt_cannot_extend(backend: NatsBackend) -> None:
    backend.enqueue([b"x"])
    [task] = backend.lease(1, 30.0)
    assert backend.ack([task.receipt]) == {task.receipt: Outcome.OK}
    assert backend.extend([task.receipt], 30.0) == {task.receipt: Outcome.LOST}
    assert backend.ack(["not-a-receipt"]) == {"not-a-receipt": Outcome.LOST}


def test_blocked_lease_wakes_on_enqueue(backend: NatsBackend, other: NatsBackend, queue: str,
                                        wait_until) -> None:
    result: list = []
    started = time.monotonic()
    thread = threading.Thread(target=lambda: result.append(backend.lease(5, 30.0, wait_secs=30)))
    thread.start()
    # the lease is parked on the server as a waiting pull request before anything is enqueued
    wait_until(lambda: asyncio.run(_consumer_waiting(URL, queue, "lt-all")) >= 1, what="a waiting pull")
    [task_id] = other.enqueue([b"wake"])
    thread.join(20)
    assert not thread.is_alive()
    assert [t.task_id for t in result[0]] == [task_id]
    assert time.monotonic() - started < 20  # woken by the task, not by its 30 s deadline


def test_wait_for_work_wakes_on_enqueue(backend: NatsBackend, other: NatsBackend) -> None:
    assert backend.wait_for_work(0.2) is False
    woke: list[bool] = []
    thread = threading.Thread(target=lambda: woke.append(backend.wait_for_work(30)))
    thread.start()
    other.enqueue([b"wake"])
    thread.join(20)
    assert woke == [True]
    assert backend.wait_for_work(30) is True  # ready work already there: no wait at all


def test_tags_are_subjects_and_cannot_be_mixed_with_untagged_leasing(backend: NatsBackend) -> None:
    [a] = backend.enqueue([b"a"], tag="red")
    [b] = backend.enqueue([b"b"], tag="blue")
    [c] = backend.enqueue([b"c"])
    assert [(t.task_id, t.tag) for t in backend.lease(10, 30.0, tag="red")] == [(a, "red")]
    assert [t.task_id for t in backend.lease(10, 30.0, tag="")] == [c]
    assert [t.task_id for t in backend.lease(10, 30.0, tag="blue")] == [b]
    with pytest.raises(BackendConfigError, match="cannot be leased without a tag while it is leased by tags"):
        backend.lease(10, 30.0)
    with pytest.raises(ValueError, match="tag"):
        backend.enqueue([b"x"], tag="a.b")


def test_delayed_enqueue_becomes_ready_with_its_id(backend: NatsBackend) -> None:
    [task_id] = backend.enqueue([b"later"], delay_secs=1.0)
    assert backend.stats().delayed == 1
    assert backend.get(task_id).state == TaskState.DELAYED
    assert backend.lease(5, 30.0) == []
    [task] = backend.lease(5, 30.0, wait_secs=10)
    assert (task.task_id, task.attempt, task.payload) == (task_id, 1, b"later")


def test_dead_letter_keeps_reason_attempt_and_last_error(backend: NatsBackend) -> None:
    [task_id] = backend.enqueue([b"poison"])
    [first] = backend.lease(1, 30.0)
    assert backend.release([first.receipt], 0.0, errors=["exit 3"]) == {first.receipt: Outcome.OK}
    [second] = backend.lease(1, 30.0)
    assert backend.dead_letter([second.receipt], "too many attempts") == {second.receipt: Outcome.OK}
    assert backend.dead_letter([second.receipt], "again") == {second.receipt: Outcome.LOST}
    [dead] = backend.list_tasks(TaskState.DEAD)
    assert (dead.task_id, dead.attempt, dead.dead_reason, dead.last_error) == (
        task_id, 2, "too many attempts", "exit 3")
    stats = backend.stats()
    assert (stats.ready, stats.leased, stats.dead) == (0, 0, 1)
    assert backend.requeue_dead([task_id]) == 1
    [back] = backend.lease(1, 30.0)
    assert (back.task_id, back.attempt) == (task_id, 1)


def test_documented_limit_released_task_shows_as_leased_until_redelivered(backend: NatsBackend) -> None:
    [task_id] = backend.enqueue([b"x"])
    [task] = backend.lease(1, 30.0)
    backend.release([task.receipt], 0.0)
    # a nak'd message stays in the consumer's pending set: JetStream shows no per-message state
    assert backend.get(task_id).state == TaskState.LEASED
    [again] = backend.lease(1, 30.0)
    assert (again.task_id, again.attempt) == (task_id, 2)
    # a release with a delay moves the task to the delay stream, where it is DELAYED
    backend.release([again.receipt], 60.0, errors=["exit 1"])
    info = backend.get(task_id)
    assert (info.state, info.attempt, info.last_error) == (TaskState.DELAYED, 2, "exit 1")
    assert backend.stats().delayed == 1


def test_oversized_payload_and_bad_names_are_one_line_errors(backend: NatsBackend) -> None:
    with pytest.raises(ValueError, match=r"over the \d+-byte limit") as err:
        backend.enqueue([b"x" * (backend.limits.max_payload_bytes + 1)])
    assert "\n" not in str(err.value)
    with pytest.raises(BackendConfigError, match="queue.name"):
        NatsBackend(URL, "has.dot")
    with pytest.raises(BackendConfigError, match="unknown nats:// option 'bogus'"):
        NatsBackend(URL + "?bogus=1", "fine")


# -- connection loss, against a private server ----------------------------------------------------
def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class _Server:
    def __init__(self, store: Path) -> None:
        self.port, self.store, self.process = _free_port(), store, None

    def start(self, wait_until) -> None:
        self.process = subprocess.Popen(
            [shutil.which("nats-server") or "nats-server", "-a", "127.0.0.1", "-p", str(self.port), "-js",
             "-sd", str(self.store)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_until(lambda: _reachable(self.url), timeout=20, what="nats-server to listen")

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            self.process.wait(20)
            self.process = None

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"


@pytest.fixture
def server(tmp_path: Path, wait_until) -> Iterator[_Server]:
    if shutil.which("nats-server") is None:
        require_server("nats", "no nats-server binary to start a private server")
    private = _Server(tmp_path / "js")
    private.start(wait_until)
    yield private
    private.stop()


def test_connection_loss_is_unavailable_then_reconnects(server: _Server, wait_until) -> None:
    backend = NatsBackend(server.url + "?timeout=1", "recon")
    try:
        [task_id] = backend.enqueue([b"survives"])
        server.stop()
        with pytest.raises(BackendUnavailable):
            backend.lease(1, 30.0)
        with pytest.raises(BackendUnavailable):
            backend.enqueue([b"lost"])
        server.start(wait_until)

        def lease_after_reconnect() -> list:
            try:
                return backend.lease(1, 30.0)
            except BackendUnavailable:
                return []

        # nats-py reconnects by itself; the stream is on disk, so the task is still there
        [task] = wait_until(lease_after_reconnect, timeout=20, interval=0.1, what="a lease after reconnect")
        assert task.task_id == task_id
        assert backend.ack([task.receipt]) == {task.receipt: Outcome.OK}
    finally:
        backend.close()


def test_unreachable_server_is_unavailable() -> None:
    with pytest.raises(BackendUnavailable, match="cannot connect|no answer"):
        NatsBackend(f"nats://127.0.0.1:{_free_port()}?timeout=1", "nobody")
