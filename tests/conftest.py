"""Fixtures shared by unit and integration tests. Keep each one small; add yours below."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import TypeVar

import pytest

from tests.integration import server_control
from tests.integration.harness import wait_until as _wait_until

T = TypeVar("T")


@pytest.fixture
def wait_until() -> Callable[..., object]:
    """``wait_until(predicate, timeout=10, interval=0.01, what="...")`` -> the truthy value."""
    return _wait_until


@pytest.fixture(scope="session", autouse=True)
def local_servers_back_up(request: pytest.FixtureRequest) -> Iterator[None]:
    """The net under the outage tests: at the end of the session, start again any of the machine's
    servers (PostgreSQL, Redis, NATS) that answered at its start and no longer does, so the next run
    (CI's included) finds them. A test that stops a server brings it back itself; this catches the
    one that could not (cut off by its timeout, say), and says so."""
    up_at_start = server_control.local_servers_up()
    yield
    down = sorted(up_at_start - server_control.local_servers_up())
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    for name in down:
        if reporter is not None:
            reporter.write_line(f"tests/conftest.py: {name} was left down by a test; starting it again")
        server_control.start_local(name)
