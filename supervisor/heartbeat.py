"""Liveness and stats bookkeeping from heartbeats. Pure: time is an argument.

``Liveness`` is the Paranoid Pirate table: each started child must be heard from within
``timeout`` seconds or it is declared dead (the runner then SIGKILLs its group; the exit counts as a
crash, "heartbeat timeout"). ``StatsBook`` aggregates the stats children report: a key ending in
``_total`` is a counter and survives restarts (each dead incarnation's last value is folded into a
per-child base), anything else is a gauge (the latest value).
"""

from __future__ import annotations

from typing import Any

Stats = dict[str, Any]


class Liveness:
    def __init__(self, timeout: float) -> None:
        self.timeout = timeout
        self._last: dict[int, float] = {}

    def beat(self, ref: int, now: float) -> None:
        """``ref`` was heard from at ``now`` (Ready counts as the first beat)."""
        self._last[ref] = now

    def forget(self, ref: int) -> None:
        self._last.pop(ref, None)

    def expired(self, now: float) -> list[int]:
        """Refs silent for longer than the timeout; they are forgotten (reported once)."""
        dead = [ref for ref, last in self._last.items() if now - last > self.timeout]
        for ref in dead:
            del self._last[ref]
        return dead

    def next_deadline(self) -> float | None:
        return min(self._last.values()) + self.timeout if self._last else None


class StatsBook:
    def __init__(self) -> None:
        self._base: dict[str, dict[str, float]] = {}  # child id -> counters of dead incarnations
        self._latest: dict[str, Stats] = {}  # child id -> last report of the live incarnation
        self._folded: dict[int, tuple[str, Stats]] = {}  # dead pid -> what was folded for it

    def update(self, child_id: str, pid: int, stats: Stats) -> None:
        """A heartbeat from ``pid``. One that arrives after its incarnation ended (its final
        heartbeat can trail the exit) only adds what its counters grew by since."""
        folded = self._folded.get(pid)
        if folded is not None and folded[0] == child_id:
            base = self._base.setdefault(child_id, {})
            for key, value in stats.items():
                if _is_counter(key, value):
                    base[key] = base.get(key, 0) + value - folded[1].get(key, 0)
            self._folded[pid] = (child_id, dict(stats))
            return
        self._latest[child_id] = dict(stats)

    def ended(self, child_id: str, pid: int) -> None:
        """The incarnation ``pid`` of ``child_id`` is gone: keep its counters in the base."""
        last = self._latest.pop(child_id, {})
        base = self._base.setdefault(child_id, {})
        for key, value in last.items():
            if _is_counter(key, value):
                base[key] = base.get(key, 0) + value
        self._folded[pid] = (child_id, last)
        if len(self._folded) > 4096:  # only the most recent deaths can still have mail in flight
            for old in list(self._folded)[:2048]:
                del self._folded[old]

    def snapshot(self) -> dict[str, Stats]:
        """child id -> counters (all incarnations) and gauges (latest)."""
        out: dict[str, Stats] = {}
        for child_id in set(self._base) | set(self._latest):
            merged: Stats = dict(self._base.get(child_id, {}))
            for key, value in self._latest.get(child_id, {}).items():
                merged[key] = merged.get(key, 0) + value if _is_counter(key, value) else value
            out[child_id] = merged
        return out


def _is_counter(key: str, value: Any) -> bool:
    return key.endswith("_total") and isinstance(value, (int, float)) and not isinstance(value, bool)
