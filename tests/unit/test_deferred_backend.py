"""``children/backends/deferred.py``: a child whose queue will not open starts anyway, and each
call tries the open again, failing as the open fails, until it opens."""

from __future__ import annotations

import logging

import pytest

from children.backends import Backend, BackendConfigError, BackendUnavailable, Limits
from children.backends.deferred import DeferredBackend, open_when_possible
from children.backends.memory import MemoryBackend

LOG = logging.getLogger("test")


class FlakyOpener:
    """Fails the first ``failures`` opens with ``error``, then opens a memory queue."""

    def __init__(self, failures: int, error: type[Exception] = BackendUnavailable) -> None:
        self.failures = failures
        self.error = error
        self.opens = 0
        self.opened: list[MemoryBackend] = []

    def __call__(self) -> Backend:
        self.opens += 1
        if self.opens <= self.failures:
            raise self.error(f"open {self.opens} refused")
        backend = MemoryBackend("memory://", "q")
        backend.enqueue([b"waiting"])
        self.opened.append(backend)
        return backend


def test_a_queue_that_opens_is_returned_as_it_is():
    opener = FlakyOpener(0)
    assert open_when_possible(opener, LOG, "leaser") is opener.opened[0]


@pytest.mark.parametrize("error", [BackendUnavailable, BackendConfigError])
def test_a_queue_that_will_not_open_yet_fails_each_call_until_it_opens(error, caplog):
    opener = FlakyOpener(3, error)
    backend = open_when_possible(opener, LOG, "leaser")
    assert isinstance(backend, DeferredBackend) and not backend.opened
    assert "leaser: queue not open yet" in caplog.text and "open 1 refused" in caplog.text
    with pytest.raises(error, match="open 2 refused"):
        backend.lease(10, 30.0)
    assert backend.limits == Limits()  # open 3 refused: a placeholder, the call after fails anyway
    assert opener.opens == 3
    [task] = backend.lease(10, 30.0)  # open 4: the call goes through
    assert task.payload == b"waiting" and backend.opened and opener.opens == 4
    assert backend.ack([task.receipt]) == {task.receipt: "ok"}
    assert opener.opens == 4  # opened once, kept


def test_close_before_the_open_opens_nothing():
    opener = FlakyOpener(1)
    backend = open_when_possible(opener, LOG, "reaper")
    backend.close()
    assert opener.opens == 1 and opener.opened == []


def test_an_error_that_is_not_a_backend_error_is_not_swallowed():
    def broken() -> Backend:
        raise RuntimeError("a bug, not a queue fault")

    with pytest.raises(RuntimeError):
        open_when_possible(broken, LOG, "leaser")
