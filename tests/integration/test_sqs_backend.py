"""SQS backend against moto's server mode, started by this suite (``tests/integration/moto_sqs.py``).

Covers what the shared conformance suite does not: batches split in tens with per-entry failures,
the attempt from ApproximateReceiveCount, long-poll wake-ups, an unreachable endpoint, and the
documented limitations (no fencing of stale receipts, no tag filter, admin calls on dead tasks only,
size and delay caps).
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Iterator

import pytest

from children.backends.base import (
    BackendConfigError,
    BackendUnavailable,
    Outcome,
    TaskState,
)
from tests.backends import require_server
from tests.integration.moto_sqs import moto_available, moto_endpoint, sqs_url, start_moto, stop_moto

try:
    from children.backends.sqs import SqsBackend
except ImportError as exc:  # every test below then FAILS under CI=true and skips elsewhere
    NO_DRIVER = f"boto3 does not import ({str(exc).splitlines()[0]}): pip install 'leasetree[sqs]'"
else:
    NO_DRIVER = ""

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(scope="module", autouse=True)
def driver() -> None:
    """First of all (an autouse fixture of the widest scope): the driver imports."""
    if NO_DRIVER:
        require_server("sqs", NO_DRIVER)


@pytest.fixture(scope="session")
def endpoint() -> Iterator[str]:
    ok, why = moto_available()
    if not ok:
        require_server("sqs", why)
    yield moto_endpoint()
    stop_moto()


@pytest.fixture
def backend(endpoint: str) -> Iterator[SqsBackend]:
    handle = SqsBackend(sqs_url(endpoint), f"t-{uuid.uuid4().hex[:12]}")
    yield handle
    handle.purge()
    handle.close()


def _lease_all(backend: SqsBackend, n: int, lease_secs: float = 30.0) -> list:
    got: list = []
    deadline = time.monotonic() + 20
    while len(got) < n and time.monotonic() < deadline:
        got += backend.lease(100, lease_secs, wait_secs=1)
    return got


def test_batches_are_split_in_tens(backend: SqsBackend) -> None:
    assert backend.limits.max_lease_batch == backend.limits.max_ack_batch == 10
    ids = backend.enqueue([b"%d" % i for i in range(25)])
    first = backend.lease(100, 30.0)
    assert 0 < len(first) <= 10  # clamped to what one ReceiveMessage returns
    got = first + _lease_all(backend, 25 - len(first))
    assert sorted(t.task_id for t in got) == sorted(ids)
    assert {t.payload for t in got} == {b"%d" % i for i in range(25)}
    receipts = [t.receipt for t in got]
    assert set(backend.extend(receipts, 60.0).values()) == {Outcome.OK}
    assert set(backend.ack(receipts).values()) == {Outcome.OK}
    assert backend.stats() == backend.stats().__class__(0, 0, 0, 0, None)


def test_failed_entry_is_lost_and_the_rest_of_the_batch_goes_through(backend: SqsBackend) -> None:
    backend.enqueue([b"a", b"b"])
    got = _lease_all(backend, 2)
    bogus = json.dumps(["no-such-handle", "id", "", "0", "1", ""])
    result = backend.extend([got[0].receipt, bogus, got[1].receipt], 60.0)
    assert result == {got[0].receipt: Outcome.OK, bogus: Outcome.LOST, got[1].receipt: Outcome.OK}
    assert backend.ack(["garbage"]) == {"garbage": Outcome.LOST}


def test_attempt_is_the_receive_count_and_release_delays(backend: SqsBackend) -> None:
    [task_id] = backend.enqueue([b"x"])
    [first] = backend.lease(1, 1.0, wait_secs=5)
    [second] = backend.lease(1, 30.0, wait_secs=10)  # after the 1 s visibility ran out
    assert (first.attempt, second.task_id, second.attempt) == (1, task_id, 2)
    assert backend.release([second.receipt], 2.0) == {second.receipt: Outcome.OK}
    assert backend.lease(1, 30.0) == []  # invisible for the 2 s delay
    [third] = backend.lease(1, 30.0, wait_secs=10)
    assert third.attempt == 3
    assert backend.ack([third.receipt]) == {third.receipt: Outcome.OK}


def test_blocked_lease_wakes_on_enqueue(backend: SqsBackend, endpoint: str) -> None:
    producer = SqsBackend(sqs_url(endpoint), backend._name)
    result: list = []
    thread = threading.Thread(target=lambda: result.append(backend.lease(5, 30.0, wait_secs=15)))
    started = time.monotonic()
    thread.start()
    try:
        [task_id] = producer.enqueue([b"wake"])
        thread.join(20)
        assert not thread.is_alive()
        assert [t.task_id for t in result[0]] == [task_id]
        assert time.monotonic() - started < 12  # woken by the message, not by the 15 s long poll
    finally:
        producer.close()


def test_dead_letter_moves_to_the_dead_queue_and_requeue_keeps_the_id(backend: SqsBackend) -> None:
    [task_id] = backend.enqueue([b"poison"], tag="blue")
    [first] = backend.lease(1, 30.0, wait_secs=5)
    assert backend.dead_letter([first.receipt], "too many\nattempts") == {first.receipt: Outcome.OK}
    [dead] = backend.list_tasks(TaskState.DEAD)
    assert (dead.task_id, dead.payload, dead.tag, dead.attempt, dead.dead_reason) == (
        task_id, b"poison", "blue", 1, "too many attempts")
    assert backend.get(task_id) == dead
    assert backend.stats().dead == 1
    assert backend.requeue_dead([task_id]) == 1
    [back] = backend.lease(1, 30.0, wait_secs=5)
    assert (back.task_id, back.attempt, back.tag) == (task_id, 1, "blue")
    backend.dead_letter([back.receipt], "again")
    assert backend.delete([task_id]) == 1
    assert backend.stats().dead == 0


def test_documented_limit_stale_receipt_is_not_fenced(backend: SqsBackend) -> None:
    backend.enqueue([b"x"])
    [first] = backend.lease(1, 1.0, wait_secs=5)
    [second] = backend.lease(1, 30.0, wait_secs=10)
    assert second.attempt == 2
    # SQS keeps old receipt handles usable: the stale ack is not reported LOST (moto even deletes)
    assert backend.ack([first.receipt]) == {first.receipt: Outcome.OK}


def test_documented_limits_are_one_line_errors(backend: SqsBackend) -> None:
    with pytest.raises(BackendConfigError, match="cannot lease by tag"):
        backend.lease(1, 30.0, tag="red")
    with pytest.raises(BackendConfigError, match="cannot lease by tag"):
        backend.lease(1, 30.0, tag="")  # "" means untagged only: SQS cannot filter that either
    for call in (lambda: backend.list_tasks(), lambda: backend.list_tasks(TaskState.READY),
                 lambda: backend.get("nope")):
        with pytest.raises(BackendConfigError, match="dead tasks only") as err:
            call()
        assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match="256 KiB"):
        backend.enqueue([b"x" * (backend.limits.max_payload_bytes + 1)])
    backend.enqueue([b"x" * backend.limits.max_payload_bytes])  # the largest that fits is accepted
    with pytest.raises(ValueError, match="900 s"):
        backend.enqueue([b"x"], delay_secs=901)


def test_bad_url_and_name_are_config_errors(endpoint: str) -> None:
    with pytest.raises(BackendConfigError, match="unknown sqs:// option 'bogus'"):
        SqsBackend(sqs_url(endpoint) + "&bogus=1", "q")
    with pytest.raises(BackendConfigError, match="queue.name"):
        SqsBackend(sqs_url(endpoint), "has.dot")


def test_unreachable_endpoint_is_unavailable() -> None:
    process, endpoint = start_moto()
    backend = SqsBackend(sqs_url(endpoint), "gone")
    try:
        backend.enqueue([b"x"])
        process.terminate()
        process.wait(10)
        with pytest.raises(BackendUnavailable, match="gone"):
            backend.lease(1, 30.0)
        with pytest.raises(BackendUnavailable):
            SqsBackend(sqs_url(endpoint), "other")
    finally:
        backend.close()
        if process.poll() is None:
            process.kill()
