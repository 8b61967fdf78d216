"""Helpers for tests on the NATS backend: drop a queue's streams, at once or when the session ends.

The backend never deletes its streams (a queue outlives its hosts), so tests clean up after
themselves; ``drop_at_exit`` does it for queues opened through ``tests/backends.py``.
"""

from __future__ import annotations

import asyncio
import atexit
import multiprocessing

_to_drop: set[tuple[str, str]] = set()


def drop_queue(url: str, name: str) -> None:
    """Delete the streams of queue ``name``; missing ones are fine."""
    import nats
    import nats.js.errors

    async def drop() -> None:
        nc = await nats.connect(url, connect_timeout=2, allow_reconnect=False)
        try:
            js = nc.jetstream()
            for kind in ("TASKS", "DELAY", "DEAD", "FENCE"):
                try:
                    await js.delete_stream(f"LT_{name}_{kind}")
                except nats.js.errors.NotFoundError:
                    pass
        finally:
            await nc.close()

    asyncio.run(drop())


def _drop_all() -> None:
    for url, name in sorted(_to_drop):
        try:
            drop_queue(url, name)
        except Exception:  # noqa: BLE001 - the server may be gone at exit; nothing to clean then
            pass


def drop_at_exit(url: str, name: str) -> None:
    """Drop queue ``name`` when this test session ends (not when a spawned helper process does)."""
    if multiprocessing.parent_process() is not None:
        return
    if not _to_drop:
        atexit.register(_drop_all)
    _to_drop.add((url, name))
