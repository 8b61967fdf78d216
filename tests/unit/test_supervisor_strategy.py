"""The decision core against the cases of research/otp-supervisors.md §3 (numbers in brackets).

Pure: TreeCore driven by FakeProcesses and a fake clock; no processes, no sleeps.
"""

from __future__ import annotations

import logging
import signal

import pytest

from supervisor import reasons
from supervisor.core import TreeCore
from supervisor.events import Call, Exited, Started, StartWorker, Stop, TerminateWorker
from supervisor.spec import ChildSpec, SupervisorStart, SupFlags
from supervisor.testing import FakeClock, FakeProcesses

pytestmark = pytest.mark.timeout(10)


def w(name: str, restart: str = "permanent", **kw) -> ChildSpec:
    return ChildSpec(name, ("m", "f", ()), restart=restart, **kw)


def sup(name: str, flags: SupFlags, children, restart: str = "permanent", extra=(), **kw) -> ChildSpec:
    return ChildSpec(name, SupervisorStart(flags, tuple(children), tuple(extra)), restart=restart, **kw)


def tree(flags: SupFlags, children, clock: FakeClock | None = None, start: bool = True) -> FakeProcesses:
    fake = FakeProcesses(TreeCore(flags, children, os_pid=1), clock)
    if start:
        fake.start()
    return fake


def ids(fake: FakeProcesses, supervisor: str = "") -> list[str]:
    return [row["id"] for row in fake.core.query("which_children", supervisor)]


def counts(fake: FakeProcesses, supervisor: str = "") -> list[int]:
    c = fake.core.query("count_children", supervisor)
    return [c["specs"], c["active"], c["supervisors"], c["workers"]]


def test_start_order_and_reverse_stop() -> None:  # [1]
    fake = tree(SupFlags("rest_for_one", 5, 60), [w(n) for n in "ebdac"])
    assert fake.started() == list("ebdac")
    fake.clear_history()
    fake.crash("d")
    assert fake.stopped() == ["c", "a"]
    assert fake.started() == ["d", "a", "c"]
    fake.clear_history()
    fake.stop()
    assert fake.stopped() == list("cadbe")
    assert fake.finished.exit_code == 0


def test_init_start_failure_rolls_back(caplog) -> None:  # [2]
    fake = tree(SupFlags(), [w("one"), w("two"), w("three")], start=False)
    fake.fail_starts["two"] = 1
    with caplog.at_level(logging.ERROR):
        fake.start()
    assert fake.started() == ["one"]  # three never started
    assert fake.stopped() == ["one"]
    assert fake.finished.exit_code == 1
    # OTP: {error, {shutdown, {failed_to_start_child, two, Reason}}}
    assert fake.finished.reason == reasons.abnormal("child two failed to start: exit 1")
    assert "supervisor=root child=two reason=failed to start: exit 1: failed_to_start_child" in [
        r.getMessage() for r in caplog.records]


def test_start_child_error_discards_spec() -> None:  # [4]
    fake = tree(SupFlags(), [])
    fake.fail_starts["x"] = 1
    result = fake.call("start_child", spec={"id": "x", "start": ["m", "f", []]})
    assert result[0] == "error"
    assert ids(fake) == []


def test_permanent_restarts_on_any_exit() -> None:  # [8]
    fake = tree(SupFlags(intensity=10), [w("p")])
    for reason in (reasons.NORMAL, reasons.SHUTDOWN, reasons.shutdown("why"), reasons.abnormal("x")):
        old = fake.exit("p", reason)
        assert fake.pid("p") not in (None, old)
    assert counts(fake) == [1, 1, 0, 1]


def test_transient_restart_child_after_normal_exit() -> None:  # [9]
    fake = tree(SupFlags(), [w("t", "transient")])
    fake.exit("t", reasons.NORMAL)
    assert counts(fake) == [1, 0, 0, 1]
    result = fake.call("restart_child", id="t")
    assert result == ("ok", fake.pid("t"))


def test_temporary_never_restarted_and_can_start_again() -> None:  # [10]
    fake = tree(SupFlags(), [w("t", "temporary")])
    fake.crash("t")
    assert counts(fake) == [0, 0, 0, 0]
    assert (
        fake.call("start_child", spec={"id": "t", "start": ["m", "f", []], "restart": "temporary"})[0] == "ok"
    )


@pytest.mark.parametrize("strategy", ["one_for_all", "rest_for_one"])
def test_temporary_bystander(strategy: str) -> None:  # [11]
    fake = tree(SupFlags(strategy, 5, 60), [w("p"), w("tmp", "temporary")])
    fake.clear_history()
    fake.crash("p")
    assert fake.stopped() == ["tmp"]
    assert fake.started() == ["p"]
    assert ids(fake) == ["p"]
    assert fake.finished is None


@pytest.mark.parametrize("strategy", ["one_for_all", "rest_for_one"])
def test_group_restart_partial_start_failure(strategy: str) -> None:  # [15]
    fake = tree(SupFlags(strategy, 10, 60), [w("child1"), w("child2")])
    fake.fail_starts["child2"] = 1
    fake.clear_history()
    fake.crash("child1")
    # one failure: child2 is restarting, retried from the mailbox right away
    if strategy == "one_for_all":
        # the retry restarts the whole group: the fresh child1 is terminated and started again
        assert fake.started() == ["child1", "child1", "child2"]
        assert fake.stopped() == ["child2", "child1"]
    else:
        # rest_for_one: the retry starts from child2; child1 is not restarted again
        assert fake.started() == ["child1", "child2"]
        assert fake.stopped() == ["child2"]
    assert counts(fake) == [2, 2, 0, 2]


@pytest.mark.parametrize("strategy", ["one_for_one", "one_for_all", "rest_for_one", "simple_one_for_one"])
def test_intensity_exceeded_escalates(strategy: str) -> None:  # [16]
    flags = SupFlags(strategy, intensity=2, period=3600)
    if strategy == "simple_one_for_one":
        fake = FakeProcesses(TreeCore(flags, [w("x")], initial_extra_args=((), (), ())))
        fake.start()
        first, victim, last = "x.0", "x.1", "x.2"
    else:
        fake = tree(flags, [w("x"), w("y"), w("z")])
        first, victim, last = "x", "y", "z"
    fake.crash(victim)
    fake.crash(victim)
    assert fake.finished is None
    fake.clear_history()
    fake.crash(victim)
    assert fake.finished.exit_code == 1
    assert fake.finished.reason == reasons.shutdown("reached_max_restart_intensity")
    assert fake.running == {}
    assert fake.started() == []  # the third crash is not restarted
    assert fake.stopped() == [last, first]  # the rest stop in reverse start order


def test_intensity_zero_first_crash_kills() -> None:  # [16]
    fake = tree(SupFlags(intensity=0), [w("x")])
    fake.crash("x")
    assert fake.finished.exit_code == 1


def test_sliding_window() -> None:  # [17]
    clock = FakeClock()
    fake = tree(SupFlags(intensity=1, period=1), [w("x")], clock)
    for _ in range(5):
        clock.advance(2.1)
        fake.crash("x")
    assert fake.finished is None
    clock.advance(0.5)
    fake.crash("x")
    assert fake.finished.exit_code == 1


def test_window_counts_an_entry_exactly_period_old() -> None:
    clock = FakeClock()
    fake = tree(SupFlags(intensity=1, period=5), [w("x")], clock)
    fake.crash("x")
    clock.advance(5.0)
    fake.crash("x")
    assert fake.finished is not None  # OTP keeps R >= Now - Period


def test_group_restart_counts_once() -> None:
    fake = tree(SupFlags("one_for_all", 1, 60), [w("a"), w("b"), w("c")])
    fake.crash("b")
    assert fake.finished is None
    assert len(fake.core.root.history) == 1


def test_failed_restart_consumes_intensity() -> None:  # [18]
    fake = tree(SupFlags(intensity=4, period=60), [w("x"), w("sibling")])
    fake.fail_starts["x"] = None  # forever
    fake.crash("x")
    assert fake.finished.exit_code == 1
    assert [k for k, p in fake.history if p == "root/x"].count("start_failed") == 4
    assert fake.running == {}


def test_tree_escalation() -> None:  # [19]
    inner = SupFlags("one_for_one", 2, 60)
    fake = tree(
        SupFlags("one_for_all", 3, 60), [sup("sup1", inner, [w("g1")]), sup("sup2", inner, [w("g2")])]
    )
    fake.clear_history()
    fake.crash("g1")
    assert fake.started() == ["g1"] and fake.stopped() == []
    fake.fail_starts["g1"] = 1
    fake.clear_history()
    fake.crash("g1")  # its restart fails, the retry exceeds sup1's intensity (3 > 2): sup1 gives up
    assert fake.stopped() == ["g2"]
    assert fake.started() == ["g1", "g2"]
    assert fake.finished is None
    assert [r["id"] for r in fake.core.status(0)] == ["sup1", "g1", "sup2", "g2"]


def test_tree_escalation_does_not_restore_dynamic_children() -> None:  # [19]
    pool = sup("pool", SupFlags("simple_one_for_one", 0, 60), [w("e")], extra=[()])
    fake = tree(SupFlags(intensity=3), [pool])
    assert fake.call("start_child", "pool", args=[1])[0] == "ok"
    assert len(ids(fake, "pool")) == 2
    fake.crash("e.1")  # intensity 0: the pool gives up; the root restarts it with its initial child
    assert ids(fake, "pool") == ["e.0"]


def test_transient_sup_not_restarted_after_escalation() -> None:  # [20]
    fake = tree(
        SupFlags(intensity=3),
        [sup("inner", SupFlags(intensity=0), [w("g")], restart="transient"), w("other")],
    )
    fake.crash("g")
    assert fake.finished is None
    assert fake.core.query("which_children")[1] == {
        "id": "inner",
        "pid": None,
        "state": "undefined",
        "type": "supervisor",
    }


def test_root_gives_up_through_permanent_child_sup() -> None:
    fake = tree(SupFlags(intensity=0), [sup("inner", SupFlags(intensity=0), [w("g")])])
    fake.crash("g")
    assert fake.finished.exit_code == 1


def test_shutdown_values_reach_the_process_side() -> None:  # [21, 22]
    core = TreeCore(
        SupFlags(),
        [w("a", shutdown="brutal_kill"), w("b", shutdown=2.5), w("c", shutdown="infinity"), w("d")],
    )
    fake = FakeProcesses(core)
    fake.start()
    fake.hold_stops = True
    terminations = []
    for _ in range(4):
        actions = (
            core.handle(Stop(), 0)
            if not terminations
            else fake.core.handle(Exited(terminations[-1].ref, reasons.SHUTDOWN), 0)
        )
        terminations += [a for a in actions if isinstance(a, TerminateWorker)]
    assert [t.shutdown for t in terminations] == [5.0, "infinity", 2.5, "brutal_kill"]


def test_stop_waits_for_each_child_in_turn() -> None:
    fake = tree(SupFlags(), [w("a"), w("b")])
    fake.hold_stops = True
    fake.stop()
    assert len(fake.pending_stops) == 1  # b first; a only once b is gone
    fake.finish_stop()
    assert len(fake.pending_stops) == 1
    fake.finish_stop()
    assert fake.finished.exit_code == 0


def test_stop_race() -> None:  # [24]
    fake = tree(SupFlags(), [w("a"), w("b"), w("c")])
    fake.hold_stops = True
    fake.stop()  # c is being stopped
    fake.exit("a", reasons.abnormal("exit 9"))  # a dies on its own meanwhile: not restarted
    fake.exit("b", reasons.NORMAL)
    fake.finish_stop()
    assert fake.finished.exit_code == 0
    assert fake.running == {}
    assert fake.started() == ["a", "b", "c"]
    assert fake.stopped() == ["c"]  # a and b were already gone: nothing more was terminated


def test_stop_race_keeps_each_childs_exit_reason(caplog) -> None:  # [24]
    fake = tree(SupFlags(), [w("a"), w("b"), w("c")])
    fake.hold_stops = True
    with caplog.at_level(logging.INFO):
        fake.stop()
        fake.exit("a", reasons.abnormal("exit 9"))
        fake.exit("b", reasons.shutdown("quit"))
        fake.finish_stop()
    reports = {r.getMessage().split(" reason=")[0]: r.getMessage() for r in caplog.records
               if " child=" in r.getMessage()}
    assert reports["supervisor=root child=c"].startswith("supervisor=root child=c reason=shutdown:")
    assert reports["supervisor=root child=b"].startswith("supervisor=root child=b reason=shutdown (quit):")
    assert reports["supervisor=root child=a"].startswith("supervisor=root child=a reason=exit 9:")


def test_killed_after_shutdown_timeout_is_reported_shutdown() -> None:  # [21]
    # OTP says `killed`; here the supervisor's own stop is `shutdown` whatever signal ended it
    # (docs/supervision.md, deviations). The runner reports a SIGKILL it sent during a stop so.
    assert reasons.from_exitcode(-signal.SIGKILL, stopped_by_us=True) == reasons.SHUTDOWN
    fake = tree(SupFlags(), [w("polite"), w("stubborn", shutdown=0.3)])
    fake.stop_reasons["root/stubborn"] = reasons.from_exitcode(-signal.SIGKILL, stopped_by_us=True)
    fake.stop()
    assert fake.stopped() == ["stubborn", "polite"]
    assert fake.finished.exit_code == 0 and fake.finished.reason == reasons.shutdown("stopped")


def test_calls_during_stop_are_refused() -> None:
    fake = tree(SupFlags(), [w("a")])
    fake.hold_stops = True
    fake.stop()
    assert fake.call("restart_child", id="a") == ("error", "shutting_down")
    assert ids(fake) == ["a"]  # queries still answered


def test_stop_during_start_stops_the_starter() -> None:
    core = TreeCore(SupFlags(), [w("a"), w("slow"), w("never")])
    actions = core.start(0)
    a = actions[0]
    actions = core.handle(Started(a.ref, 10), 0)
    slow = actions[0]
    assert isinstance(slow, StartWorker) and slow.child_id == "slow"
    actions = core.handle(Stop(), 0)
    assert actions == [TerminateWorker(slow.ref, 5.0)]
    from supervisor.events import StartFailed

    actions = core.handle(StartFailed(slow.ref, reasons.SHUTDOWN), 0)
    assert actions == [TerminateWorker(a.ref, 5.0)]
    actions = core.handle(Exited(a.ref, reasons.SHUTDOWN), 0)
    assert core.finished.exit_code == 0


def test_child_admin_api() -> None:  # [25]
    fake = tree(SupFlags(), [w("a")])
    spec = {"id": "b", "start": ["m", "f", []]}
    assert fake.call("start_child", spec=spec) == ("ok", fake.pid("b"))
    assert fake.call("start_child", spec=spec) == ("error", ["already_started", fake.pid("b")])
    assert counts(fake) == [2, 2, 0, 2]
    assert fake.call("restart_child", id="b") == ("error", "running")
    assert fake.call("delete_child", id="b") == ("error", "running")
    assert fake.call("terminate_child", id="b") == "ok"
    assert fake.call("terminate_child", id="b") == "ok"  # idempotent
    assert counts(fake) == [2, 1, 0, 2]
    assert fake.call("start_child", spec=spec) == ("error", "already_present")
    assert fake.call("restart_child", id="b") == ("ok", fake.pid("b"))
    assert fake.call("terminate_child", id="b") == "ok"
    assert fake.call("delete_child", id="b") == "ok"
    assert fake.call("delete_child", id="b") == ("error", "not_found")
    assert fake.call("restart_child", id="zz") == ("error", "not_found")
    assert fake.call("terminate_child", id="zz") == ("error", "not_found")
    assert counts(fake) == [1, 1, 0, 1]
    assert fake.call("start_child", spec={"id": "bad", "start": "nope"})[0] == "error"
    assert fake.call("frobnicate")[0] == "error"


def test_terminate_child_does_not_restart_or_auto_shutdown() -> None:
    fake = tree(SupFlags(auto_shutdown="any_significant"), [w("s", "transient", significant=True), w("p")])
    assert fake.call("terminate_child", id="s") == "ok"
    assert fake.finished is None
    assert fake.pid("s") is None


def test_restarting_state() -> None:  # [26]
    fake = tree(SupFlags(intensity=100, period=60), [w("x"), w("y")])
    fake.hold_starts = True
    fake.crash("x")  # its restart is under way (held)
    # calls arriving now wait in the mailbox, as in OTP
    for call_id, (command, args) in enumerate(
        [
            ("restart_child", {"id": "x"}),
            ("delete_child", {"id": "x"}),
            ("start_child", {"spec": {"id": "x", "start": ["m", "f", []]}}),
            ("count_children", {}),
        ],
        start=100,
    ):
        fake.send(Call(call_id, command, args))
    fake.finish_start(ok=False)  # the restart fails: x is restarting, a retry is queued after the calls
    assert fake.replies[100] == ("error", "restarting")
    assert fake.replies[101] == ("error", "restarting")
    assert fake.replies[102] == ("error", "already_present")
    assert [r["state"] for r in fake.core.query("which_children")] == ["running", "starting"]
    fake.finish_start(ok=True)  # the retry works
    assert counts(fake) == [2, 2, 0, 2]
    assert fake.core.root.children.get("x").restarts == 2


def test_terminate_ends_restarting() -> None:  # [26]
    fake = tree(SupFlags(intensity=100, period=60), [w("x"), w("y")])
    fake.hold_starts = True
    fake.crash("x")
    fake.send(Call(7, "terminate_child", {"id": "x"}))
    fake.finish_start(ok=False)
    assert fake.replies[7] == "ok"
    assert fake.pending_starts == []  # the queued retry found x no longer restarting
    assert counts(fake) == [2, 1, 0, 2]
    fake.hold_starts = False
    fake.stop()
    assert fake.finished.exit_code == 0


def test_stop_while_restarting_does_not_hang() -> None:  # [26]
    fake = tree(SupFlags(intensity=100, period=60), [w("x"), w("y")])
    fake.fail_starts["x"] = None
    fake.hold_starts = True
    fake.crash("x")
    fake.stop()  # stops the starting x at once; then y
    fake.finish_start(ok=False)
    assert fake.finished.exit_code == 0 and fake.running == {}


def test_simple_one_for_one_admin() -> None:  # [27]
    fake = tree(SupFlags(), [sup("pool", SupFlags("simple_one_for_one"), [w("e")])])
    assert ids(fake, "pool") == []
    ok, pid = fake.call("start_child", "pool", args=["x", 2])
    assert ok == "ok"
    assert fake.call("terminate_child", "pool", id="e.0") == ("error", "simple_one_for_one")
    assert fake.call("restart_child", "pool", id="e.0") == ("error", "simple_one_for_one")
    assert fake.call("delete_child", "pool", id="e.0") == ("error", "simple_one_for_one")
    assert fake.call("terminate_child", "pool", pid=999999) == ("error", "not_found")
    assert fake.call("terminate_child", "pool", pid=pid) == "ok"
    assert ids(fake, "pool") == []
    assert counts(fake, "pool") == [1, 0, 0, 0]


def test_simple_one_for_one_appends_extra_args() -> None:
    core = TreeCore(SupFlags("simple_one_for_one"), [ChildSpec("e", ("m", "f", (1,)))])
    core.start(0)
    actions = core.handle(Call(1, "start_child", {"args": [2, 3]}), 0)
    assert actions[0].start == ("m", "f", (1,)) and actions[0].extra_args == (2, 3)


def test_simple_parallel_shutdown() -> None:  # [28]
    core = TreeCore(SupFlags("simple_one_for_one"), [w("e", shutdown=2.0)], initial_extra_args=((), (), ()))
    fake = FakeProcesses(core)
    fake.start()
    fake.hold_stops = True
    fake.stop()
    assert len(fake.pending_stops) == 3  # all at once: one shared timer


def test_scale_many_children() -> None:  # [29]
    core = TreeCore(
        SupFlags("simple_one_for_one"), [w("e")], initial_extra_args=tuple(() for _ in range(1000))
    )
    fake = FakeProcesses(core)
    fake.start()
    assert core.query("count_children") == {"specs": 1, "active": 1000, "supervisors": 0, "workers": 1000}
    fake.stop()
    assert fake.finished.exit_code == 0 and len(fake.stopped()) == 1000


def test_temporary_dynamic_children_are_forgotten() -> None:  # [30]
    fake = tree(SupFlags(), [sup("pool", SupFlags("simple_one_for_one"), [w("e", "temporary")])])
    for n in range(20):
        assert fake.call("start_child", "pool", args=[n])[0] == "ok"
        fake.crash("e.0")
    assert len(fake.core.find("pool").children) == 0


@pytest.mark.parametrize("restart", ["transient", "temporary"])
def test_auto_shutdown_any_significant(restart: str) -> None:  # [31]
    fake = tree(
        SupFlags(auto_shutdown="any_significant"),
        [w("a"), w("s1", restart, significant=True), w("s2", restart, significant=True)],
    )
    fake.exit("s1", reasons.NORMAL)
    assert fake.finished.exit_code == 0
    assert fake.finished.reason.detail == "auto_shutdown"
    assert fake.running == {}


def test_auto_shutdown_all_significant() -> None:  # [31]
    fake = tree(
        SupFlags(auto_shutdown="all_significant"),
        [w("a"), w("s1", "transient", significant=True), w("s2", "temporary", significant=True)],
    )
    fake.exit("s1", reasons.NORMAL)
    assert fake.finished is None
    fake.exit("s2", reasons.abnormal("exit 1"))
    assert fake.finished.exit_code == 0


def test_auto_shutdown_not_for_restarted_or_nonsignificant() -> None:  # [31]
    fake = tree(
        SupFlags("one_for_all", 5, 60, auto_shutdown="any_significant"),
        [w("s", "transient", significant=True), w("n", "transient"), w("p")],
    )
    fake.crash("s")  # restarted: no auto shutdown
    fake.exit("n", reasons.NORMAL)  # not significant
    fake.crash("p")  # s dies as a sibling casualty of the group restart: no auto shutdown
    assert fake.finished is None


def test_auto_shutdown_escalates_through_a_significant_child_sup() -> None:  # [31]
    inner = sup(
        "inner",
        SupFlags(auto_shutdown="any_significant"),
        [w("leaser", "transient", significant=True)],
        restart="transient",
        significant=True,
    )
    fake = tree(SupFlags(auto_shutdown="any_significant"), [w("reaper"), inner])
    fake.exit("leaser", reasons.NORMAL)
    assert fake.finished.exit_code == 0
    assert fake.running == {}


def test_status_rows() -> None:
    clock = FakeClock(100.0)
    fake = tree(
        SupFlags(intensity=5),
        [w("a"), sup("pool", SupFlags("simple_one_for_one"), [w("e")], extra=[()])],
        clock,
    )
    clock.advance(3)
    fake.crash("a")
    clock.advance(2)
    rows = {r["path"]: r for r in fake.core.status(clock.now)}
    assert rows["root/a"]["restarts"] == 1 and rows["root/a"]["uptime"] == 2.0
    assert rows["root/pool/e.0"]["uptime"] == 5.0 and rows["root/pool"]["pid"] == 1
