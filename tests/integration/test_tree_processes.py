"""The tree with real worker processes, real sockets and real signals.

Each test runs a Tree in the main thread (signals need it) and drives it from a helper thread
through the control socket, waiting on conditions with deadlines (never a bare sleep).
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import stat
import tempfile
import time
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
        "supervisor root gave up: child crasher restarted 3 times within 60s (intensity 2), last exit: exit 3"
    ]


@pytest.mark.timeout(30)
def test_child_that_cannot_start_makes_the_tree_give_up(rundir: Path, caplog) -> None:
    tree = make_tree(rundir, SupFlags(), [w("ok"), w("broken", "fail_start")])
    with caplog.at_level(logging.INFO):
        assert tree.run() == 1
    assert any("child broken failed to start: exit 1" in r.getMessage() for r in caplog.records)


@pytest.mark.timeout(30)
def test_never_ready_fails_after_start_timeout(rundir: Path, caplog) -> None:
    tree = make_tree(rundir, SupFlags(), [w("mute", "never_ready")], start_timeout_secs=0.5)
    with caplog.at_level(logging.INFO):
        assert tree.run() == 1
    assert any("no Ready within 0.5s" in r.getMessage() for r in caplog.records)


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


@pytest.mark.timeout(30)
def test_shutdown_timeout_kills_the_whole_group(rundir: Path) -> None:
    pidfile = rundir / "sleeper.pids"
    tree = make_tree(
        rundir,
        SupFlags(),
        [
            w("stubborn", "ignore_sigterm", shutdown=0.3),
            w("sleeper", "spawn_sleep", str(pidfile), shutdown="brutal_kill"),
        ],
    )

    def script(rd):
        wait_until(lambda: running(rd, "stubborn", "sleeper"), what="both up")
        stubborn = pids(rd)["stubborn"]
        shell, sleeper = map(int, pidfile.read_text().split())
        started = time.monotonic()
        control.call(rd, "stop")
        return stubborn, shell, sleeper, started

    code, (stubborn, shell, sleeper, started) = run_tree(tree, script)
    elapsed = time.monotonic() - started
    assert code == 0
    assert 0.3 <= elapsed < 3.0
    for pid in (stubborn, shell, sleeper):
        assert not pid_alive(pid)


@pytest.mark.timeout(30)
def test_control_answers_during_a_slow_stop_and_cold_cuts_it_short(rundir: Path) -> None:
    log = rundir / "events.log"
    tree = make_tree(
        rundir,
        SupFlags(),
        [w("first", "idle", str(log)), w("drainer", "slow_stop", 20, str(log), shutdown="infinity")],
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

    started = time.monotonic()
    code, _ = run_tree(tree, script)
    assert code == 0 and time.monotonic() - started < 10
    assert "stop drainer" in events(log)
    drainer_stop = [line for line in log.read_text().splitlines() if line.startswith("stop drainer")]
    assert drainer_stop[0].split()[-1] == "2"  # it saw the cold stop


@pytest.mark.timeout(30)
def test_sigterm_to_the_root_is_a_warm_stop(rundir: Path) -> None:
    log = rundir / "events.log"
    tree = make_tree(rundir, SupFlags(), [w("a", "idle", str(log)), w("b", "idle", str(log))])

    def script(rd):
        wait_until(lambda: running(rd, "a", "b"), what="up")
        os.kill(os.getpid(), signal.SIGTERM)

    code, _ = run_tree(tree, script)
    assert code == 0
    assert [line for line in events(log) if line.startswith("stop")] == ["stop b", "stop a"]


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
