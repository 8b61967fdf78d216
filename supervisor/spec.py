"""Child specs and supervisor flags: frozen data, OTP's defaults, validated once.

Defaults (OTP ``supervisor.erl``): flags ``strategy=one_for_one, intensity=1, period=5,
auto_shutdown=never``; child ``restart=permanent, type=worker, significant=False, shutdown=5.0``
seconds for a worker and ``infinity`` for a supervisor. Every validation error is a ``SpecError``
naming the field, the value and what is allowed.

A worker's ``start`` is plain data ``(module, function, args)``: the child process calls
``module.function(ctx, *args, *extra_args)``. A supervisor child's ``start`` is a
``SupervisorStart``: supervisors are state machines inside the root process, not OS processes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

Restart = Literal["permanent", "transient", "temporary"]
Strategy = Literal["one_for_one", "one_for_all", "rest_for_one", "simple_one_for_one"]
AutoShutdown = Literal["never", "any_significant", "all_significant"]
ChildType = Literal["worker", "supervisor"]
Shutdown = float | Literal["brutal_kill", "infinity"]

RESTARTS = ("permanent", "transient", "temporary")
STRATEGIES = ("one_for_one", "one_for_all", "rest_for_one", "simple_one_for_one")
AUTO_SHUTDOWNS = ("never", "any_significant", "all_significant")
CHILD_TYPES = ("worker", "supervisor")

DEFAULT_WORKER_SHUTDOWN = 5.0


class SpecError(ValueError):
    """A child spec or supervisor flags value that OTP would reject; the message names the field,
    the value and what is allowed."""

    def __init__(self, where: str, value: Any, allowed: str) -> None:
        super().__init__(f"{where} = {value!r}: {allowed}")
        self.where = where
        self.value = value
        self.allowed = allowed


@dataclass(frozen=True, slots=True)
class SupFlags:
    strategy: Strategy = "one_for_one"
    intensity: int = 1
    period: float = 5.0
    auto_shutdown: AutoShutdown = "never"

    def __post_init__(self) -> None:
        if self.strategy not in STRATEGIES:
            raise SpecError("strategy", self.strategy, "one of " + " | ".join(STRATEGIES))
        if not _is_int(self.intensity) or self.intensity < 0:
            raise SpecError("intensity", self.intensity, "an integer >= 0")
        if not _is_number(self.period) or not self.period > 0 or math.isinf(self.period):
            raise SpecError("period", self.period, "a number of seconds > 0")
        if self.auto_shutdown not in AUTO_SHUTDOWNS:
            raise SpecError("auto_shutdown", self.auto_shutdown, "one of " + " | ".join(AUTO_SHUTDOWNS))

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> SupFlags:
        """Flags from a mapping; unknown keys are ignored, as OTP does."""
        known = {k: raw[k] for k in ("strategy", "intensity", "period", "auto_shutdown") if k in raw}
        return cls(**known)


@dataclass(frozen=True, slots=True)
class SupervisorStart:
    """How to start a child supervisor: its flags and child specs.

    ``initial_extra_args`` (simple_one_for_one only): start one child per entry at init,
    synchronously and in order. A deviation from OTP (which starts no children at init), needed so
    the executor pool is up before the leaser starts.
    """

    flags: SupFlags
    children: tuple[ChildSpec, ...] = ()
    initial_extra_args: tuple[tuple[Any, ...], ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "children", tuple(self.children))
        object.__setattr__(self, "initial_extra_args", tuple(tuple(a) for a in self.initial_extra_args))
        check_children(self.flags, self.children, self.initial_extra_args)


WorkerStart = tuple[str, str, tuple[Any, ...]]


@dataclass(frozen=True, slots=True)
class ChildSpec:
    id: str
    start: WorkerStart | SupervisorStart
    restart: Restart = "permanent"
    shutdown: Shutdown | None = None  # None: 5.0 s for a worker, "infinity" for a supervisor
    type: ChildType | None = None  # None: "supervisor" when start is a SupervisorStart, else "worker"
    significant: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.id, str) or not self.id or "/" in self.id:
            raise SpecError("id", self.id, "a non-empty string without '/'")
        where = f"child {self.id!r}"
        kind = self.type if self.type is not None else (
            "supervisor" if isinstance(self.start, SupervisorStart) else "worker")
        if kind not in CHILD_TYPES:
            raise SpecError(f"{where}.type", self.type, "worker | supervisor")
        if kind == "supervisor" and not isinstance(self.start, SupervisorStart):
            raise SpecError(f"{where}.start", self.start, "a SupervisorStart for a supervisor child")
        if kind == "worker":
            object.__setattr__(self, "start", _check_mfa(where, self.start))
        object.__setattr__(self, "type", kind)
        if self.restart not in RESTARTS:
            raise SpecError(f"{where}.restart", self.restart, "permanent | transient | temporary")
        shutdown = self.shutdown
        if shutdown is None:
            shutdown = "infinity" if kind == "supervisor" else DEFAULT_WORKER_SHUTDOWN
        elif shutdown not in ("brutal_kill", "infinity"):
            if not _is_number(shutdown) or shutdown < 0 or math.isnan(shutdown):
                raise SpecError(f"{where}.shutdown", shutdown,
                                "brutal_kill | infinity | a number of seconds >= 0")
            shutdown = float(shutdown)
        object.__setattr__(self, "shutdown", shutdown)
        if not isinstance(self.significant, bool):
            raise SpecError(f"{where}.significant", self.significant, "true or false")
        if self.significant and self.restart == "permanent":
            raise SpecError(f"{where}.significant", True,
                            "bad combination: a significant child must be transient or temporary")

    @property
    def is_supervisor(self) -> bool:
        return self.type == "supervisor"

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> ChildSpec:
        """A worker spec from a mapping (the control socket's ``start_child``): ``start`` is
        ``[module, function, args]``."""
        if "id" not in raw:
            raise SpecError("id", None, "missing: every child spec needs an id")
        if "start" not in raw:
            raise SpecError(f"child {raw['id']!r}.start", None, "missing: [module, function, args]")
        known = ("id", "start", "restart", "shutdown", "type", "significant")
        return cls(**{k: raw[k] for k in known if k in raw})


def check_children(flags: SupFlags, children: tuple[ChildSpec, ...],
                   initial_extra_args: tuple[tuple[Any, ...], ...] = ()) -> None:
    """The rules that involve a supervisor's flags and all its children together."""
    ids = set()
    for spec in children:
        if not isinstance(spec, ChildSpec):
            raise SpecError("children", spec, "ChildSpec values")
        if spec.id in ids:
            raise SpecError(f"child {spec.id!r}.id", spec.id, "duplicate child id in one supervisor")
        ids.add(spec.id)
        if spec.significant and flags.auto_shutdown == "never":
            raise SpecError(f"child {spec.id!r}.significant", True,
                            "bad combination: significant children need auto_shutdown != never")
    if flags.strategy == "simple_one_for_one":
        if len(children) != 1:
            raise SpecError("children", [c.id for c in children],
                            "simple_one_for_one takes exactly one child spec")
    elif initial_extra_args:
        raise SpecError("initial_extra_args", list(initial_extra_args), "only for simple_one_for_one")


def _check_mfa(where: str, start: Any) -> WorkerStart:
    if (not isinstance(start, (tuple, list)) or len(start) != 3 or not isinstance(start[0], str)
            or not isinstance(start[1], str) or not isinstance(start[2], (tuple, list))
            or not start[0] or not start[1]):
        raise SpecError(f"{where}.start", start, "(module: str, function: str, args: tuple)")
    return (start[0], start[1], tuple(start[2]))


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


__all__ = ["ChildSpec", "SupFlags", "SupervisorStart", "SpecError", "check_children"]
