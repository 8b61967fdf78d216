"""The tree with real worker processes, real sockets and real signals.

Each test runs a Tree in the main thread (signals need it) and drives it from a helper thread
through the control socket, waiting on conditions with deadlines (never a bare sleep).
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import signal
import stat
import tempfile
from pathlib import Path

import pytest

from supervisor import control
from supervisor.spec import ChildSpec, SupervisorStart, SupFlags
from supervisor.tree import Tree
from tests.integration.workers import pid_alive, run_tree, wait_until

ME = "tests.integration.workers"


def w(name: str, fn: str = "idle", *args, **kw) -> ChildSpec:
    return ChildSpec(name, (ME, fn, args), **kw)


@pytest.fixture
def rundir():
    path = Path(tempfile.mkdtemp(prefix="lt-"))  # short: ipc paths must fit in sun_path
    os.chmod(path, 0o700)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def make_tree(rundir: Path, flags: SupFlags, children, **kw) -> Tree:
    kw.setdefault("heartbeat_secs", 0.2)
    kw.setdefault("heartbeat_timeout_secs", 2.0)
    return Tree(flags, children, rundir, **kw)


def pids(rd: Path) -> dict[str, int | None]:
    return {row["id"]: row["pid"] for row in control.call(rd, "status")["children"]}


def running(rd: Path, *names: str):
    rows = control.call(rd, "status")["children"]
    states = {r["id"]: r for r in rows}
    return all(n in states and states[n]["state"] == "running" for n in names) and states


def events(log: Path) -> list[str]:
    return [" ".join(line.split()[:2]) for line in log.read_text().splitlines()] if log.exists() else []


REPORT = re.compile(
    r"supervisor=(?P<supervisor>\S+) child=(?P<child>\S+) (?:pid=\d+ )?reason=(?P<reason>.+?): ")


def reports(caplog, words: str) -> list[dict[str, str]]:
    """The supervisor, child and reason of every log record that holds ``words``; a record that
    holds them without the three fields fails the test."""
    found = []
    for record in caplog.records:
        message = record.getMessage()
        if words in message:
            match = REPORT.match(message)
            assert match, f"no supervisor=, child=, reason= in: {message}"
            found.append(match.groupdict())
    return found


@pytest.mark.timeout(30)
def test_start_order_and_reverse_stop(rundir: Path) -> None:
    log = rundir / "events.log"
    names = ["e", "b", "d", "a", "c"]
    tree = make_tree(rundir, SupFlags("rest_for_one", 5, 60), [w(n, "idle", str(log)) for n in names])

    def script(rd):
        wait_until(lambda: running(rd, *names), what="all running")
        before = pids(rd)
        os.kill(before["d"], signal.SIGKILL)
        wait_until(
            lambda: (
                (p := pids(rd))
                and all(p[n] not in (None, before[n]) for n in "dac")
                and all(r["state"] == "running" for r in control.call(rd, "status")["children"])
            ),
            what="d, a, c restarted",
        )
        after = pids(rd)
        assert after["e"] == before["e"] and after["b"] == before["b"]
        control.call(rd, "stop")

    code, _ = run_tree(tree, script)
    assert code == 0
    seen = events(log)
    assert seen[:5] == [f"start {n}" for n in names]
    assert seen[5:10] == ["stop c", "stop a", "start d", "start a", "start c"]
    assert seen[10:] == ["stop c", "stop a", "stop d", "stop b", "stop e"]


@pytest.mark.timeout(30)
@pytest.mark.parametrize(
    "strategy, restarted",
    [
        ("one_for_one", {"b"}),
        ("one_for_all", {"a", "b", "c"}),
        ("rest_for_one", {"b", "c"}),
    ],
)
def test_strategy_with_real_processes(rundir: Path, strategy: str, restarted: set[str]) -> None:
    tree = make_tree(rundir, SupFlags(strategy, 5, 60), [w("a"), w("b"), w("c")])

    def script(rd):
        wait_until(lambda: running(rd, "a", "b", "c"), what="all running")
        before = pids(rd)
        os.kill(before["b"], signal.SIGKILL)
        wait_until(
            lambda: (p := pids(rd)) and p["b"] not in (None, before["b"]) and running(rd, "a", "b", "c"),
            what="b restarted",
        )
        after = pids(rd)
        changed = {n for n in "abc" if after[n] != before[n]}
        control.call(rd, "stop")
        return changed

    code, changed = run_tree(tree, script)
    assert code == 0 and changed == restarted


@pytest.mark.timeout(30)
def test_simple_one_for_one_pool(rundir: Path) -> None:
    pool = SupervisorStart(SupFlags("simple_one_for_one", 5, 60), (w("e"),), initial_extra_args=((), (), ()))
    tree = make_tree(rundir, SupFlags(), [ChildSpec("pool", pool)])

    def script(rd):
        wait_until(lambda: running(rd, "e.0", "e.1", "e.2"), what="pool up")
        before = pids(rd)
        os.kill(before["e.1"], signal.SIGKILL)
        wait_until(lambda: pids(rd)["e.1"] not in (None, before["e.1"]), what="e.1 restarted")
        new_pid = control.call(rd, "start_child", {"supervisor": "pool", "args": []})
        assert control.call(rd, "count_children", {"supervisor": "pool"})["active"] == 4
        assert control.call(rd, "terminate_child", {"supervisor": "pool", "pid": new_pid}) == "ok"
        assert not pid_alive(new_pid)
        with pytest.raises(control.ControlError, match="simple_one_for_one"):
            control.call(rd, "terminate_child", {"supervisor": "pool", "id": "e.0"})
        after = pids(rd)
        control.call(rd, "stop")
        return before, after

    code, (before, after) = run_tree(tree, script)
    assert code == 0
    assert after["e.0"] == before["e.0"] and after["e.2"] == before["e.2"]


@pytest.mark.timeout(30)
def test_intensity_exceeded_gives_up_with_one_line(rundir: Path, caplog) -> None:
    tree = make_tree(
        rundir, SupFlags(intensity=2, period=60), [w("steady"), w("crasher", "crash_after", 20, 3)]
    )
    with caplog.at_level(logging.INFO):
        code = tree.run()
    assert code == 1
    lines = [r.getMessage() for r in caplog.records if "gave up" in r.getMessage()]
    assert lines == [
        "supervisor=root child=crasher reason=reached_max_restart_intensity: gave up: "
        "restarted 3 times within 60s (intensity 2), last exit: exit 3"
    ]


@pytest.mark.timeout(30)
def test_child_that_cannot_start_makes_the_tree_give_up(rundir: Path, caplog) -> None:
    tree = make_tree(rundir, SupFlags(), [w("ok"), w("broken", "fail_start")])
    with caplog.at_level(logging.INFO):
        assert tree.run() == 1
    assert any("child broken failed to start: exit 1" in r.getMessage() for r in caplog.records)
    (gave_up,) = reports(caplog, "gave up")
    assert gave_up["supervisor"] == "root" and "child broken failed to start" in gave_up["reason"]


@pytest.mark.timeout(30)
def test_never_ready_fails_after_start_timeout(rundir: Path, caplog) -> None:
    tree = make_tree(rundir, SupFlags(), [w("mute", "never_ready")], start_timeout_secs=0.5)
    with caplog.at_level(logging.INFO):
        assert tree.run() == 1
    assert any("no Ready within 0.5s" in r.getMessage() for r in caplog.records)
    assert reports(caplog, "killing it") == [
        {"supervisor": "root", "child": "mute", "reason": "no Ready within 0.5s"}]


@pytest.mark.timeout(30)
def test_failed_restart_is_retried_until_intensity(rundir: Path, caplog) -> None:
    flag = rundir / "broken"
    tree = make_tree(rundir, SupFlags(intensity=3, period=60), [w("x", "fail_start_if_exists", str(flag))])

    def script(rd):
        pid = wait_until(lambda: (p := pids(rd).get("x")) and p, what="x up")
        flag.touch()
        os.kill(pid, signal.SIGKILL)
        return None

    with caplog.at_level(logging.INFO):
        code, _ = run_tree(tree, script)
    assert code == 1
    assert sum("restart failed, will try again" in r.getMessage() for r in caplog.records) == 3


@pytest.mark.timeout(30)
def test_heartbeat_timeout_kills_a_frozen_child(rundir: Path, caplog) -> None:
    frozen = w("frozen", "block_gil", shutdown="brutal_kill")
    tree = make_tree(rundir, SupFlags(intensity=5), [frozen], heartbeat_secs=0.1, heartbeat_timeout_secs=0.5)

    def script(rd):
        first = wait_until(lambda: pids(rd).get("frozen"), what="frozen up")
        wait_until(lambda: pids(rd).get("frozen") not in (None, first), what="a restart")
        assert not pid_alive(first)
        control.call(rd, "stop")

    with caplog.at_level(logging.INFO):
        code, _ = run_tree(tree, script)
    assert code == 0
    assert any("reason=heartbeat timeout: child_terminated" in r.getMessage() for r in caplog.records)
    kills = reports(caplog, "killing it")
    assert kills and all(k == {"supervisor": "root", "child": "frozen", "reason": "heartbeat timeout (0.5s)"}
                         for k in kills)


@pytest.mark.timeout(30)
def test_shutdown_timeout_kills_the_whole_group(rundir: Path, caplog) -> None:
    stubborn_pids, sleeper_pids = rundir / "stubborn.pids", rundir / "sleeper.pids"
    tree = make_tree(
        rundir,
        SupFlags(),
        [
            w("stubborn", "ignore_sigterm_with_shell", str(stubborn_pids), shutdown=0.3),
            w("sleeper", "spawn_sleep", str(sleeper_pids), shutdown="brutal_kill"),
        ],
    )

    def script(rd):
        wait_until(lambda: running(rd, "stubborn", "sleeper"), what="both up")
        stubborn = pids(rd)["stubborn"]
        grandchildren = [int(pid) for f in (stubborn_pids, sleeper_pids) for pid in f.read_text().split()]
        assert all(map(pid_alive, grandchildren))
        control.call(rd, "stop")
        return stubborn, grandchildren

    with caplog.at_level(logging.INFO):
        code, (stubborn, grandchildren) = run_tree(tree, script)
    assert code == 0
    # stubborn ignored its SIGTERM (sent to it alone, not its group), so the shutdown timeout
    # fired for it and for nobody else; the SIGKILL of its group took its shell and that shell's
    # sleep too
    assert reports(caplog, "shutdown timeout") == [
        {"supervisor": "root", "child": "stubborn", "reason": "shutdown timeout"}]
    for pid in (stubborn, *grandchildren):
        assert not pid_alive(pid)
    # OTP reports a child killed after its shutdown timeout as `killed`; here it is `shutdown`
    # (docs/supervision.md, deviations): the supervisor's own stop, whatever signal ended it
    (stopped,) = reports(caplog, "child=stubborn reason=shutdown: stopped")
    assert stopped["reason"] == "shutdown"


@pytest.mark.timeout(30)
def test_control_answers_during_a_slow_stop_and_cold_cuts_it_short(rundir: Path) -> None:
    log = rundir / "events.log"
    tree = make_tree(
        rundir,
        SupFlags(),
        # a drain longer than this test's timeout: only the cold stop can end it in time
        [w("first", "idle", str(log)), w("drainer", "slow_stop", 3600, str(log), shutdown="infinity")],
    )

    def script(rd):
        wait_until(lambda: running(rd, "first", "drainer"), what="up")
        control.call(rd, "stop")
        rows = wait_until(
            lambda: (s := running(rd, "first")) and s["drainer"]["state"] == "terminating" and s,
            what="drainer terminating",
        )
        assert rows["first"]["state"] == "running"  # reverse order: first waits for drainer
        assert control.call(rd, "which_children")[0]["id"] == "drainer"
        with pytest.raises(control.ControlError, match="shutting_down"):
            control.call(rd, "restart_child", {"id": "first"})
        control.call(rd, "stop", {"cold": True})

    code, _ = run_tree(tree, script)
    assert code == 0
    assert [e for e in events(log) if e.startswith("stop")] == ["stop drainer", "stop first"]
    drainer_stop = [line for line in log.read_text().splitlines() if line.startswith("stop drainer")]
    assert drainer_stop[0].split()[-1] == "2"  # it saw the cold stop


@pytest.mark.timeout(30)
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_to_the_root_is_a_warm_stop(rundir: Path, signum: int) -> None:
    log = rundir / "events.log"
    tree = make_tree(rundir, SupFlags(), [w("a", "idle", str(log)), w("b", "idle", str(log))])

    def script(rd):
        wait_until(lambda: running(rd, "a", "b"), what="up")
        os.kill(os.getpid(), signum)

    code, _ = run_tree(tree, script)
    assert code == 0
    stops = [line.split() for line in log.read_text().splitlines() if line.startswith("stop")]
    assert [(s[1], s[3]) for s in stops] == [("b", "1"), ("a", "1")]  # reverse order, warm (one signal)


@pytest.mark.timeout(30)
def test_control_socket_during_a_slow_restart_then_terminate_and_restart(rundir: Path) -> None:
    gate = rundir / "gate"
    gate.touch()
    tree = make_tree(rundir, SupFlags(intensity=5),
                     [w("a"), w("slow", "start_when_exists", str(gate)), w("c")])

    def script(rd):
        wait_until(lambda: running(rd, "a", "slow", "c"), what="all running")
        before = pids(rd)
        gate.unlink()
        os.kill(before["slow"], signal.SIGKILL)
        # slow's restart waits for the gate: the supervisor is busy, and still answers queries
        rows = wait_until(
            lambda: (r := control.call(rd, "which_children"))[1]["state"] == "starting" and r,
            what="slow restarting",
        )
        assert [(r["id"], r["state"]) for r in rows] == [("c", "running"), ("slow", "starting"),
                                                        ("a", "running")]
        assert rows[1]["pid"] is None and not pid_alive(before["slow"])
        assert control.call(rd, "count_children") == {"specs": 3, "active": 2, "supervisors": 0,
                                                      "workers": 3}
        gate.touch()
        wait_until(lambda: running(rd, "a", "slow", "c"), what="slow restarted")
        assert control.call(rd, "count_children")["active"] == 3

        assert control.call(rd, "terminate_child", {"id": "c"}) == "ok"
        assert not pid_alive(before["c"])
        assert control.call(rd, "which_children")[0] == {"id": "c", "pid": None, "state": "undefined",
                                                         "type": "worker"}
        new_pid = control.call(rd, "restart_child", {"id": "c"})
        assert new_pid not in (None, before["c"]) and pid_alive(new_pid)
        assert running(rd, "a", "slow", "c")["c"]["pid"] == new_pid
        after = pids(rd)
        control.call(rd, "stop")
        return before, after

    code, (before, after) = run_tree(tree, script)
    assert code == 0
    assert after["a"] == before["a"]  # one_for_one: neither the restart nor the calls touched a


@pytest.mark.timeout(30)
def test_sighup_is_recorded(rundir: Path) -> None:
    tree = make_tree(rundir, SupFlags(), [w("a")])

    def script(rd):
        wait_until(lambda: running(rd, "a"), what="up")
        for name in ("control.ipc", "sup.ipc"):
            assert stat.S_IMODE(os.stat(rd / name).st_mode) == 0o600
        os.kill(os.getpid(), signal.SIGHUP)
        wait_until(lambda: tree.reload_requested, what="reload flag")
        control.call(rd, "stop")

    assert run_tree(tree, script)[0] == 0


@pytest.mark.timeout(30)
def test_auto_shutdown_of_the_root_returns_0(rundir: Path) -> None:
    tree = make_tree(
        rundir,
        SupFlags(auto_shutdown="any_significant"),
        [w("reaper"), w("leaser", "crash_after", 200, 0, restart="transient", significant=True)],
    )
    assert tree.run() == 0


@pytest.mark.timeout(30)
def test_exit_shutdown_code_means_shutdown(rundir: Path, caplog) -> None:
    tree = make_tree(
        rundir,
        SupFlags(auto_shutdown="any_significant"),
        [w("a"), w("quitter", "exit_shutdown", restart="transient", significant=True)],
    )
    with caplog.at_level(logging.INFO):
        assert tree.run() == 0
    assert any(
        "child=quitter reason=shutdown: child_terminated, not restarted" in r.getMessage()
        for r in caplog.records
    )


@pytest.mark.timeout(30)
def test_stats_survive_restarts(rundir: Path) -> None:
    tree = make_tree(rundir, SupFlags(intensity=5), [w("counter", "count_up", 5)], heartbeat_secs=0.05)

    def script(rd):
        wait_until(
            lambda: control.call(rd, "status")["stats"].get("counter", {}).get("work_total", 0) >= 10,
            what="first counts",
        )
        os.kill(pids(rd)["counter"], signal.SIGKILL)
        before = control.call(rd, "status")["stats"]["counter"]["work_total"]
        wait_until(lambda: pids(rd).get("counter"), what="restart")
        stats = wait_until(
            lambda: (s := control.call(rd, "status")["stats"]["counter"])["work_total"] > before and s,
            what="more counts",
        )
        control.call(rd, "stop")
        return before, stats

    code, (before, stats) = run_tree(tree, script)
    assert code == 0 and before >= 10 and stats["work_total"] > before and stats["busy"] == 1


@pytest.mark.timeout(10)
def test_control_call_without_a_tree(rundir: Path) -> None:
    with pytest.raises(control.NoTreeRunning):
        control.call(rundir, "status")
    (rundir / "control.ipc").touch()  # a stale file left by a killed tree
    with pytest.raises(control.NoTreeRunning):
        control.call(rundir, "status", timeout=1)
