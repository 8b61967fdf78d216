"""Reload: re-read the config of a running tree and apply it by rolling restarts (SIGHUP, or
``supervise reload CONFIG``).

``ConfigReloader.prepare()`` loads the file again and decides (pure, ``plan()``) what the change
means; a config that is bad, or that changes what only a fresh start can change, is refused with
one line and the running config stays. A good one becomes a ``Plan``: the new specs (every child's
start args carry the whole config as plain data, so every spec is replaced) and which children must
restart because a key they read changed (``READS``).

``rollout(core, plan)`` is the order of work, as a generator of child-API calls (OTP's
``terminate_child`` / ``restart_child`` / ``start_child``, which never count against restart
intensity), one at a time, each sent after the previous one was answered:

1. the leaser is stopped first when it changes or the pool shrinks: it drains (releases what it has
   not dispatched, waits for the running tasks and their settlements), so no task is held by a
   process about to go;
2. the reaper is restarted (the leaser re-sends whatever it has not seen settled);
3. executors beyond the new ``count`` are stopped; changed executors are restarted one at a time, so
   the pool never loses more than one executor's capacity; new ones are started;
4. the leaser is started again.
"""

from __future__ import annotations

import logging
from collections.abc import Generator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from config.schema import Config
from supervisor.spec import ChildSpec, SupervisorStart, SupFlags

if TYPE_CHECKING:
    from supervisor.core import TreeCore

log = logging.getLogger("root")  # the root process: its place in the tree

ALL = None
SPEC_ONLY = ("restart", "shutdown_secs")  # live in the child's spec, not read by the child
# child -> section -> the keys it reads (ALL: every key but SPEC_ONLY)
READS: dict[str, dict[str, tuple[str, ...] | None]] = {
    "leaser": {"queue": ALL, "leaser": ALL, "retry": ALL, "reaper": ("max_latency_ms",), "log": ("level",)},
    "reaper": {"queue": ALL, "reaper": ALL, "retry": ALL, "leaser": ("requests_per_sec",), "log": ("level",)},
    "executors": {"executors": ("slots", "command", "callable", "python_path", "timeout_secs", "output_url",
                                "max_tasks_per_child", "max_memory_mb"), "log": ("level",)},
}
# keys only a fresh start of the tree can change, and why
NEEDS_RESTART: dict[str, str] = {
    "supervisor.heartbeat_secs": "running children keep their heartbeat interval",
    "supervisor.heartbeat_timeout_secs": "it must match the children's heartbeat interval",
    "metrics.listen": "the metrics server binds once",
    "log.format": "one log stream must not mix formats",
}
POOL = "executors"


class ReloadRefused(Exception):
    """The new config is refused; ``str`` is the line(s) to log and return. The old one is kept."""


@dataclass(frozen=True)
class Plan:
    cfg: Config
    flags: SupFlags
    children: tuple[ChildSpec, ...]
    changed: tuple[str, ...]  # "section.key" that differ
    restart: frozenset[str] = field(default_factory=frozenset)  # "leaser", "reaper", "executors"
    count: int = 0  # executors wanted

    def describe(self) -> str:
        if not self.changed:
            return "no change"
        what = ", ".join(sorted(self.restart)) or "none"
        return f"changed {', '.join(self.changed)}; restarting {what}; executors -> {self.count}"


def changed_keys(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """``section.key`` paths whose values differ between two ``Config.to_dict()`` results."""
    out = []
    for section, values in new.items():
        if not isinstance(values, dict):
            continue
        for key, value in values.items():
            if old.get(section, {}).get(key) != value:
                out.append(f"{section}.{key}")
    return out


def restarts_for(changed: list[str]) -> frozenset[str]:
    """The children that read one of the ``changed`` keys."""
    out = set()
    for child, sections in READS.items():
        for path in changed:
            section, _, key = path.partition(".")
            if section not in sections:
                continue
            keys = sections[section]
            if (keys is ALL and key not in SPEC_ONLY) or (keys is not ALL and key in keys):
                out.add(child)
    return frozenset(out)


def plan(old: Config, new: Config, burst: bool = False) -> Plan:
    """What going from ``old`` to ``new`` takes (pure). Raises ReloadRefused for a change only a
    restart of the tree can make."""
    from supervisor.app import build_tree, executor_count

    changed = changed_keys(old.to_dict(), new.to_dict())
    refused = [f"{path}: changed from {_get(old, path)!r} to {_get(new, path)!r}, which takes a restart "
               f"of the tree ({NEEDS_RESTART[path]})" for path in changed if path in NEEDS_RESTART]
    if refused:
        raise ReloadRefused("; ".join(refused))
    flags, children = build_tree(new, burst)
    return Plan(new, flags, children, tuple(changed), restarts_for(changed), executor_count(new))


def _get(cfg: Config, path: str) -> Any:
    section, _, key = path.partition(".")
    return getattr(getattr(cfg, section), key)


class ConfigReloader:
    """Holds the running config; ``prepare()`` reads the file again and returns the Plan (or raises
    ReloadRefused); ``commit(plan)`` makes it the running config."""

    def __init__(self, cfg: Config, burst: bool = False) -> None:
        self.cfg = cfg
        self.burst = burst
        self.generation = 0

    def prepare(self) -> Plan:
        import config
        from supervisor.app import PreflightError, preflight

        try:
            new = config.load(self.cfg.path)
        except config.ConfigError as exc:
            raise ReloadRefused("; ".join(exc.lines())) from None
        result = plan(self.cfg, new, self.burst)
        # Only what changed is checked against the world: opening the backend may take a while
        if any(p.startswith(("queue.", "executors.command", "executors.callable", "executors.python_path"))
               for p in result.changed):
            try:
                preflight(new)
            except PreflightError as exc:
                raise ReloadRefused(str(exc)) from None
        return result

    def commit(self, plan: Plan) -> None:
        """Make ``plan`` the running config. A new log level is set in the root now, so the
        children restarted for it (forked from the root) inherit it."""
        if plan.cfg.log.level != self.cfg.log.level:
            logging.getLogger().setLevel(getattr(logging, plan.cfg.log.level.upper(), logging.INFO))
        self.cfg = plan.cfg
        self.generation += 1


# -- applying a plan to the running tree ----------------------------------------------------------
def replace_specs(core: TreeCore, plan: Plan) -> None:
    """Put the plan's specs and flags in place; nothing restarts. A child restarted from now on
    (by its supervisor after a crash, or by ``rollout``) starts with the new config."""
    root = core.root
    root.flags = plan.flags
    pool_flags: SupFlags | None = None
    executor_spec: ChildSpec | None = None
    for spec in plan.children:
        child = root.children.get(spec.id)
        if child is not None:
            child.spec = spec
        if isinstance(spec.start, SupervisorStart):
            pool_flags, executor_spec = spec.start.flags, spec.start.children[0]
    pool = core.find(POOL)
    if pool is not None and executor_spec is not None:
        pool.flags = pool_flags
        pool._simple_spec = executor_spec  # noqa: SLF001 - strategy.py has no setter (yet)
        for child in pool.children:
            child.spec = executor_spec


Request = tuple[str, dict[str, Any], str]  # (command, args, supervisor path)


def _index(name: str) -> int:
    tail = name.rpartition(".")[2]
    return int(tail) if tail.isdigit() else -1


def rollout(core: TreeCore, plan: Plan) -> Generator[Request, Any, list[str]]:
    """The child-API calls that apply ``plan`` (after ``replace_specs``), one at a time: send each
    request and ``send()`` back its result. Returns the problems met (empty when all went well).
    Stops early when the tree is shutting down."""
    problems: list[str] = []

    def failed(what: str, result: Any) -> bool:
        if isinstance(result, tuple) and result and result[0] == "error":
            problems.append(f"{what}: {result[1]}")
            return True
        return False

    def pool_children() -> list[Any]:
        pool = core.find(POOL)
        return sorted(pool.children, key=lambda c: _index(c.name)) if pool is not None else []

    shrink = len(pool_children()) > plan.count
    leaser_down = "leaser" in plan.restart or shrink
    if leaser_down:
        result = yield ("terminate_child", {"id": "leaser"}, "")
        if failed("stop leaser", result):
            return problems
    if "reaper" in plan.restart:
        result = yield ("terminate_child", {"id": "reaper"}, "")
        if not failed("stop reaper", result):
            result = yield ("restart_child", {"id": "reaper"}, "")
            failed("start reaper", result)
    if "shutting_down" in " ".join(problems):
        return problems
    for child in reversed(pool_children()[plan.count:]):  # newest first, as OTP stops
        if child.pid is not None:
            result = yield ("terminate_child", {"pid": child.pid}, POOL)
            failed(f"stop {child.name}", result)
    if "executors" in plan.restart:
        for child in pool_children()[:plan.count]:
            if child.pid is None:
                continue  # not running now: its supervisor restarts it with the new spec
            index = _index(child.name)
            result = yield ("terminate_child", {"pid": child.pid}, POOL)
            if failed(f"stop {child.name}", result):
                continue
            result = yield ("start_child", {"args": (index,)}, POOL)
            failed(f"start executor.{index}", result)
    have = {_index(c.name) for c in pool_children()}
    for index in [i for i in range(plan.count) if i not in have][: plan.count - len(have)]:
        result = yield ("start_child", {"args": (index,)}, POOL)
        failed(f"start executor.{index}", result)
    if leaser_down:
        result = yield ("restart_child", {"id": "leaser"}, "")
        if isinstance(result, tuple) and result[:2] == ("error", "not_found"):  # temporary: removed
            spec = next(s for s in plan.children if s.id == "leaser")
            result = yield ("start_child", {"spec": spec}, "")
        failed("start leaser", result)
    return problems
