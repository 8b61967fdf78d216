"""Child specs and flags: OTP's defaults and validation errors [§3 rows 5, 6, 7]; exit reasons;
the intensity window; heartbeat liveness and stats."""

from __future__ import annotations

import pytest

from supervisor import reasons
from supervisor.heartbeat import Liveness, StatsBook
from supervisor.intensity import add_restart, exceeded
from supervisor.spec import ChildSpec, SpecError, SupervisorStart, SupFlags

pytestmark = pytest.mark.timeout(10)

MFA = ("pkg.mod", "main", ())


def test_childspec_defaults() -> None:
    spec = ChildSpec("a", MFA)
    assert (spec.restart, spec.shutdown, spec.type, spec.significant) == ("permanent", 5.0, "worker", False)
    child_sup = ChildSpec("s", SupervisorStart(SupFlags(), ()))
    assert (child_sup.type, child_sup.shutdown) == ("supervisor", "infinity")
    assert SupFlags() == SupFlags("one_for_one", 1, 5.0, "never")


@pytest.mark.parametrize("kwargs, where", [
    ({"id": ""}, "id"),
    ({"start": ("m", "f")}, "start"),
    ({"start": ("m", "", ())}, "start"),
    ({"start": "m:f"}, "start"),
    ({"restart": "always"}, "restart"),
    ({"shutdown": -1}, "shutdown"),
    ({"shutdown": "later"}, "shutdown"),
    ({"shutdown": True}, "shutdown"),
    ({"type": "thread"}, "type"),
    ({"type": "supervisor"}, "start"),
    ({"significant": "yes", "restart": "transient"}, "significant"),
    ({"significant": True}, "significant"),  # bad_combination with permanent
])
def test_childspec_validation(kwargs: dict, where: str) -> None:
    args = {"id": "a", "start": MFA} | kwargs
    with pytest.raises(SpecError) as info:
        ChildSpec(**args)
    assert info.value.where.endswith(where)
    assert repr(args.get(where.split(".")[-1], "")) in str(info.value) or where == "start"


def test_childspec_from_dict_errors_name_the_missing_field() -> None:
    with pytest.raises(SpecError, match="id"):
        ChildSpec.from_dict({"start": ["m", "f", []]})
    with pytest.raises(SpecError, match="start"):
        ChildSpec.from_dict({"id": "x"})
    assert ChildSpec.from_dict({"id": "x", "start": ["m", "f", [1]]}).start == ("m", "f", (1,))


def test_children_rules() -> None:
    with pytest.raises(SpecError, match="duplicate"):
        SupervisorStart(SupFlags(), (ChildSpec("a", MFA), ChildSpec("a", MFA)))
    with pytest.raises(SpecError, match="auto_shutdown"):
        SupervisorStart(SupFlags(), (ChildSpec("a", MFA, restart="transient", significant=True),))
    with pytest.raises(SpecError, match="exactly one"):
        SupervisorStart(SupFlags("simple_one_for_one"), (ChildSpec("a", MFA), ChildSpec("b", MFA)))
    with pytest.raises(SpecError, match="only for simple_one_for_one"):
        SupervisorStart(SupFlags(), (ChildSpec("a", MFA),), initial_extra_args=((1,),))


@pytest.mark.parametrize("kwargs, field", [
    ({"strategy": "one_for_some"}, "strategy"),
    ({"intensity": -1}, "intensity"),
    ({"intensity": 1.5}, "intensity"),
    ({"intensity": True}, "intensity"),
    ({"period": 0}, "period"),
    ({"period": -3}, "period"),
    ({"auto_shutdown": "sometimes"}, "auto_shutdown"),
])
def test_flag_validation(kwargs: dict, field: str) -> None:
    with pytest.raises(SpecError) as info:
        SupFlags(**kwargs)
    assert info.value.where == field


def test_flags_from_dict_ignores_unknown_keys() -> None:
    assert SupFlags.from_dict({"intensity": 3, "colour": "blue"}) == SupFlags(intensity=3)


@pytest.mark.parametrize("code, by_us, expected", [
    (0, False, "normal"),
    (reasons.EXIT_SHUTDOWN, False, "shutdown"),
    (3, False, "exit 3"),
    (-9, False, "killed by SIGKILL"),
    (-11, False, "killed by SIGSEGV"),
    (-15, True, "shutdown"),
    (-9, True, "shutdown"),
    (0, True, "shutdown"),
    (2, True, "exit 2"),
])
def test_exit_reasons(code: int, by_us: bool, expected: str) -> None:
    assert str(reasons.from_exitcode(code, stopped_by_us=by_us)) == expected


def test_add_restart_window() -> None:
    history: tuple[float, ...] = ()
    for now in (0.0, 1.0, 2.0):
        history = add_restart(history, now, period=1.5)
    assert history == (2.0, 1.0)
    assert exceeded(history, 1) and not exceeded(history, 2)


def test_liveness() -> None:
    table = Liveness(timeout=10)
    table.beat(1, now=0)
    table.beat(2, now=5)
    assert table.next_deadline() == 10
    assert table.expired(10) == []
    assert table.expired(10.5) == [1]
    assert table.expired(11) == []  # reported once
    table.forget(2)
    assert table.next_deadline() is None


def test_stats_counters_survive_restarts() -> None:
    book = StatsBook()
    book.update("e.0", 10, {"tasks_total": 5, "busy": 1})
    book.ended("e.0", 10)
    book.update("e.0", 10, {"tasks_total": 7, "busy": 0})  # the final heartbeat trailed the exit
    book.update("e.0", 11, {"tasks_total": 2, "busy": 1})
    assert book.snapshot() == {"e.0": {"tasks_total": 9, "busy": 1}}
