"""Settlements waiting for a backend call. Pure: flush when ``batch_size`` items are waiting, or
``max_latency`` after the first one arrived, whichever comes first (Pub/Sub's dispatcher does the
same with 10 ms), de-duplicated by receipt."""

from __future__ import annotations

from typing import Any


class Batcher:
    def __init__(self, batch_size: int, max_latency_secs: float) -> None:
        self.batch_size = max(1, batch_size)
        self.max_latency = max(0.0, max_latency_secs)
        self.items: dict[str, Any] = {}  # receipt -> item, in arrival order
        self.first_at: float | None = None
        self.not_before = 0.0  # after a failed flush: back off until then

    def add(self, receipt: str, item: Any, now: float) -> None:
        if not self.items:
            self.first_at = now
        self.items[receipt] = item

    def __len__(self) -> int:
        return len(self.items)

    def due_at(self) -> float | None:
        """When the next flush is due (None when empty)."""
        if not self.items:
            return None
        if len(self.items) >= self.batch_size:
            return self.not_before
        return max(self.not_before, (self.first_at or 0.0) + self.max_latency)

    def due(self, now: float, draining: bool = False) -> bool:
        at = self.due_at()
        if at is None:
            return False
        return now >= (self.not_before if draining else at)

    def take(self, limit: int | None = None) -> list[Any]:
        """Remove and return up to ``limit`` items, oldest first."""
        limit = len(self.items) if limit is None else limit
        receipts = list(self.items)[:limit]
        taken = [self.items.pop(r) for r in receipts]
        self.first_at = None if not self.items else self.first_at
        return taken

    def put_back(self, items: list[tuple[str, Any]], now: float, retry_at: float) -> None:
        """Return items whose flush failed; nothing is flushed again before ``retry_at``."""
        for receipt, item in items:
            self.items.setdefault(receipt, item)
        if self.items and self.first_at is None:
            self.first_at = now
        self.not_before = retry_at
