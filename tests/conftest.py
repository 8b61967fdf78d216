"""Fixtures shared by unit and integration tests. Keep each one small; add yours below."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

import pytest

T = TypeVar("T")


def _wait_until(predicate: Callable[[], T], timeout: float = 10.0, interval: float = 0.01,
                what: str = "condition") -> T:
    """Call ``predicate`` until it returns something truthy (returned) or ``timeout`` seconds pass
    (AssertionError naming ``what``). For tests: wait on a condition, never sleep and hope."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


@pytest.fixture
def wait_until() -> Callable[..., object]:
    """``wait_until(predicate, timeout=10, interval=0.01, what="...")`` -> the truthy value."""
    return _wait_until
