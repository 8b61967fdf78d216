"""Fixtures shared by unit and integration tests. Keep each one small; add yours below."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import pytest

from tests.integration.harness import wait_until as _wait_until

T = TypeVar("T")


@pytest.fixture
def wait_until() -> Callable[..., object]:
    """``wait_until(predicate, timeout=10, interval=0.01, what="...")`` -> the truthy value."""
    return _wait_until
