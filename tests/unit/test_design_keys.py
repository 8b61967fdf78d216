"""DESIGN.md §6 pinned: every key path it lists, its default and its seed flag, hard-coded here.

The schema (config/schema.py) is the one table the code reads; this copy of the contract is
deliberately not derived from it, so a key renamed, dropped or given a new default there fails
here until DESIGN.md and this list change with it.
"""

from __future__ import annotations

import pytest

from config.schema import KEYS, TABLE

pytestmark = pytest.mark.timeout(10)

# (key path, default, seed flag name or ""), in the order of DESIGN.md §6
DESIGN_6 = [
    ("queue.url", "sqlite:///tasks.db", ""),
    ("queue.name", "default", "taskqueue_name"),
    ("leaser.lease_secs", 30, "lease_secs"),
    ("leaser.max_in_flight", 0, "num_tasks"),
    ("leaser.min_running_tasks", 0, "min_running_tasks"),
    ("leaser.batch_wait_secs", 600, "timeout_secs_for_next_lease_request"),
    ("leaser.idle_poll_secs", 2.0, "sleep_interval_secs"),
    ("leaser.requests_per_sec", 0, "taskapi_requests_per_sec"),
    ("leaser.tag", "", ""),
    ("leaser.max_lease_secs", 7200, ""),
    ("executors.count", 0, ""),
    ("executors.slots", 1, ""),
    ("executors.command", ("/bin/cat",), "executable_binary"),  # DESIGN's "/bin/cat", as argv
    ("executors.callable", "", ""),
    ("executors.python_path", (), ""),
    ("executors.timeout_secs", 3600, "task_timeout_secs"),
    ("executors.output_url", "", "output_url"),
    ("executors.max_tasks_per_child", 0, ""),
    ("executors.max_memory_mb", 0, ""),
    ("reaper.batch_size", 100, ""),
    ("reaper.max_latency_ms", 20, ""),
    ("retry.max_attempts", 5, ""),
    ("retry.backoff_secs", 1.0, ""),
    ("retry.backoff_max_secs", 300, ""),
    ("supervisor.strategy", "one_for_one", ""),
    ("supervisor.intensity", 10, ""),
    ("supervisor.period_secs", 60, ""),
    ("supervisor.shutdown_secs", 30, ""),
    ("supervisor.heartbeat_secs", 1, ""),
    ("supervisor.heartbeat_timeout_secs", 10, ""),
    ("metrics.listen", "", ""),
    ("log.level", "info", ""),
    ("log.format", "text", ""),
]

# "Per child, [leaser], [executors] and [reaper] also take restart and shutdown_secs": every child
# of the tree is permanent (§2), and shutdown_secs inherits [supervisor] shutdown_secs (None here).
PER_CHILD = [
    (f"{section}.{name}", default, "")
    for section in ("leaser", "executors", "reaper")
    for name, default in (("restart", "permanent"), ("shutdown_secs", None))
]


def schema_key(path: str):
    section, _, name = path.partition(".")
    assert name in KEYS.get(section, {}), f"DESIGN §6 lists {path}; config/schema.py has no such key"
    return KEYS[section][name]


@pytest.mark.parametrize("path, default, seed", DESIGN_6 + PER_CHILD,
                         ids=[path for path, _, _ in DESIGN_6 + PER_CHILD])
def test_design_key_is_in_the_schema_with_its_default_and_seed_name(path: str, default, seed: str) -> None:
    key = schema_key(path)
    # == on purpose: DESIGN writes 30 where a "number" key holds 30.0
    assert key.default == default, f"{path}: schema default {key.default!r}, DESIGN §6 says {default!r}"
    assert key.seed == seed, f"{path}: schema seed flag {key.seed!r}, DESIGN §6 says {seed!r}"


def test_the_schema_adds_only_keys_design_does_not_forbid() -> None:
    # Keys beyond §6 are allowed (DESIGN: "where it is silent, do what an operator would expect"),
    # but they must be listed here on purpose, so none appears without a decision.
    listed = {path for path, _, _ in DESIGN_6 + PER_CHILD}
    extra = sorted(k.path for k in TABLE if k.path not in listed)
    assert extra == ["supervisor.group", "supervisor.user"]


def test_every_seed_flag_of_design_has_exactly_one_key() -> None:
    seeds = [k.seed for k in TABLE if k.seed]
    assert sorted(seeds) == sorted(seed for _, _, seed in DESIGN_6 if seed)
