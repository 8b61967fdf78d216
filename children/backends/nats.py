"""NATS JetStream backend: ``nats://[user:password@]host:port[?timeout=SECS]`` (nats-py).

Layout for queue ``<name>`` (letters, digits, ``_`` and ``-``): four streams.

- ``LT_<name>_TASKS`` (work-queue retention, subjects ``leasetree.<name>.tasks.<tag>.<id>``, the tag
  token is ``_`` for untagged tasks): the ready and leased tasks. A message is one task; acking it
  deletes it. The task id is a uuid carried in the subject, so it survives the moves below.
- ``LT_<name>_DELAY``: tasks enqueued with a delay. ``lease()`` first moves the ones that fell due
  into the task stream (JetStream 2.9 has no scheduled messages).
- ``LT_<name>_DEAD`` (``leasetree.<name>.dead.<tag>.<id>``): dead letters, with the reason, the
  attempts and the last error in headers.
- ``LT_<name>_FENCE`` (``leasetree.<name>.fence.<seq>``, one message per subject): the current
  delivery count of every task delivered more than once; see fencing below.

One durable pull consumer with explicit acks leases the tasks: ``lt-all`` for ``tag=None``,
``lt-tag-<tag>`` (filter ``...tasks.<tag>.*``) for a tag. A work-queue stream refuses overlapping
consumers, so one queue is leased either with ``tag=None`` or by tags, never both: mixing them is a
one-line ``BackendConfigError``.

Lease time. A consumer has one AckWait: it is created with the ``lease_secs`` of the first lease, and
a later lease with another value updates it (which changes the timer of every outstanding delivery).
Keep ``[leaser] lease_secs`` equal on every host sharing a queue. ``extend()`` sends ``+WPI``, which
restarts the timer at AckWait whatever ``lease_secs`` it is given.

Receipts are the ``$JS.ACK...`` reply subjects; they carry the delivery count. The server accepts an
ack from an old delivery (nats-server#4786), so the backend fences: ``lease()`` writes the delivery
count of each redelivered task to the fence stream, and a settling call first asks the consumer how
many pending tasks were redelivered (one request per call); only if some were, it reads the fence
records, and a receipt whose count differs is LOST. The check and the settlement are two requests: a
redelivery that lands between them (milliseconds) is not fenced. Acks, naks and ``+WPI`` are sent as
requests, so the server has received them when the call returns.

Limitations: ``list_tasks`` cannot tell a leased task from one released with a delay or whose lease
expired (JetStream does not expose per-message state): both show as LEASED, and ``stats().leased``
counts them too. ``release(errors=...)`` keeps the error only until the next delivery.
``wait_for_work`` wakes on tasks enqueued through this backend (a wake-up subject), not on delays
falling due.
"""

from __future__ import annotations

import asyncio
import json
import re
import threading
import time
import uuid
from collections.abc import Coroutine, Sequence
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import parse_qs, urlsplit

import nats
import nats.errors
import nats.js.errors
from nats.js.api import AckPolicy, ConsumerConfig, RetentionPolicy, StorageType, StreamConfig

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

_T = TypeVar("_T")
_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")
_TAG = re.compile(r"[A-Za-z0-9_-]{1,64}")
_UNTAGGED = "_"
_DEAD_LINE = 1000  # header values are one line; long reasons are cut


def _one_line(text: str) -> str:
    return " ".join(text.split())[:_DEAD_LINE]


def _per_item(value: Any, count: int, what: str) -> list:
    if isinstance(value, (str, int, float)):
        return [value] * count
    items = list(value)
    if len(items) != count:
        raise ValueError(f"{what}: {len(items)} values for {count} receipts")
    return items


class _Receipt:
    """A parsed ``$JS.ACK.<stream>.<consumer>.<delivered>.<stream seq>.<consumer seq>.<ts>.<pending>``
    (or the v2 form with domain and account hash in front)."""

    __slots__ = ("text", "stream", "consumer", "delivered", "seq")

    def __init__(self, text: str) -> None:
        tokens = text.split(".")
        if len(tokens) >= 11 and tokens[:2] == ["$JS", "ACK"]:
            tokens = tokens[:2] + tokens[4:]  # drop domain and account hash
        if len(tokens) < 9 or tokens[:2] != ["$JS", "ACK"]:
            raise ValueError(text)
        self.text = text
        self.stream, self.consumer = tokens[2], tokens[3]
        self.delivered, self.seq = int(tokens[4]), int(tokens[5])


class NatsBackend(Backend):
    """A lease queue on JetStream; see the module docstring for the layout and the limitations."""

    name = "nats"

    def __init__(self, url: str, name: str = "default", base_dir: Path | None = None) -> None:
        parts = urlsplit(url)
        query = parse_qs(parts.query)
        unknown = sorted(set(query) - {"timeout"})
        if unknown:
            raise BackendConfigError(f"queue.url: unknown nats:// option {unknown[0]!r}; allowed: timeout")
        try:
            self._timeout = float(query.get("timeout", ["5"])[0])
        except ValueError:
            raise BackendConfigError("queue.url: nats:// timeout must be a number of seconds") from None
        if not _NAME.fullmatch(name):
            raise BackendConfigError(
                f"queue.name = {name!r}: a NATS queue name is 1-64 letters, digits, '_' or '-'")
        self._server = f"nats://{parts.netloc or '127.0.0.1:4222'}"
        self._name = name
        self._tasks, self._dead = f"LT_{name}_TASKS", f"LT_{name}_DEAD"
        self._delay, self._fence = f"LT_{name}_DELAY", f"LT_{name}_FENCE"
        self._subject = f"leasetree.{name}"
        self._consumers: dict[str, float] = {}  # consumer name -> its AckWait
        self._inboxes: dict[str, Any] = {}  # consumer name -> the subscription its pulls answer to
        self._wake: asyncio.Event | None = None
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name=f"nats-{name}", daemon=True)
        self._thread.start()
        self._closed = False
        self._nc: Any = None
        try:
            self._nc = self._run(nats.connect(
                servers=[self._server], connect_timeout=self._timeout, allow_reconnect=True,
                max_reconnect_attempts=-1, reconnect_time_wait=0.5,
                error_cb=self._quiet, disconnected_cb=self._quiet_event,
                reconnected_cb=self._quiet_event, closed_cb=self._quiet_event))
            self._js = self._nc.jetstream(timeout=self._timeout)
            self._run(self._ensure_streams())
            self._limits = Limits(max_lease_batch=1000, max_ack_batch=1000, max_extend_batch=1000,
                                  min_lease_secs=1.0, max_lease_secs=12 * 3600.0,
                                  max_payload_bytes=max(1024, self._nc.max_payload - 1024),
                                  blocking_lease=True)
        except BaseException:
            self.close()
            raise

    # -- the event loop thread -------------------------------------------------------------------
    async def _quiet(self, exc: Exception) -> None:
        pass  # nats-py reconnects by itself; a call made meanwhile raises BackendUnavailable

    async def _quiet_event(self) -> None:
        pass

    def _run(self, coro: Coroutine[Any, Any, _T], extra_secs: float = 0.0) -> _T:
        """Run ``coro`` on the loop thread; map nats-py's transient faults to BackendUnavailable."""
        if self._closed:
            coro.close()
            raise BackendUnavailable(f"{self._server}: backend is closed")
        future = asyncio.run_coroutine_threadsafe(coro, self._loop)
        try:
            return future.result(timeout=self._timeout * 4 + extra_secs)
        except (TimeoutError, nats.errors.TimeoutError) as exc:
            future.cancel()
            raise BackendUnavailable(f"{self._server}: no answer ({type(exc).__name__})") from None
        except (nats.errors.NoServersError, ConnectionError, OSError) as exc:
            raise BackendUnavailable(f"{self._server}: cannot connect ({exc or type(exc).__name__})") from None
        except (nats.js.errors.ServiceUnavailableError, nats.errors.Error) as exc:
            if isinstance(exc, nats.js.errors.APIError) and exc.code not in (None, 503):
                raise BackendConfigError(f"{self._server}: JetStream refused: {exc.description}") from None
            raise BackendUnavailable(f"{self._server}: {type(exc).__name__} {exc}".strip()) from None

    def close(self) -> None:
        if self._closed:
            return
        if self._nc is not None:
            try:
                asyncio.run_coroutine_threadsafe(self._nc.close(), self._loop).result(self._timeout)
            except Exception:  # noqa: BLE001 - closing a broken connection has nothing to report
                pass
        self._closed = True
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(self._timeout)
        if not self._thread.is_alive():
            self._loop.close()

    # -- streams and consumers -------------------------------------------------------------------
    async def _ensure_streams(self) -> None:
        s = self._subject
        specs = [
            StreamConfig(name=self._tasks, subjects=[f"{s}.tasks.*.*"],
                         retention=RetentionPolicy.WORK_QUEUE),
            StreamConfig(name=self._delay, subjects=[f"{s}.delay.*.*"],
                         retention=RetentionPolicy.WORK_QUEUE),
            StreamConfig(name=self._dead, subjects=[f"{s}.dead.*.*"]),
            # records of deliveries that were never settled (deleted tasks) age out after 2 days
            StreamConfig(name=self._fence, subjects=[f"{s}.fence.*"], max_msgs_per_subject=1,
                         max_age=2 * 86400.0),
        ]
        for spec in specs:
            spec.storage = StorageType.FILE
            try:
                await self._js.stream_info(spec.name)
            except nats.js.errors.NotFoundError:
                await self._js.add_stream(spec)

    def _consumer_for(self, tag: str | None) -> tuple[str, str | None]:
        if tag is None:
            return "lt-all", None
        if tag != "" and (not _TAG.fullmatch(tag) or tag == _UNTAGGED):
            raise ValueError(f"tag = {tag!r}: a NATS tag is 1-64 letters, digits, '_' or '-' (not '_')")
        token = tag or _UNTAGGED
        return f"lt-tag-{token}", f"{self._subject}.tasks.{token}.*"

    async def _ensure_consumer(self, name: str, subject: str | None, ack_wait: float) -> None:
        known = self._consumers.get(name)
        if known is None:
            try:
                info = await self._js.consumer_info(self._tasks, name)
                known = self._consumers[name] = float(info.config.ack_wait or 0)
            except nats.js.errors.NotFoundError:
                known = None
        if known is not None and abs(known - ack_wait) <= 0.01 * ack_wait:
            return
        config = ConsumerConfig(durable_name=name, ack_policy=AckPolicy.EXPLICIT, ack_wait=ack_wait,
                                max_deliver=-1, max_ack_pending=-1, filter_subject=subject)
        try:
            await self._js.add_consumer(self._tasks, config)
        except nats.js.errors.BadRequestError as exc:
            raise BackendConfigError(
                f"queue {self._name!r} on NATS: cannot lease with tag={None if subject is None else name[7:]!r} "
                f"while this queue is leased {'by tags' if subject is None else 'without a tag'} "
                f"({exc.description}); lease a queue either by tags or with none") from None
        self._consumers[name] = ack_wait

    # -- the data path ---------------------------------------------------------------------------
    @property
    def limits(self) -> Limits:
        return self._limits

    def lease(self, max_tasks: int, lease_secs: float, wait_secs: float = 0.0,
              tag: str | None = None) -> list[Leased]:
        max_tasks = min(max_tasks, self._limits.max_lease_batch)
        if max_tasks <= 0:
            return []
        lease_secs = min(max(lease_secs, self._limits.min_lease_secs), self._limits.max_lease_secs)
        consumer, subject = self._consumer_for(tag)
        return self._run(self._lease(consumer, subject, max_tasks, lease_secs, max(0.0, wait_secs)),
                         extra_secs=wait_secs)

    async def _lease(self, consumer: str, subject: str | None, n: int, lease_secs: float,
                     wait_secs: float) -> list[Leased]:
        await self._ensure_consumer(consumer, subject, lease_secs)
        deadline = time.monotonic() + wait_secs
        while True:
            await self._promote_due()
            msgs = await self._pull(consumer, n, 0.0)
            remaining = deadline - time.monotonic()
            if not msgs and remaining > 0.05:
                # a lingering pull for ONE message: a pull for n would stay open on the server after
                # we return and deliver later tasks to nobody (they would wait a whole AckWait)
                # delayed tasks wait in their own stream: while there are any, wait in 1 s slices
                # so that the next turn promotes those that fell due
                delayed = (await self._js.stream_info(self._delay)).state.messages
                msgs = await self._pull(consumer, 1, min(remaining, 1.0) if delayed else remaining)
                if msgs and n > 1:
                    msgs += await self._pull(consumer, n - 1, 0.0)
            if msgs or time.monotonic() >= deadline - 0.05:
                return await self._deliveries(msgs)

    async def _pull(self, consumer: str, n: int, wait_secs: float) -> list[Any]:
        sub = self._inboxes.get(consumer)
        if sub is None:
            sub = self._inboxes[consumer] = await self._nc.subscribe(self._nc.new_inbox())
        request: dict[str, Any] = {"batch": n}
        if wait_secs > 0:
            request["expires"] = int(wait_secs * 1e9)
        else:
            request["no_wait"] = True
        await self._nc.publish(f"$JS.API.CONSUMER.MSG.NEXT.{self._tasks}.{consumer}",
                               json.dumps(request).encode(), reply=sub.subject)
        out: list[Any] = []
        end = time.monotonic() + wait_secs + self._timeout
        while len(out) < n:
            msg = await sub.next_msg(timeout=max(0.001, end - time.monotonic()))
            status = msg.headers.get("Status") if msg.headers else None
            if status == "100":
                continue  # idle heartbeat
            if status is not None:
                if status in ("404", "408", "409"):
                    break  # no messages / request expired / consumer busy: this pull is over
                raise nats.js.errors.APIError(code=int(status), description=msg.headers.get("Description"))
            out.append(msg)
        return out

    async def _deliveries(self, msgs: list[Any]) -> list[Leased]:
        out: list[Leased] = []
        again = []
        for msg in msgs:
            receipt = _Receipt(msg.reply)
            *_, token, task_id = msg.subject.split(".")
            if receipt.delivered > 1:
                again.append(receipt)
            out.append(Leased(task_id, msg.reply, msg.data or b"", receipt.delivered,
                              "" if token == _UNTAGGED else token))
        # a redelivery records its count (the fence), carrying the last error a release left there
        records = await asyncio.gather(*(self._fence_record(r.seq) for r in again))
        await asyncio.gather(*(self._js.publish(
            f"{self._subject}.fence.{r.seq}", json.dumps({"dc": r.delivered, "err": old.get("err", "")}).encode())
            for r, old in zip(again, records, strict=True)))
        return out

    async def _promote_due(self) -> None:
        """Move delayed tasks whose time has come into the task stream; nak the others until then."""
        if "lt-delay" not in self._consumers:
            await self._js.add_consumer(self._delay, ConsumerConfig(
                durable_name="lt-delay", ack_policy=AckPolicy.EXPLICIT, ack_wait=30.0, max_deliver=-1,
                max_ack_pending=-1))
            self._consumers["lt-delay"] = 30.0
        sub = self._inboxes.get("lt-delay")
        if sub is None:
            sub = self._inboxes["lt-delay"] = await self._nc.subscribe(self._nc.new_inbox())
        await self._nc.publish(f"$JS.API.CONSUMER.MSG.NEXT.{self._delay}.lt-delay",
                               b'{"batch": 256, "no_wait": true}', reply=sub.subject)
        now, due, later = time.time(), [], []
        while True:
            msg = await sub.next_msg(timeout=self._timeout)
            if msg.headers and msg.headers.get("Status"):
                break
            wait = float(msg.headers.get("Lt-Due", "0")) - now
            (due if wait <= 0 else later).append((msg, wait))
        moves = []
        for msg, _ in due:
            *_, token, task_id = msg.subject.split(".")
            moves.append(self._js.publish(f"{self._subject}.tasks.{token}.{task_id}", msg.data,
                                          headers={"Lt-Enq": msg.headers.get("Lt-Enq", "0")}))
        await asyncio.gather(*moves)
        await asyncio.gather(*(self._nc.request(m.reply, b"+ACK", timeout=self._timeout) for m, _ in due))
        await asyncio.gather(*(self._nc.request(
            m.reply, b'-NAK {"delay": %d}' % int(w * 1e9), timeout=self._timeout) for m, w in later))

    async def _current(self, receipts: Sequence[str]) -> dict[str, _Receipt | None]:
        """Each receipt parsed if it is the task's current delivery, else None (stale or foreign)."""
        parsed: dict[str, _Receipt | None] = {}
        for text in receipts:
            try:
                r = _Receipt(text)
                parsed[text] = r if r.stream == self._tasks else None
            except ValueError:
                parsed[text] = None
        live = [r for r in parsed.values() if r is not None]
        consumers = {r.consumer for r in live}
        infos = await asyncio.gather(*(self._js.consumer_info(self._tasks, c) for c in consumers),
                                     return_exceptions=True)
        redelivered = {c for c, info in zip(consumers, infos, strict=True)
                       if isinstance(info, Exception) or info.num_redelivered}
        check = [r for r in live if r.delivered > 1 or r.consumer in redelivered]
        counts = await asyncio.gather(*(self._fence_count(r.seq) for r in check))
        for r, count in zip(check, counts, strict=True):
            if count != r.delivered:
                parsed[r.text] = None
        return parsed

    async def _fence_count(self, seq: int) -> int:
        record = await self._fence_record(seq)
        return int(record.get("dc", 1))

    async def _fence_record(self, seq: int) -> dict:
        try:
            raw = await self._js.get_msg(self._fence, subject=f"{self._subject}.fence.{seq}")
        except nats.js.errors.NotFoundError:
            return {}
        return json.loads(raw.data or b"{}")

    async def _stored(self, seq: int) -> Any | None:
        try:
            return await self._js.get_msg(self._tasks, seq=seq)
        except nats.js.errors.NotFoundError:
            return None

    async def _send(self, receipt: str, body: bytes) -> Outcome:
        try:
            await self._nc.request(receipt, body, timeout=self._timeout)
            return Outcome.OK
        except nats.errors.TimeoutError:
            return Outcome.RETRY

    async def _settle(self, receipts: Sequence[str], bodies: Sequence[bytes], must_exist: bool,
                      forget: bool) -> dict[str, Outcome]:
        current = await self._current(receipts)
        out = {text: Outcome.LOST for text in receipts}
        todo = [(text, r, body) for (text, r), body in zip(current.items(), bodies, strict=True)
                if r is not None]
        if must_exist:
            stored = await asyncio.gather(*(self._stored(r.seq) for _, r, _ in todo))
            todo = [item for item, msg in zip(todo, stored, strict=True) if msg is not None]
        results = await asyncio.gather(*(self._send(text, body) for text, _, body in todo))
        for (text, _, _), outcome in zip(todo, results, strict=True):
            out[text] = outcome
        if forget:
            await self._forget([r.seq for text, r, _ in todo if r.delivered > 1 and out[text] == Outcome.OK])
        return out

    async def _forget(self, seqs: Sequence[int]) -> None:
        await asyncio.gather(*(self._js.purge_stream(self._fence, subject=f"{self._subject}.fence.{seq}")
                               for seq in seqs))

    def extend(self, receipts: Sequence[str], lease_secs: float) -> dict[str, Outcome]:
        receipts = list(dict.fromkeys(receipts))
        return self._run(self._settle(receipts, [b"+WPI"] * len(receipts), True, False))

    def ack(self, receipts: Sequence[str]) -> dict[str, Outcome]:
        receipts = list(dict.fromkeys(receipts))
        return self._run(self._settle(receipts, [b"+ACK"] * len(receipts), False, True))

    def release(self, receipts: Sequence[str], delay_secs: float | Sequence[float] = 0.0,
                errors: Sequence[str] | None = None) -> dict[str, Outcome]:
        delays = _per_item(delay_secs, len(receipts), "release delay_secs")
        errs = _per_item(errors, len(receipts), "release errors") if errors is not None else None
        return self._run(self._release(list(receipts), delays, errs))

    async def _release(self, receipts: list[str], delays: list, errs: list | None) -> dict[str, Outcome]:
        bodies = [b'-NAK {"delay": %d}' % int(max(0.0, float(d)) * 1e9) if d else b"-NAK" for d in delays]
        if errs is not None:  # kept in the fence record until the next delivery overwrites it
            current = await self._current(receipts)
            await asyncio.gather(*(self._js.publish(
                f"{self._subject}.fence.{r.seq}", json.dumps({"dc": r.delivered, "err": e}).encode())
                for r, e in zip(current.values(), errs, strict=True) if r is not None and e))
        out = await self._settle(receipts, bodies, True, False)
        if any(o == Outcome.OK for o in out.values()):
            await self._nc.publish(f"{self._subject}.wake", b"")
        return out

    def dead_letter(self, receipts: Sequence[str], reason: str | Sequence[str]) -> dict[str, Outcome]:
        reasons = _per_item(reason, len(receipts), "dead_letter reason")
        return self._run(self._dead_letter(list(receipts), reasons))

    async def _dead_letter(self, receipts: list[str], reasons: list[str]) -> dict[str, Outcome]:
        current = await self._current(receipts)
        out = {text: Outcome.LOST for text in receipts}
        todo = [(t, r, why) for (t, r), why in zip(current.items(), reasons, strict=True) if r is not None]
        stored = await asyncio.gather(*(self._stored(r.seq) for _, r, _ in todo))
        records = await asyncio.gather(*(self._fence_record(r.seq) for _, r, _ in todo))
        copies = []
        for (text, r, why), msg, record in zip(todo, stored, records, strict=True):
            if msg is None:
                continue
            *_, token, task_id = msg.subject.split(".")
            headers = {"Lt-Enq": (msg.headers or {}).get("Lt-Enq", "0"), "Lt-Reason": _one_line(why),
                       "Lt-Attempt": str(r.delivered), "Lt-Error": _one_line(record.get("err", "")),
                       "Lt-Died": f"{time.time():.6f}",
                       # a retried call after a half-success must not make a second dead letter
                       "Nats-Msg-Id": f"{task_id}.{r.seq}.{r.delivered}"}
            copies.append((text, r, self._js.publish(f"{self._subject}.dead.{token}.{task_id}",
                                                     msg.data or b"", headers=headers)))
        await asyncio.gather(*(c for _, _, c in copies))
        results = await asyncio.gather(*(self._send(text, b"+TERM") for text, _, _ in copies))
        for (text, _, _), outcome in zip(copies, results, strict=True):
            out[text] = outcome
        # +TERM leaves the message in a work-queue stream: delete it so only the dead copy remains
        done = [r for text, r, _ in copies if out[text] == Outcome.OK]
        await asyncio.gather(*(self._delete_seq(self._tasks, r.seq) for r in done))
        await self._forget([r.seq for r in done])
        return out

    async def _delete_seq(self, stream: str, seq: int) -> bool:
        try:
            return await self._js.delete_msg(stream, seq)
        except nats.js.errors.APIError as exc:
            if exc.code == 404 or "no message found" in (exc.description or ""):
                return False  # 2.9 answers 500 "no message found" for a missing sequence
            raise

    def enqueue(self, payloads: Sequence[bytes], delay_secs: float = 0.0, tag: str = "") -> list[str]:
        self._consumer_for(tag or None)  # validates the tag
        cap = self._limits.max_payload_bytes
        for payload in payloads:
            if len(payload) > cap:
                raise ValueError(f"payload of {len(payload)} bytes is over the {cap}-byte limit of "
                                 f"{self._server} (the server's max_payload less headers)")
        ids = [uuid.uuid4().hex for _ in payloads]
        self._run(self._enqueue(list(payloads), ids, delay_secs, tag or _UNTAGGED))
        return ids

    async def _enqueue(self, payloads: list[bytes], ids: list[str], delay_secs: float, token: str) -> None:
        now = time.time()
        kind = "delay" if delay_secs > 0 else "tasks"
        headers = {"Lt-Enq": f"{now:.6f}"}
        if delay_secs > 0:
            headers["Lt-Due"] = f"{now + delay_secs:.6f}"
        await asyncio.gather(*(self._js.publish(f"{self._subject}.{kind}.{token}.{task_id}", payload,
                                                headers=headers)
                               for payload, task_id in zip(payloads, ids, strict=True)))
        if delay_secs <= 0:
            await self._nc.publish(f"{self._subject}.wake", b"")

    def wait_for_work(self, timeout_secs: float) -> bool:
        return self._run(self._wait_for_work(max(0.0, timeout_secs)), extra_secs=timeout_secs)

    async def _wait_for_work(self, timeout_secs: float) -> bool:
        if self._wake is None:
            wake = self._wake = asyncio.Event()

            async def on_wake(_msg: Any) -> None:
                wake.set()

            await self._nc.subscribe(f"{self._subject}.wake", cb=on_wake)
            await self._nc.flush(self._timeout)  # the server has the interest before we look
        self._wake.clear()
        if (await self._counts())["ready"] > 0:
            return True
        try:
            await asyncio.wait_for(self._wake.wait(), timeout_secs)
            return True
        except TimeoutError:
            return False

    # -- admin -----------------------------------------------------------------------------------
    async def _counts(self) -> dict[str, Any]:
        tasks, delay, dead = await asyncio.gather(*(self._js.stream_info(s)
                                                    for s in (self._tasks, self._delay, self._dead)))
        names = await self._consumer_names()
        infos = await asyncio.gather(*(self._js.consumer_info(self._tasks, c) for c in names))
        leased = sum(info.num_ack_pending or 0 for info in infos)
        return {"ready": max(0, tasks.state.messages - leased), "leased": leased,
                "delayed": delay.state.messages, "dead": dead.state.messages, "tasks": tasks, "delay": delay,
                "consumers": infos}

    async def _consumer_names(self) -> list[str]:
        resp = await self._js._api_request(f"$JS.API.CONSUMER.NAMES.{self._tasks}", b"",
                                           timeout=self._timeout)
        return list(resp.get("consumers") or [])

    def stats(self) -> QueueStats:
        return self._run(self._stats())

    async def _stats(self) -> QueueStats:
        counts = await self._counts()
        oldest: float | None = None
        for stream, info in ((self._tasks, counts["tasks"]), (self._delay, counts["delay"])):
            if info.state.messages:
                first = await self._next(stream, info.state.first_seq)
                if first is not None:
                    enq = _enqueued_at(first)
                    oldest = enq if oldest is None else min(oldest, enq)
        return QueueStats(counts["ready"], counts["leased"], counts["delayed"], counts["dead"],
                          None if oldest is None else max(0.0, time.time() - oldest))

    async def _next(self, stream: str, seq: int) -> Any | None:
        """The first message of ``stream`` at or after ``seq``, or None."""
        try:
            return await self._js.get_msg(stream, seq=max(1, seq), subject=f"{self._subject}.>", next=True)
        except nats.js.errors.NotFoundError:
            return None

    async def _scan(self, stream: str, limit: int) -> list[Any]:
        out, seq = [], 1
        while len(out) < limit:
            msg = await self._next(stream, seq)
            if msg is None:
                break
            out.append(msg)
            seq = msg.seq + 1
        return out

    async def _find(self, stream: str, kind: str, task_id: str) -> Any | None:
        try:
            return await self._js.get_msg(stream, seq=1, subject=f"{self._subject}.{kind}.*.{task_id}",
                                          next=True)
        except nats.js.errors.NotFoundError:
            return None

    async def _info(self, msg: Any, kind: str, consumers: list[Any]) -> TaskInfo:
        *_, token, task_id = msg.subject.split(".")
        tag = "" if token == _UNTAGGED else token
        headers = msg.headers or {}
        if kind == "dead":
            return TaskInfo(task_id, TaskState.DEAD, msg.data or b"", int(headers.get("Lt-Attempt", "0")), tag,
                            _enqueued_at(msg), None, headers.get("Lt-Error", ""), headers.get("Lt-Reason", ""))
        if kind == "delay":
            return TaskInfo(task_id, TaskState.DELAYED, msg.data or b"", 0, tag, _enqueued_at(msg),
                            float(headers.get("Lt-Due", "0")), "", "")
        delivered = 0
        for info in consumers:
            subject = info.config.filter_subject
            if subject is None or subject == f"{self._subject}.tasks.{token}.*":
                delivered = info.delivered.stream_seq if info.delivered else 0
        record = await self._fence_record(msg.seq)
        leased = msg.seq <= delivered
        attempt = int(record.get("dc", 1 if leased else 0))
        return TaskInfo(task_id, TaskState.LEASED if leased else TaskState.READY, msg.data or b"", attempt,
                        tag, _enqueued_at(msg), None, record.get("err", ""), "")

    def list_tasks(self, state: TaskState | None = None, limit: int = 100) -> list[TaskInfo]:
        return self._run(self._list(state, limit))

    async def _list(self, state: TaskState | None, limit: int) -> list[TaskInfo]:
        consumers = (await self._counts())["consumers"]
        out: list[TaskInfo] = []
        sources = [(self._tasks, "tasks", (TaskState.READY, TaskState.LEASED)),
                   (self._delay, "delay", (TaskState.DELAYED,)), (self._dead, "dead", (TaskState.DEAD,))]
        for stream, kind, states in sources:
            if state is not None and state not in states:
                continue
            scan_limit = limit if state in (None, TaskState.DELAYED, TaskState.DEAD) else 100_000
            for msg in await self._scan(stream, scan_limit):
                info = await self._info(msg, kind, consumers)
                if state is None or info.state == state:
                    out.append(info)
                if sum(1 for i in out if i.state in states) >= limit:
                    break
        out.sort(key=lambda i: i.enqueued_at)
        return out[:limit]

    def get(self, task_id: str) -> TaskInfo | None:
        return self._run(self._get(task_id))

    async def _get(self, task_id: str) -> TaskInfo | None:
        if not re.fullmatch(r"[0-9a-f]{32}", task_id):
            return None
        for stream, kind in ((self._tasks, "tasks"), (self._delay, "delay"), (self._dead, "dead")):
            msg = await self._find(stream, kind, task_id)
            if msg is not None:
                consumers = (await self._counts())["consumers"] if kind == "tasks" else []
                return await self._info(msg, kind, consumers)
        return None

    def delete(self, task_ids: Sequence[str]) -> int:
        return self._run(self._delete(list(dict.fromkeys(task_ids))))

    async def _delete(self, task_ids: list[str]) -> int:
        count = 0
        for task_id in task_ids:
            if not re.fullmatch(r"[0-9a-f]{32}", task_id):
                continue
            for stream, kind in ((self._tasks, "tasks"), (self._delay, "delay"), (self._dead, "dead")):
                msg = await self._find(stream, kind, task_id)
                if msg is not None and await self._delete_seq(stream, msg.seq):
                    count += 1
                    if kind == "tasks":
                        await self._forget([msg.seq])
        return count

    def requeue_dead(self, task_ids: Sequence[str] | None = None) -> int:
        return self._run(self._requeue(None if task_ids is None else list(dict.fromkeys(task_ids))))

    async def _requeue(self, task_ids: list[str] | None) -> int:
        if task_ids is None:
            found = await self._scan(self._dead, 10**9)
        else:
            found = [m for m in await asyncio.gather(*(self._find(self._dead, "dead", t) for t in task_ids
                                                       if re.fullmatch(r"[0-9a-f]{32}", t))) if m]
        moved = 0
        for msg in found:
            *_, token, task_id = msg.subject.split(".")
            await self._js.publish(f"{self._subject}.tasks.{token}.{task_id}", msg.data or b"",
                                   headers={"Lt-Enq": (msg.headers or {}).get("Lt-Enq", "0")})
            if await self._delete_seq(self._dead, msg.seq):
                moved += 1
        if moved:
            await self._nc.publish(f"{self._subject}.wake", b"")
        return moved

    def purge(self) -> int:
        return self._run(self._purge())

    async def _purge(self) -> int:
        streams = (self._tasks, self._delay, self._dead)
        infos = await asyncio.gather(*(self._js.stream_info(s) for s in streams))
        await asyncio.gather(*(self._js.purge_stream(s) for s in (*streams, self._fence)))
        return sum(info.state.messages for info in infos)


def _enqueued_at(msg: Any) -> float:
    value = (msg.headers or {}).get("Lt-Enq")
    if value:
        return float(value)
    return msg.time.timestamp() if msg.time else 0.0
