"""A backend that wraps another and injects faults by plan: for tests and for drills on a real tree.

``FaultyBackend(inner, plan)`` forwards every call to ``inner``, except that a call the plan picks
goes wrong in one of five ways (``Rule.kind``):

- ``fail``: raise ``BackendUnavailable`` without calling ``inner`` (a refused connection);
- ``timeout``: sleep ``plan.delay_secs``, then raise ``BackendUnavailable`` without calling
  ``inner`` (a call that hung and was given up on);
- ``half``: call ``inner`` (it takes effect), then raise ``BackendUnavailable`` as if it had not (a
  reply lost on the way back). The caller retries; since mutating calls are idempotent, the retry
  answers OK or LOST and changes nothing more. A half-failed ``lease`` leaves tasks leased by
  nobody until their lease expires; a half-failed ``enqueue`` enqueues twice when retried (enqueue
  is not idempotent, as with any real queue);
- ``slow``: sleep ``plan.delay_secs``, then call ``inner`` normally (latency near a lease margin);
- ``retry``: the per-item answer ``Outcome.RETRY`` ("this item failed transiently; call again for
  it later") for chosen receipts of a call that answers one outcome per receipt (extend, ack,
  release, dead_letter). Those receipts are not passed to ``inner``, so nothing happens to them;
  the others are forwarded (with their own delays, errors or reasons) and answered as ``inner``
  answers. A caller must treat a RETRY item as not settled and send it again.

A rule picks calls of one method (``*`` = every data-path method: lease, extend, ack, release,
dead_letter; for ``retry`` the four with per-item outcomes) either with a probability or on its Nth
call (1-based, counted per method). The first call-level rule that fires wins. A ``retry`` rule
picks items instead: on its Nth call every receipt of that call, or each receipt on its own with the
probability, drawn from an RNG of its own, so batch sizes never shift the call-level faults. Every
method draws from its own RNG seeded with ``(plan.seed, method)``, so the faults a method sees
depend only on the seed and how many times that method was called, not on the interleaving with
other methods: a test run is repeatable. Every process that opens the same URL
(leaser, reaper, the CLI) draws the same sequence, and a restarted process starts it again.

URL form, so a tree can run on it from its config (``open_backend`` strips ``faulty+``)::

    faulty+sqlite:///tasks.db?fail=ack:0.3,lease:0.1&seed=1
    faulty+redis://127.0.0.1:6379/0?half=ack:0.2&timeout=extend@3&delay=0.5
    faulty+sqlite:///tasks.db?retry=ack:0.2,release@1

Query keys: ``fail``, ``timeout``, ``half``, ``slow``, ``retry`` (each a comma list of
``method:probability`` or ``method@N``), ``seed`` (an integer, default 0) and ``delay`` (seconds,
default 1.0). Any other query key is left on the inner URL. A bad plan is a one-line
``BackendConfigError``.
"""

from __future__ import annotations

import logging
import random
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote

from children.backends.base import (
    Backend,
    BackendConfigError,
    BackendUnavailable,
    Leased,
    Limits,
    Outcome,
    QueueStats,
    TaskInfo,
    TaskState,
)

PREFIX = "faulty+"
KINDS = ("fail", "timeout", "half", "slow", "retry")
DATA_PATH = ("lease", "extend", "ack", "release", "dead_letter")
#: the calls that answer one Outcome per receipt: the only ones a ``retry`` rule can pick items of
PER_ITEM = ("extend", "ack", "release", "dead_letter")
METHODS = DATA_PATH + ("enqueue", "stats", "list_tasks", "get", "delete", "requeue_dead", "purge")
DEFAULT_DELAY_SECS = 1.0

log = logging.getLogger("backend.faulty")


@dataclass(frozen=True, slots=True)
class Rule:
    """Make ``method`` go wrong as ``kind``: on its ``on_call``-th call (when > 0), else with
    ``probability`` on every call."""

    method: str
    kind: str
    probability: float = 0.0
    on_call: int = 0

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise BackendConfigError(f"fault rule: method {self.method!r} is not one of {', '.join(METHODS)}")
        if self.kind not in KINDS:
            raise BackendConfigError(f"fault rule: kind {self.kind!r} is not one of {', '.join(KINDS)}")
        if self.kind == "retry" and self.method not in PER_ITEM:
            raise BackendConfigError(f"fault rule: retry picks items of a per-item call "
                                     f"({', '.join(PER_ITEM)}), and {self.method} is not one")
        if not 0.0 <= self.probability <= 1.0:
            raise BackendConfigError(
                f"fault rule {self.method}: probability {self.probability} is not in [0, 1]")
        if self.on_call < 0:
            raise BackendConfigError(f"fault rule {self.method}: call number {self.on_call} is below 1")


@dataclass(frozen=True, slots=True)
class Plan:
    """Which calls go wrong, how (``rules``, first match wins), the RNG seed and how long the
    ``timeout`` and ``slow`` faults sleep."""

    rules: tuple[Rule, ...] = ()
    seed: int = 0
    delay_secs: float = DEFAULT_DELAY_SECS

    @classmethod
    def of(cls, seed: int = 0, delay_secs: float = DEFAULT_DELAY_SECS, **kinds: str) -> Plan:
        """A plan from the URL's spelling: ``Plan.of(fail="ack:0.3,lease@2", seed=1)``."""
        rules: list[Rule] = []
        for kind, spec in kinds.items():
            if kind not in KINDS:
                raise BackendConfigError(f"fault plan: {kind!r} is not one of {', '.join(KINDS)}")
            rules += parse_rules(kind, spec)
        if not 0.0 <= delay_secs <= 3600.0:
            raise BackendConfigError(f"fault plan: delay = {delay_secs} is not between 0 and 3600 seconds")
        return cls(tuple(rules), seed, delay_secs)


def parse_rules(kind: str, spec: str) -> list[Rule]:
    """``"ack:0.3,lease@2,*:0.1"`` -> rules of ``kind``; BackendConfigError naming the bad item."""
    rules: list[Rule] = []
    for item in filter(None, (part.strip() for part in spec.split(","))):
        if "@" in item:
            method, _, number_text = item.partition("@")
            number, chance = _number(int, number_text, kind, spec, item), 0.0
            if number < 1:
                raise _bad_item(kind, spec, item)
        elif ":" in item:
            method, _, chance_text = item.partition(":")
            number, chance = 0, _number(float, chance_text, kind, spec, item)
        else:
            raise _bad_item(kind, spec, item)
        for name in ((PER_ITEM if kind == "retry" else DATA_PATH) if method == "*" else (method,)):
            rules.append(Rule(name, kind, chance, number))
    return rules


def _bad_item(kind: str, spec: str, item: str) -> BackendConfigError:
    return BackendConfigError(f"fault plan {kind}={spec!r}: {item!r} is not METHOD:PROBABILITY "
                              f"(e.g. ack:0.3) or METHOD@N (its Nth call, N >= 1)")


def _number(convert: Callable[[str], Any], text: str, kind: str, spec: str, item: str) -> Any:
    try:
        return convert(text)
    except ValueError:
        raise _bad_item(kind, spec, item) from None


def split_url(url: str) -> tuple[str, Plan]:
    """``faulty+INNER?plan`` -> (INNER with the query keys that are not the plan's, the plan)."""
    if not url.lower().startswith(PREFIX):
        raise BackendConfigError(f"queue.url: a fault-injecting URL starts with {PREFIX!r}")
    inner, _, query = url[len(PREFIX):].partition("?")
    kept: list[str] = []
    kinds: dict[str, str] = {}
    seed, delay = 0, DEFAULT_DELAY_SECS
    for pair in filter(None, query.split("&")):
        key, _, value = pair.partition("=")
        value = unquote(value)  # "ack%3A0.3" is "ack:0.3"
        try:
            if key in KINDS:
                kinds[key] = ",".join(filter(None, (kinds.get(key, ""), value)))
            elif key == "seed":
                seed = int(value)
            elif key == "delay":
                delay = float(value)
            else:
                kept.append(pair)
        except ValueError:
            allowed = "an integer" if key == "seed" else "a number of seconds"
            raise BackendConfigError(f"fault plan: {key} = {value!r} is not {allowed}") from None
    if "://" not in inner:
        raise BackendConfigError(f"fault plan: {PREFIX}{inner!r} names no backend URL after {PREFIX!r}")
    return inner + ("?" + "&".join(kept) if kept else ""), Plan.of(seed, delay, **kinds)


def _without(args: tuple[Any, ...], dropped: set[str]) -> tuple[Any, ...]:
    """A per-item call's arguments (receipts first) without the ``dropped`` receipts: every
    argument that is a list or tuple holds one value per receipt and loses the same positions."""
    receipts = list(args[0])
    keep = [i for i, receipt in enumerate(receipts) if receipt not in dropped]
    return tuple([list(arg)[i] for i in keep] if isinstance(arg, (list, tuple)) else arg
                 for arg in args)


def open_faulty(url: str, name: str = "default", base_dir: Path | None = None) -> FaultyBackend:
    """Open ``faulty+INNER?plan``: the inner backend through ``open_backend``, wrapped by its plan."""
    from children.backends import open_backend  # the factory imports this module lazily

    inner_url, plan = split_url(url)
    if inner_url.lower().startswith(PREFIX):
        raise BackendConfigError("fault plan: faulty+faulty+ nests; give one plan")
    return FaultyBackend(open_backend(inner_url, name, base_dir), plan)


class FaultyBackend(Backend):
    """``inner`` with the faults of ``plan`` injected; see the module docstring.

    ``calls[method]`` counts calls made, ``injected[(method, kind)]`` the faults injected (for
    ``retry``: the receipts answered RETRY): a test reads them to know its faults really happened.
    ``sleep`` is injectable so a unit test can run the ``timeout`` and ``slow`` faults without
    waiting.
    """

    name = "faulty"

    def __init__(self, inner: Backend, plan: Plan, sleep: Callable[[float], Any] = time.sleep) -> None:
        self.inner = inner
        self.plan = plan
        self.name = PREFIX + inner.name
        self.calls: Counter[str] = Counter()
        self.injected: Counter[tuple[str, str]] = Counter()
        self._sleep = sleep
        self._rules = {m: [r for r in plan.rules if r.method == m and r.kind != "retry"] for m in METHODS}
        self._item_rules = {m: [r for r in plan.rules if r.method == m and r.kind == "retry"]
                            for m in PER_ITEM}
        # str seeds hash with sha512: the same sequence in every process and Python run
        self._rng = {m: random.Random(f"{plan.seed}:{m}") for m in METHODS}
        self._item_rng = {m: random.Random(f"{plan.seed}:{m}:items") for m in PER_ITEM}

    def _fault(self, method: str) -> str | None:
        """Count the call and say which fault (if any) it gets. Every probability rule draws on
        every call, so whether one fires never shifts the sequence another rule sees."""
        self.calls[method] += 1
        number = self.calls[method]
        chosen = None
        for rule in self._rules[method]:
            fires = rule.on_call == number if rule.on_call else self._rng[method].random() < rule.probability
            if fires and chosen is None:
                chosen = rule.kind
        if chosen is not None:
            self.injected[(method, chosen)] += 1
            log.debug("injecting %s into %s call %d", chosen, method, number)
        return chosen

    def _retried(self, method: str, receipts: Sequence[str]) -> set[str]:
        """The receipts of this call that answer RETRY. A probability rule draws once per receipt,
        chosen or not, so the sequence depends only on the seed and the receipts seen."""
        number = self.calls[method]
        chosen: set[str] = set()
        for rule in self._item_rules.get(method, ()):
            if rule.on_call:
                if rule.on_call == number:
                    chosen.update(receipts)
                continue
            for receipt in receipts:
                if self._item_rng[method].random() < rule.probability:
                    chosen.add(receipt)
        if chosen:
            self.injected[(method, "retry")] += len(chosen)
            log.debug("answering retry for %d of %d receipts of %s call %d", len(chosen),
                      len(receipts), method, number)
        return chosen

    def _call(self, method: str, *args: Any) -> Any:
        kind = self._fault(method)
        where = f"faulty: {method} call {self.calls[method]}"
        if kind == "fail":
            raise BackendUnavailable(f"{where}: injected failure")
        if kind in ("timeout", "slow"):
            self._sleep(self.plan.delay_secs)
            if kind == "timeout":
                raise BackendUnavailable(f"{where}: injected timeout after {self.plan.delay_secs}s")
        retried = self._retried(method, args[0]) if method in PER_ITEM else set()
        if retried:
            result = dict(getattr(self.inner, method)(*_without(args, retried)))
            result.update(dict.fromkeys(retried, Outcome.RETRY))
        else:
            result = getattr(self.inner, method)(*args)
        if kind == "half":
            raise BackendUnavailable(f"{where}: injected failure after the call took effect")
        return result

    @property
    def limits(self) -> Limits:
        return self.inner.limits

    # -- the data path -------------------------------------------------------------------------
    def lease(self, max_tasks: int, lease_secs: float, wait_secs: float = 0.0,
              tag: str | None = None) -> list[Leased]:
        return self._call("lease", max_tasks, lease_secs, wait_secs, tag)

    def extend(self, receipts: Sequence[str], lease_secs: float) -> dict[str, Outcome]:
        return self._call("extend", receipts, lease_secs)

    def ack(self, receipts: Sequence[str]) -> dict[str, Outcome]:
        return self._call("ack", receipts)

    def release(self, receipts: Sequence[str], delay_secs: float | Sequence[float] = 0.0,
                errors: Sequence[str] | None = None, count_attempt: bool = True) -> dict[str, Outcome]:
        return self._call("release", receipts, delay_secs, errors, count_attempt)

    def dead_letter(self, receipts: Sequence[str], reason: str | Sequence[str]) -> dict[str, Outcome]:
        return self._call("dead_letter", receipts, reason)

    def enqueue(self, payloads: Sequence[bytes], delay_secs: float = 0.0, tag: str = "") -> list[str]:
        return self._call("enqueue", payloads, delay_secs, tag)

    def stats(self) -> QueueStats:
        return self._call("stats")

    # -- admin ---------------------------------------------------------------------------------
    def list_tasks(self, state: TaskState | None = None, limit: int = 100) -> list[TaskInfo]:
        return self._call("list_tasks", state, limit)

    def get(self, task_id: str) -> TaskInfo | None:
        return self._call("get", task_id)

    def delete(self, task_ids: Sequence[str]) -> int:
        return self._call("delete", task_ids)

    def requeue_dead(self, task_ids: Sequence[str] | None = None) -> int:
        return self._call("requeue_dead", task_ids)

    def purge(self) -> int:
        return self._call("purge")

    def wait_for_work(self, timeout_secs: float) -> bool:
        # a wait changes nothing and its answer is only a hint: no faults here
        return self.inner.wait_for_work(timeout_secs)

    def close(self) -> None:
        self.inner.close()
