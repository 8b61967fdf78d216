"""Reload planning (pure) and the order of child-API calls a rollout makes, driven against a real
TreeCore with events standing in for processes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from config.validate import validate
from supervisor import reasons
from supervisor.app import build_tree
from supervisor.core import TreeCore
from supervisor.events import Call, Exited, Reply, Started, StartWorker, TerminateWorker
from supervisor.reload import ReloadRefused, changed_keys, plan, replace_specs, restarts_for, rollout

pytestmark = pytest.mark.timeout(10)


def cfg(**sections: dict[str, Any]):
    raw: dict[str, dict[str, Any]] = {"queue": {"url": "memory://"},
                                      "executors": {"count": 2, "command": "/bin/cat"}}
    for name, values in sections.items():
        raw.setdefault(name, {}).update(values)
    return validate(raw, Path("/tmp/leasetree-unit/tree.toml"))


def test_changed_keys_and_who_reads_them():
    old, new = cfg(), cfg(leaser={"lease_secs": 60}, executors={"count": 2, "slots": 3})
    changed = changed_keys(old.to_dict(), new.to_dict())
    assert changed == ["leaser.lease_secs", "executors.slots"]
    assert restarts_for(changed) == {"leaser", "executors"}
    assert restarts_for(["leaser.requests_per_sec"]) == {"leaser", "reaper"}
    assert restarts_for(["queue.url"]) == {"leaser", "reaper"}
    assert restarts_for(["executors.count", "leaser.restart", "reaper.shutdown_secs"]) == set()
    assert restarts_for(["log.level"]) == {"leaser", "reaper", "executors"}


def test_plan_refuses_what_takes_a_restart_of_the_tree_naming_key_and_values():
    with pytest.raises(ReloadRefused, match=r"metrics.listen: changed from '' to '127.0.0.1:9464'"):
        plan(cfg(), cfg(metrics={"listen": "127.0.0.1:9464"}))
    with pytest.raises(ReloadRefused, match="supervisor.heartbeat_secs"):
        plan(cfg(), cfg(supervisor={"heartbeat_secs": 2}))
    same = plan(cfg(), cfg())
    assert same.changed == () and same.restart == set() and same.describe() == "no change"


class Driver:
    """Stands in for the process side: every StartWorker is Ready at once with a fresh pid, every
    TerminateWorker exits with shutdown. Records what happened, in order."""

    def __init__(self, config) -> None:
        flags, children = build_tree(config)
        self.core = TreeCore(flags, children, "root", os_pid=1)
        self.pid = 100
        self.live: dict[int, tuple[str, int]] = {}  # ref -> (child id, pid)
        self.log: list[str] = []
        self.replies: list[Any] = []
        self.apply(self.core.start(0.0))
        self.log.clear()

    def apply(self, actions: list[Any]) -> None:
        for action in actions:
            if isinstance(action, StartWorker):
                self.pid += 1
                self.live[action.ref] = (action.child_id, self.pid)
                self.log.append(f"start {action.child_id}")
                self.apply(self.core.handle(Started(action.ref, self.pid), 1.0))
            elif isinstance(action, TerminateWorker):
                child_id, _ = self.live.pop(action.ref)
                self.log.append(f"stop {child_id}")
                self.apply(self.core.handle(Exited(action.ref, reasons.SHUTDOWN), 1.0))
            elif isinstance(action, Reply):
                self.replies.append(action.result)

    def run(self, new_config) -> list[str]:
        p = plan(self.config_now, new_config)
        replace_specs(self.core, p)
        job = rollout(self.core, p)
        value = None
        call_id = 0
        while True:
            try:
                command, args, supervisor = job.send(value)
            except StopIteration as done:
                return done.value
            call_id += 1
            self.apply(self.core.handle(Call(call_id, command, args, supervisor), 1.0))
            value = self.replies.pop()

    def workers(self) -> list[str]:
        return sorted(row["path"] for row in self.core.status(2.0) if row["type"] == "worker" and row["pid"])


def drive(old, new) -> Driver:
    driver = Driver(old)
    driver.config_now = old
    assert driver.run(new) == []
    return driver


def test_executor_change_rolls_executors_one_at_a_time_and_leaves_leaser_and_reaper():
    driver = drive(cfg(), cfg(executors={"count": 2, "command": "/bin/cat", "slots": 4}))
    assert driver.log == ["stop executor.0", "start executor.0", "stop executor.1", "start executor.1"]
    assert driver.workers() == ["root/executors/executor.0", "root/executors/executor.1", "root/leaser",
                                "root/reaper"]
    pool = driver.core.find("executors")
    assert all(c.spec.start[2][0]["executors"]["slots"] == 4 for c in pool.children)


def test_leaser_change_drains_the_leaser_first_and_starts_it_last():
    driver = drive(cfg(), cfg(leaser={"lease_secs": 99}))
    assert driver.log == ["stop leaser", "start leaser"]
    leaser = driver.core.root.children.get("leaser")
    assert leaser.spec.start[2][0]["leaser"]["lease_secs"] == 99
    assert leaser.restarts == 0  # a reload is not a crash: no restart counted


def test_queue_change_stops_leaser_then_restarts_reaper_then_starts_leaser():
    driver = drive(cfg(), cfg(queue={"url": "memory://", "name": "other"}))
    assert driver.log == ["stop leaser", "stop reaper", "start reaper", "start leaser"]


def test_count_up_starts_executors_only():
    driver = drive(cfg(), cfg(executors={"count": 4, "command": "/bin/cat"}))
    assert driver.log == ["start executor.2", "start executor.3"]
    assert len(driver.workers()) == 6


def test_count_down_stops_the_highest_executors_with_the_leaser_drained():
    driver = drive(cfg(executors={"count": 4, "command": "/bin/cat"}), cfg())
    assert driver.log == ["stop leaser", "stop executor.3", "stop executor.2", "start leaser"]
    assert driver.workers() == ["root/executors/executor.0", "root/executors/executor.1", "root/leaser",
                                "root/reaper"]


def test_spec_only_change_restarts_nothing_but_is_in_place():
    driver = drive(cfg(), cfg(leaser={"shutdown_secs": 3}))
    assert driver.log == []
    assert driver.core.root.children.get("leaser").spec.shutdown == 3.0
