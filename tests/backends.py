"""The backends the tests run against, by name; the conformance suite runs every one of them.

``BACKENDS[name](queue)`` opens a handle on queue ``queue`` of that backend. Calling it again with
the same queue name, in this process or in a spawned one, opens another handle on the same queue
(that is how the suite races holders). Give each test its own queue name (``unique_queue()``).

To add a backend that needs a server (redis, postgresql, nats, sqs):
1. add its factory to ``BACKENDS``;
2. add a probe to ``PROBES`` returning ``(True, "")`` when the server answers, else
   ``(False, "why, e.g. no Redis on 127.0.0.1:6379")``; tests call ``available(name)`` and, when it is
   False, ``require_server(name, reason)``, which FAILS under ``CI=true`` and SKIPS otherwise;
3. if its queues live inside one process only, add it to ``PROCESS_LOCAL``.
"""

from __future__ import annotations

import atexit
import functools
import os
import shutil
import tempfile
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import NoReturn

import pytest

from children.backends.base import Backend
from children.backends.memory import MemoryBackend
from children.backends.sqlite import SqliteBackend

_TEST_DIR_ENV = "LEASETREE_TEST_DIR"


def test_dir() -> Path:
    """A folder private to this test session, shared with the processes it spawns (through the
    environment, which spawned children inherit) and removed when the session's process exits."""
    folder = os.environ.get(_TEST_DIR_ENV)
    if folder and os.path.isdir(folder):
        return Path(folder)
    folder = tempfile.mkdtemp(prefix="leasetree-tests-")
    os.environ[_TEST_DIR_ENV] = folder
    owner = os.getpid()
    atexit.register(lambda: os.getpid() == owner and shutil.rmtree(folder, ignore_errors=True))
    return Path(folder)


test_dir.__test__ = False  # type: ignore[attr-defined]  # not a test, whatever its name


def unique_queue(prefix: str = "q") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


def _memory(queue: str) -> Backend:
    # the key makes handles with the same queue name share one store in this process
    return MemoryBackend("memory://tests", queue)


def _sqlite(queue: str) -> Backend:
    # one file for every queue of the session: it also proves queues in one file stay apart
    return SqliteBackend("sqlite:///conformance.db", queue, test_dir())


# redis and postgresql: the servers on this machine, or LEASETREE_TEST_<NAME>_URL
SERVER_URLS = {
    "redis": os.environ.get("LEASETREE_TEST_REDIS_URL", "redis://127.0.0.1:6379/0"),
    "postgresql": os.environ.get("LEASETREE_TEST_POSTGRESQL_URL", "postgresql://postgres@127.0.0.1:5432/test"),
    "nats": os.environ.get("LEASETREE_TEST_NATS_URL", "nats://127.0.0.1:4222"),
}


def _server_backend(name: str, queue: str) -> Backend:
    from children.backends import open_backend

    return open_backend(SERVER_URLS[name], queue, test_dir())


@functools.cache
def _probe(name: str) -> tuple[bool, str]:
    """Open a handle and ask for stats: proves driver, server and credentials in one call (once per
    session: a server does not come and go during a test run)."""
    from children.backends import BackendError

    try:
        backend = _server_backend(name, "probe")
        try:
            backend.stats()
        finally:
            backend.close()
    except (BackendError, ModuleNotFoundError) as exc:
        return False, f"{SERVER_URLS[name]}: {exc}"
    return True, ""


def _nats(queue: str) -> Backend:
    from tests.integration.nats_js import drop_at_exit

    drop_at_exit(SERVER_URLS["nats"], queue)  # JetStream streams outlive the test otherwise
    return _server_backend("nats", queue)


def _sqs(queue: str) -> Backend:
    # moto's server mode, started by the suite on first use (tests/integration/moto_sqs.py)
    from children.backends.sqs import SqsBackend
    from tests.integration.moto_sqs import moto_endpoint, sqs_url

    return SqsBackend(sqs_url(moto_endpoint()), queue, test_dir())


BACKENDS: dict[str, Callable[[str], Backend]] = {
    "memory": _memory,
    "sqlite": _sqlite,
    "redis": lambda queue: _server_backend("redis", queue),
    "postgresql": lambda queue: _server_backend("postgresql", queue),
    "nats": _nats,
    "sqs": _sqs,
}

#: backends whose queues cannot be reached from another process
PROCESS_LOCAL: set[str] = {"memory"}

#: capabilities a backend lacks, each with why (its module docstring has the detail). A conformance
#: case that NEEDS one is a strict xfail for that backend: the limitation stays on record, and a
#: backend that gains the capability shows up as XPASS until its entry here is removed.
LACKS: dict[str, dict[str, str]] = {
    "nats": {"mixed_tags": "a JetStream work-queue stream refuses an unfiltered consumer beside tag "
                           "consumers: a queue is leased by tags or without, not both",
             "uncount": "JetStream counts deliveries itself: a release cannot take one back"},
    "sqs": {"fencing": "SQS keeps old receipt handles usable: a stale receipt is not detected",
            "tags": "SQS cannot filter a receive by attribute: lease by tag is refused",
            "uncount": "SQS counts receives itself: a release cannot take one back",
            "live_admin": "SQS cannot read, list or delete a message without leasing it: admin "
                          "calls see dead tasks only, and there is no oldest age",
            "exclusive_delivery": "an SQS standard queue delivers at least once: now and then a message "
                                  "is received twice (moto's threaded server does it under racing receives)"},
}
#: limitations that show only sometimes: their cases are xfail without strict (XPASS is no error)
SOMETIMES: set[str] = {"exclusive_delivery"}
NEEDS: dict[str, set[str]] = {
    "test_stale_receipts_settle_nothing": {"fencing"},
    "test_tag_filter_selects_exactly_that_tag": {"tags", "mixed_tags"},
    "test_ack_twice_is_idempotent": {"live_admin"},
    "test_release_with_delay_hides_the_task_until_then": {"live_admin"},
    "test_payloads_are_byte_exact": {"live_admin"},
    "test_admin_calls_list_get_delete_purge_and_count": {"live_admin"},
    "test_delete_of_a_leased_task_makes_its_receipt_lost": {"live_admin"},
    "test_threads_racing_never_share_a_task": {"exclusive_delivery"},
    "test_processes_racing_never_share_a_task": {"exclusive_delivery"},
    "test_release_without_counting_keeps_the_attempt": {"uncount"},
}


def limitation(name: str, test: str) -> dict | None:
    """The ``pytest.mark.xfail`` arguments when backend ``name`` is expected to fail conformance case
    ``test`` (reason, strict), or None."""
    lacks = LACKS.get(name, {})
    caps = sorted(cap for cap in NEEDS.get(test, ()) if cap in lacks)
    if not caps:
        return None
    return {"reason": "; ".join(lacks[cap] for cap in caps), "strict": not SOMETIMES.intersection(caps)}

#: name -> probe answering (reachable, reason); backends without a probe are always available
PROBES: dict[str, Callable[[], tuple[bool, str]]] = {
    "redis": lambda: _probe("redis"),
    "postgresql": lambda: _probe("postgresql"),
    "nats": lambda: _probe("nats"),
    "sqs": lambda: __import__("tests.integration.moto_sqs", fromlist=["x"]).moto_available(),
}


def available(name: str) -> tuple[bool, str]:
    """Whether backend ``name`` can run here, and if not, why (one line)."""
    if name not in BACKENDS:
        return False, f"no backend named {name!r} in tests/backends.py"
    probe = PROBES.get(name)
    return probe() if probe else (True, "")


def require_server(name: str, reason: str) -> NoReturn:
    """Stop this test because backend ``name`` cannot run: a failure when ``CI=true`` (CI must run
    every backend), a skip with the reason otherwise."""
    message = f"{name} backend unavailable: {reason}"
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(message, pytrace=False)
    pytest.skip(message)


def lease_until_empty(kind: str, queue: str, batch: int, start, results) -> None:
    """Child-process body for the racing tests: open a handle, wait for ``start`` (an Event), lease
    in batches of ``batch`` until the queue is empty, and put the task ids it got on ``results``."""
    backend = BACKENDS[kind](queue)
    try:
        start.wait(30)
        got: list[str] = []
        while batch_got := backend.lease(batch, 300.0):
            got.extend(task.task_id for task in batch_got)
        results.put(got)
    finally:
        backend.close()
