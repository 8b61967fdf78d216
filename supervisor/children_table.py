"""One supervisor's children: start order plus a lookup by name and by incarnation ref.

Like OTP's ``{Ids, Db}``: the order makes rest_for_one and reverse-order termination cheap. A
static child's name is its spec id; a simple_one_for_one child is named ``<spec id>.<n>`` with the
lowest free ``n`` (``executor.0``, ``executor.1``, ...), and keeps its name across restarts.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Literal

from supervisor.spec import ChildSpec

State = Literal["undefined", "starting", "running", "terminating", "restarting"]


@dataclass(slots=True)
class Child:
    """One child as its supervisor sees it. ``ref`` is set while an incarnation exists (starting,
    running or terminating); ``restarting`` means a restart failed and a retry is queued."""

    spec: ChildSpec
    name: str
    extra_args: tuple[Any, ...] = ()
    ref: int | None = None
    pid: int | None = None
    state: State = "undefined"
    restarts: int = 0
    since: float | None = None

    @property
    def alive(self) -> bool:
        return self.ref is not None


class ChildrenTable:
    def __init__(self) -> None:
        self._order: list[str] = []
        self._by_name: dict[str, Child] = {}
        self._by_ref: dict[int, str] = {}

    def __len__(self) -> int:
        return len(self._order)

    def __contains__(self, name: str) -> bool:
        return name in self._by_name

    def in_order(self) -> list[Child]:
        """Children in start order (oldest first)."""
        return [self._by_name[name] for name in self._order]

    def __iter__(self) -> Iterator[Child]:
        return iter(self.in_order())

    def get(self, name: str) -> Child | None:
        return self._by_name.get(name)

    def by_ref(self, ref: int) -> Child | None:
        name = self._by_ref.get(ref)
        return self._by_name.get(name) if name is not None else None

    def by_pid(self, pid: int) -> Child | None:
        return next((c for c in self._by_name.values() if c.pid == pid and c.alive), None)

    def add(self, child: Child) -> Child:
        self._order.append(child.name)
        self._by_name[child.name] = child
        return child

    def remove(self, child: Child) -> None:
        if child.ref is not None:
            self._by_ref.pop(child.ref, None)
        if self._by_name.pop(child.name, None) is not None:
            self._order.remove(child.name)

    def set_ref(self, child: Child, ref: int | None) -> None:
        if child.ref is not None:
            self._by_ref.pop(child.ref, None)
        child.ref = ref
        if ref is not None:
            self._by_ref[ref] = child.name

    def from_child(self, name: str) -> list[Child]:
        """``name`` and every child started after it (rest_for_one's group)."""
        index = self._order.index(name)
        return [self._by_name[n] for n in self._order[index:]]

    def free_name(self, base: str) -> str:
        """The lowest ``base.<n>`` not in use (simple_one_for_one names)."""
        n = 0
        while f"{base}.{n}" in self._by_name:
            n += 1
        return f"{base}.{n}"
