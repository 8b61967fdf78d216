"""The restart matrix: one test per strategy x restart type x exit reason, as OTP's supervisor_SUITE.

Scenario: three children ``a``, ``b``, ``c`` started in that order; ``b`` has the restart type under
test (for simple_one_for_one: three dynamic children of one spec with that type, ``b`` = ``w.1``),
then ``b`` exits with the reason under test. Pure: TreeCore + FakeProcesses, no processes, no sleeps.
"""

from __future__ import annotations

import pytest

from supervisor import reasons
from supervisor.core import TreeCore
from supervisor.spec import ChildSpec, SupFlags
from supervisor.testing import FakeProcesses

pytestmark = pytest.mark.timeout(10)

EXITS = {"normal": reasons.NORMAL, "shutdown": reasons.SHUTDOWN, "abnormal": reasons.abnormal("exit 3")}


def worker(name: str, restart: str = "permanent") -> ChildSpec:
    return ChildSpec(name, ("m", "f", ()), restart=restart)


def build(strategy: str, restart: str) -> tuple[FakeProcesses, list[str]]:
    flags = SupFlags(strategy, intensity=10, period=60)
    if strategy == "simple_one_for_one":
        core = TreeCore(flags, [worker("w", restart)], initial_extra_args=((), (), ()))
        names = ["w.0", "w.1", "w.2"]
    else:
        core = TreeCore(flags, [worker("a"), worker("b", restart), worker("c")])
        names = ["a", "b", "c"]
    fake = FakeProcesses(core)
    fake.start()
    assert fake.started() == names
    fake.clear_history()
    return fake, names


def check(strategy: str, restart: str, exit_kind: str) -> None:
    # Given
    fake, (a, b, c) = build(strategy, restart)
    before = {n: fake.pid(n) for n in (a, b, c)}
    # When
    fake.exit(b, EXITS[exit_kind])
    # Then
    restarted = restart == "permanent" or (restart == "transient" and exit_kind == "abnormal")
    ids = [row["id"] for row in fake.core.query("which_children")]
    if not restarted:
        assert fake.history == [("exit", f"root/{b}")], "nobody else is touched"
        assert fake.pid(a) == before[a] and fake.pid(c) == before[c]
        kept = restart == "transient" and strategy != "simple_one_for_one"
        assert (b in ids) is kept
        if kept:
            row = next(r for r in fake.core.query("which_children") if r["id"] == b)
            assert row["pid"] is None and row["state"] == "undefined"
        return
    assert fake.pid(b) not in (None, before[b])
    if strategy == "one_for_all":
        assert fake.stopped() == [c, a]
        assert fake.started() == [a, b, c]
        assert all(fake.pid(n) != before[n] for n in (a, c))
    elif strategy == "rest_for_one":
        assert fake.stopped() == [c]
        assert fake.started() == [b, c]
        assert fake.pid(a) == before[a] and fake.pid(c) != before[c]
    else:
        assert fake.stopped() == [] and fake.started() == [b]
        assert fake.pid(a) == before[a] and fake.pid(c) == before[c]
    assert ids == [c, b, a] or strategy == "simple_one_for_one"
    assert fake.core.query("count_children")["active"] == 3


def _make(strategy: str, restart: str, exit_kind: str):
    def test() -> None:
        check(strategy, restart, exit_kind)
    test.__name__ = f"test_{strategy}_{restart}_{exit_kind}"
    test.__doc__ = f"{strategy}: a {restart} child exits {exit_kind}."
    return test


for _strategy in ("one_for_one", "one_for_all", "rest_for_one", "simple_one_for_one"):
    for _restart in ("permanent", "transient", "temporary"):
        for _exit in ("normal", "shutdown", "abnormal"):
            _test = _make(_strategy, _restart, _exit)
            globals()[_test.__name__] = _test
