"""Admin calls and counts of the NATS JetStream backend (``children/backends/nats.py``).

A mixin for ``NatsBackend``: it reads the four streams through the host's connection. JetStream
cannot index a stream by task id, but the id is the last token of each subject, so ``get`` and
``delete`` are one ``next_by_subj`` lookup per stream; ``list_tasks`` walks a stream message by
message (fine for an operator's listing, not for a hot path).
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Sequence
from typing import Any

import nats.js.errors

from children.backends.base import QueueStats, TaskInfo, TaskState

_ID = re.compile(r"[0-9a-f]{32}")
_UNTAGGED = "_"
_KINDS = ("tasks", "delay", "dead")


class NatsAdmin:
    """stats, list_tasks, get, delete, requeue_dead, purge; the host provides ``_run``, ``_js``,
    ``_nc``, ``_streams``, ``_subject``, ``_subj``, ``_keep``, ``_fence_record``, ``_delete_seq``
    and ``_forget``."""

    _run: Any
    _js: Any
    _nc: Any
    _streams: dict[str, str]
    _subject: str
    _subj: Any
    _keep: dict
    _fence_record: Any
    _delete_seq: Any
    _forget: Any

    async def _counts(self) -> dict[str, Any]:
        found = await asyncio.gather(*(self._js.stream_info(self._streams[k]) for k in _KINDS))
        infos = dict(zip(_KINDS, found, strict=True))
        consumers = await self._js.consumers_info(self._streams["tasks"])
        leased = sum(info.num_ack_pending or 0 for info in consumers)
        return {"ready": max(0, infos["tasks"].state.messages - leased), "leased": leased,
                "delayed": infos["delay"].state.messages, "dead": infos["dead"].state.messages,
                "infos": infos, "consumers": consumers}

    def stats(self) -> QueueStats:
        return self._run(self._stats())

    async def _stats(self) -> QueueStats:
        counts = await self._counts()
        firsts = [await self._next(k, counts["infos"][k].state.first_seq) for k in ("tasks", "delay")
                  if counts["infos"][k].state.messages]
        enqueued = [_enqueued_at(m) for m in firsts if m is not None]
        return QueueStats(counts["ready"], counts["leased"], counts["delayed"], counts["dead"],
                          max(0.0, time.time() - min(enqueued)) if enqueued else None)

    async def _next(self, kind: str, seq: int, task_id: str = "*") -> Any | None:
        """The first message of stream ``kind`` at or after ``seq`` (for one task id), or None."""
        try:
            return await self._js.get_msg(self._streams[kind], seq=max(1, seq), next=True,
                                          subject=f"{self._subject}.{kind}.*.{task_id}")
        except nats.js.errors.NotFoundError:
            return None

    async def _scan(self, kind: str, limit: int) -> list[Any]:
        out, seq = [], 1
        while len(out) < limit and (msg := await self._next(kind, seq)) is not None:
            out.append(msg)
            seq = msg.seq + 1
        return out

    async def _info(self, msg: Any, kind: str, consumers: list[Any]) -> TaskInfo:
        *_, token, task_id = msg.subject.split(".")
        tag, headers, payload = "" if token == _UNTAGGED else token, msg.headers or {}, msg.data or b""
        base, error = int(headers.get("Lt-Attempts", "0")), headers.get("Lt-Error", "")
        if kind == "dead":
            return TaskInfo(task_id, TaskState.DEAD, payload, base, tag, _enqueued_at(msg), None, error,
                            headers.get("Lt-Reason", ""))
        if kind == "delay":
            return TaskInfo(task_id, TaskState.DELAYED, payload, base, tag, _enqueued_at(msg),
                            float(headers.get("Lt-Due", "0")), error, "")
        # a fence record exists from a task's first delivery until it is settled
        record = await self._fence_record(msg.seq)
        state = TaskState.LEASED if record else TaskState.READY
        attempt = base + int(record.get("dc", 0))
        return TaskInfo(task_id, state, payload, attempt, tag, _enqueued_at(msg), None, error, "")

    def list_tasks(self, state: TaskState | None = None, limit: int = 100) -> list[TaskInfo]:
        return self._run(self._list(state, limit))

    async def _list(self, state: TaskState | None, limit: int) -> list[TaskInfo]:
        consumers = (await self._counts())["consumers"]
        out: list[TaskInfo] = []
        for kind, states in (("tasks", (TaskState.READY, TaskState.LEASED)), ("delay", (TaskState.DELAYED,)),
                             ("dead", (TaskState.DEAD,))):
            if state is not None and state not in states:
                continue
            # READY and LEASED share a stream: scan it all, then keep the state asked for
            for msg in await self._scan(kind, limit if len(states) == 1 or state is None else 10**9):
                info = await self._info(msg, kind, consumers)
                if state is None or info.state == state:
                    out.append(info)
        out.sort(key=lambda i: i.enqueued_at)
        return out[:limit]

    def get(self, task_id: str) -> TaskInfo | None:
        return self._run(self._get(task_id))

    async def _get(self, task_id: str) -> TaskInfo | None:
        if not _ID.fullmatch(task_id):
            return None
        for kind in _KINDS:
            msg = await self._next(kind, 1, task_id)
            if msg is not None:
                consumers = (await self._counts())["consumers"] if kind == "tasks" else []
                return await self._info(msg, kind, consumers)
        return None

    def delete(self, task_ids: Sequence[str]) -> int:
        return self._run(self._delete([t for t in dict.fromkeys(task_ids) if _ID.fullmatch(t)]))

    async def _delete(self, task_ids: list[str]) -> int:
        count = 0
        for task_id in task_ids:
            for kind in _KINDS:
                msg = await self._next(kind, 1, task_id)
                if msg is not None and await self._delete_seq(self._streams[kind], msg.seq):
                    count += 1
                    if kind == "tasks":
                        await self._forget([msg.seq])
        return count

    def requeue_dead(self, task_ids: Sequence[str] | None = None) -> int:
        ids = None if task_ids is None else [t for t in dict.fromkeys(task_ids) if _ID.fullmatch(t)]
        return self._run(self._requeue(ids))

    async def _requeue(self, task_ids: list[str] | None) -> int:
        if task_ids is None:
            found = await self._scan("dead", 10**9)
        else:
            found = [m for m in await asyncio.gather(*(self._next("dead", 1, t) for t in task_ids)) if m]
        moved = 0
        for msg in found:
            # a fresh start: attempts and last error are not carried back
            await self._js.publish(self._subj("tasks", *msg.subject.split(".")[-2:]), msg.data or b"",
                                   headers={"Lt-Enq": (msg.headers or {}).get("Lt-Enq", "0")})
            moved += await self._delete_seq(self._streams["dead"], msg.seq)
        if moved:
            await self._nc.publish(f"{self._subject}.wake", b"")
        return moved

    def purge(self) -> int:
        return self._run(self._purge())

    async def _purge(self) -> int:
        self._keep.clear()
        infos = await asyncio.gather(*(self._js.stream_info(self._streams[k]) for k in _KINDS))
        await asyncio.gather(*(self._js.purge_stream(s) for s in self._streams.values()))
        return sum(info.state.messages for info in infos)


def _enqueued_at(msg: Any) -> float:
    value = (msg.headers or {}).get("Lt-Enq")
    if value:
        return float(value)
    return msg.time.timestamp() if msg.time else 0.0
