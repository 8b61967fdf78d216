"""A backend a child opens when it can, not before it may start.

The root's preflight opens the queue once before the tree starts, so a wrong URL, a missing driver
or an unreadable file is a one-line error at ``supervise run``. Later, a child restarted while the
queue is unreachable (Redis restarting, a database file made read-only or its disk full for a
moment) meets the same error in its constructor. Failing the start then would be retried at once by
the supervisor -- OTP retries a failed start immediately and counts it -- and ten failures in well
under a second spend the root's restart intensity: the whole tree gives up over a fault that an
operator repairs in seconds. Celery's worker, in the same spot, keeps retrying its broker
connection with backoff.

So the leaser and the reaper open the queue through ``open_when_possible``: when the first open
fails, the child starts anyway with a ``DeferredBackend`` whose every call tries to open the queue
first and, while that fails, raises the open's error -- which the child's usual per-call backoff
(the same one that rides out a fault of a running queue) then handles.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from children.backends.base import Backend, BackendError, Limits


class DeferredBackend:
    """Stands in for a backend that did not open yet; answers the same calls (see ``Backend``)."""

    def __init__(self, opener: Callable[[], Backend], log: logging.Logger) -> None:
        self._opener = opener
        self._backend: Backend | None = None
        self._log = log

    @property
    def opened(self) -> bool:
        return self._backend is not None

    def _open(self) -> Backend:
        if self._backend is None:
            self._backend = self._opener()  # a BackendError goes to the caller, as a failed call
            self._log.info("queue opened")
        return self._backend

    @property
    def limits(self) -> Limits:
        # Callers read the limits to split a batch just before they call; while the queue is
        # closed the call fails anyway, so the defaults are only a placeholder.
        try:
            return self._open().limits
        except BackendError:
            return Limits()

    def __getattr__(self, name: str) -> Any:
        if self._backend is not None:
            return getattr(self._backend, name)

        def call(*args: Any, **kwargs: Any) -> Any:  # a method: the open is part of the call
            return getattr(self._open(), name)(*args, **kwargs)
        return call

    def close(self) -> None:
        if self._backend is not None:
            self._backend.close()


def open_when_possible(opener: Callable[[], Backend], log: logging.Logger, what: str) -> Backend:
    """``opener()``, or a ``DeferredBackend`` that keeps trying it when the first try fails."""
    try:
        return opener()
    except BackendError as exc:
        log.warning("%s: queue not open yet, starting anyway and retrying with backoff: %s", what, exc)
        return DeferredBackend(opener, log)  # type: ignore[return-value]
