"""NATS JetStream backend: ``nats://[user:password@]host:port[?timeout=SECS]`` (nats-py).

Layout for queue ``<name>`` (letters, digits, ``_`` and ``-``): four streams.

- ``LT_<name>_TASKS`` (work-queue retention, subjects ``leasetree.<name>.tasks.<tag>.<id>``, the tag
  token is ``_`` for untagged tasks): ready and leased tasks, one message each; acking deletes it.
  The task id is a uuid carried in the subject, so it survives the moves below.
- ``LT_<name>_DELAY``: tasks enqueued with a delay, and tasks released with a delay (moved here, so
  they show as DELAYED with their last error). ``lease()`` first moves those that fell due back to
  the task stream (JetStream 2.9 has no scheduled messages). A moved task carries its earlier
  deliveries in a header: attempt = that base + the consumer's ``num_delivered``.
- ``LT_<name>_DEAD`` (``leasetree.<name>.dead.<tag>.<id>``): dead letters, reason, attempts and
  last error in headers.
- ``LT_<name>_FENCE`` (``leasetree.<name>.fence.<seq>``, one message per subject): each leased
  task's current delivery and delivery count, from its first delivery until it is settled.

One durable pull consumer with explicit acks leases the tasks: ``lt-all`` for ``tag=None``,
``lt-tag-<tag>`` (filter ``...tasks.<tag>.*``) for a tag. A work-queue stream refuses overlapping
consumers, so one queue is leased either with ``tag=None`` or by tags, never both: mixing them is a
one-line ``BackendConfigError``.

Lease time. A consumer has one AckWait: the ``lease_secs`` of the first lease on the queue. A longer
lease (or extension) is kept alive by this handle's event-loop thread, which sends ``+WPI`` every
AckWait/2 until the lease ends; if the process dies the task is back after at most AckWait. A
shorter lease lasts AckWait. Give every host of a queue the same ``[leaser] lease_secs``.

Receipts are the ``$JS.ACK...`` reply subjects; they carry the consumer sequence of the delivery.
The server accepts an ack from an old delivery (nats-server#4786), so the backend fences: ``lease()``
writes each task's current delivery (and its count) to the fence stream before returning it, and
every settling call first reads the records of its receipts (pipelined direct gets): a receipt that
is not the current delivery is LOST, as is one whose task was settled or deleted (its record is
gone). Check and settlement are separate requests: a redelivery landing between them (milliseconds)
is not fenced. Acks, naks and ``+WPI`` are sent as requests, so the server has them on return.

Limitations: a leased task and one whose lease expired both show as LEASED (JetStream keeps no
per-message state we can read). ``wait_for_work`` wakes on tasks enqueued or released through this
backend (a wake-up subject), not on delays falling due.
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
    per_item,
)
from children.backends.nats_admin import _KINDS, _UNTAGGED, NatsAdmin

_T = TypeVar("_T")
_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")


def _one_line(text: str) -> str:
    return " ".join(str(text).split())[:1000]  # a header value is one line




def _not_found(exc: Exception) -> bool:
    # 2.9 answers a missing sequence with 404, or 400/500 "no message found" / "sequence N not found"
    return isinstance(exc, nats.js.errors.NotFoundError) or isinstance(exc, nats.js.errors.APIError) and (
        exc.code == 404 or "not found" in (exc.description or "") or "no message" in (exc.description or ""))


class _Receipt:
    """A parsed ``$JS.ACK.<stream>.<consumer>.<delivered>.<stream seq>.<consumer seq>.<ts>.<pending>``
    (or the v2 form with domain and account hash in front)."""

    __slots__ = ("text", "stream", "consumer", "delivered", "seq", "delivery", "count")

    def __init__(self, text: str) -> None:
        tokens = text.split(".")
        if len(tokens) >= 11 and tokens[:2] == ["$JS", "ACK"]:
            tokens = tokens[:2] + tokens[4:]  # drop domain and account hash
        if len(tokens) < 9 or tokens[:2] != ["$JS", "ACK"]:
            raise ValueError(text)
        self.text, self.stream, self.consumer = text, tokens[2], tokens[3]
        # delivered counts this task's deliveries; delivery (the consumer sequence) names this one
        self.delivered, self.seq, self.delivery = int(tokens[4]), int(tokens[5]), int(tokens[6])
        self.count = self.delivered  # the delivery count as the fence record has it (see _deliveries)


class NatsBackend(NatsAdmin, Backend):
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
        self._name, self._subject = name, f"leasetree.{name}"
        self._streams = {kind: f"LT_{name}_{kind.upper()}" for kind in (*_KINDS, "fence")}
        self._ack_waits: dict[str, float] = {}  # consumer -> its AckWait
        self._keep: dict[str, tuple[_Receipt, float]] = {}  # receipt -> (parsed, lease end, monotonic)
        self._keeper: asyncio.Task | None = None
        self._wake: asyncio.Event | None = None
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name=f"nats-{name}", daemon=True)
        self._thread.start()
        self._closed, self._nc = False, None
        try:
            self._nc = self._run(nats.connect(
                servers=[self._server], connect_timeout=self._timeout, allow_reconnect=True,
                max_reconnect_attempts=-1, reconnect_time_wait=0.5, error_cb=self._quiet,
                disconnected_cb=self._quiet, reconnected_cb=self._quiet, closed_cb=self._quiet))
            self._js = self._nc.jetstream(timeout=self._timeout)
            self._run(self._ensure_streams())
            self._limits = Limits(max_lease_batch=1000, max_ack_batch=1000, max_extend_batch=1000,
                                  min_lease_secs=1.0, max_lease_secs=12 * 3600.0,
                                  max_payload_bytes=max(1024, self._nc.max_payload - 1024))
        except BaseException:
            self.close()
            raise

    # -- the event loop thread -------------------------------------------------------------------
    async def _quiet(self, *_: Any) -> None:
        pass  # nats-py reconnects by itself; a call made meanwhile raises BackendUnavailable

    def _run(self, coro: Coroutine[Any, Any, _T], extra_secs: float = 0.0) -> _T:
        """Run ``coro`` on the loop thread; map nats-py's faults to BackendUnavailable (transient)
        or BackendConfigError (JetStream refused the request)."""
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
            why = exc or type(exc).__name__
            raise BackendUnavailable(f"{self._server}: cannot connect ({why})") from None
        except (nats.js.errors.ServiceUnavailableError, nats.errors.Error) as exc:
            if isinstance(exc, nats.js.errors.APIError) and exc.code not in (None, 503):
                raise BackendConfigError(f"{self._server}: JetStream refused: {exc.description}") from None
            raise BackendUnavailable(f"{self._server}: {type(exc).__name__} {exc}".strip()) from None

    def close(self) -> None:
        if self._closed:
            return
        if self._keeper is not None:
            self._loop.call_soon_threadsafe(self._keeper.cancel)
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
    def _subj(self, kind: str, token: str, task_id: str) -> str:
        return f"{self._subject}.{kind}.{token}.{task_id}"

    async def _ensure_streams(self) -> None:
        s = self._subject
        work = {"retention": RetentionPolicy.WORK_QUEUE}
        specs = [StreamConfig(name=self._streams["tasks"], subjects=[f"{s}.tasks.*.*"], allow_direct=True,
                              **work),
                 StreamConfig(name=self._streams["delay"], subjects=[f"{s}.delay.*.*"], **work),
                 StreamConfig(name=self._streams["dead"], subjects=[f"{s}.dead.*.*"]),
                 # records of tasks deleted while leased are never purged: they age out
                 StreamConfig(name=self._streams["fence"], subjects=[f"{s}.fence.*"], max_msgs_per_subject=1,
                              max_age=2 * 86400.0, allow_direct=True)]
        for spec in specs:
            spec.storage = StorageType.FILE
            try:
                await self._js.stream_info(spec.name)
            except nats.js.errors.NotFoundError:
                await self._js.add_stream(spec)

    def _consumer_for(self, tag: str | None) -> tuple[str, str | None]:
        if tag is None:
            return "lt-all", None
        if tag != "" and (not _NAME.fullmatch(tag) or tag == _UNTAGGED):
            raise ValueError(f"tag = {tag!r}: a NATS tag is 1-64 letters, digits, '_' or '-' (not '_')")
        token = tag or _UNTAGGED
        return f"lt-tag-{token}", f"{self._subject}.tasks.{token}.*"

    async def _ack_wait(self, consumer: str, create_with: float | None = None,
                        subject: str | None = None) -> float:
        """The consumer's AckWait; with ``create_with`` the consumer is created if missing."""
        if consumer in self._ack_waits:
            return self._ack_waits[consumer]
        stream = self._streams["delay" if consumer == "lt-delay" else "tasks"]
        try:
            info = await self._js.consumer_info(stream, consumer)
            self._ack_waits[consumer] = float(info.config.ack_wait or 30.0)
        except nats.js.errors.NotFoundError:
            if create_with is None:
                return 30.0
            config = ConsumerConfig(durable_name=consumer, ack_policy=AckPolicy.EXPLICIT,
                                    ack_wait=create_with,
                                    max_deliver=-1, max_ack_pending=-1, filter_subject=subject)
            try:
                await self._js.add_consumer(stream, config)
            except nats.js.errors.BadRequestError as exc:
                how = ("without a tag", "by tags") if subject is None else ("by tag", "without one")
                raise BackendConfigError(
                    f"queue {self._name!r} on NATS cannot be leased {how[0]} while it is leased {how[1]} "
                    f"({exc.description}); lease a queue either by tags or with none") from None
            self._ack_waits[consumer] = create_with
        return self._ack_waits[consumer]

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
        ack_wait = await self._ack_wait(consumer, lease_secs, subject)
        deadline = time.monotonic() + wait_secs
        while True:
            await self._promote_due()
            msgs = await self._pull(self._streams["tasks"], consumer, n, 0.0)
            remaining = deadline - time.monotonic()
            if not msgs and remaining > 0.05:
                # A lingering pull asks for ONE message (one for n would stay open after we return and
                # deliver later tasks to nobody) and lasts at most 1 s: the next turn promotes delayed
                # tasks that fell due, and nats-server 2.9 may leave a waiting pull unanswered when a
                # lease expires (seen here), which a fresh no_wait pull does see.
                msgs = await self._pull(self._streams["tasks"], consumer, 1, min(remaining, 1.0))
                if msgs and n > 1:
                    msgs += await self._pull(self._streams["tasks"], consumer, n - 1, 0.0)
            if msgs or time.monotonic() >= deadline - 0.05:
                leased = await self._deliveries(msgs)
                if lease_secs > ack_wait * 1.05:
                    self._keep_alive([_Receipt(t.receipt) for t in leased], lease_secs)
                return leased

    async def _pull(self, stream: str, consumer: str, n: int, wait_secs: float) -> list[Any]:
        """One pull request for up to ``n`` messages: ``no_wait`` when ``wait_secs`` is 0, else one
        that the server holds that long. Each request has an inbox of its own, dropped afterwards, so a
        late answer to an old request (a trailing status, or a delivery) can never be mistaken for an
        answer to this one; a delivery that lands in a dropped inbox comes back after its AckWait."""
        sub = await self._nc.subscribe(self._nc.new_inbox())
        try:
            return await self._read_pull(sub, stream, consumer, n, wait_secs)
        finally:
            await sub.unsubscribe()

    async def _read_pull(self, sub: Any, stream: str, consumer: str, n: int, wait_secs: float) -> list[Any]:
        request: dict[str, Any] = {"batch": n}
        if wait_secs > 0:
            request["expires"] = int(wait_secs * 1e9)
        else:
            request["no_wait"] = True
        await self._nc.publish(f"$JS.API.CONSUMER.MSG.NEXT.{stream}.{consumer}", json.dumps(request).encode(),
                               reply=sub.subject)
        out: list[Any] = []
        end = time.monotonic() + (wait_secs + 0.5 if wait_secs > 0 else self._timeout)
        while len(out) < n:
            try:
                msg = await sub.next_msg(timeout=max(0.001, end - time.monotonic()))
            except nats.errors.TimeoutError:
                if wait_secs > 0:
                    break  # the server let a waiting pull lapse without its 408: nothing came
                raise
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
        # nats-server 2.9 can hand one pull the same message twice, two deliveries a few ms apart
        # (seen here after a waiting pull lapsed as the lease expired): keep each task's newest
        # delivery, the one the fence below will name, so a lease never holds a task twice
        newest: dict[int, tuple[_Receipt, Any]] = {}
        for msg in msgs:
            r = _Receipt(msg.reply)
            if r.seq not in newest or r.delivery > newest[r.seq][0].delivery:
                newest[r.seq] = (r, msg)
        receipts = [r for r, _ in newest.values()]
        msgs = [msg for _, msg in newest.values()]
        # A fence record exists from a task's first delivery until it is settled, so one here means a
        # redelivery: count it from the record, as nats-server 2.9 can redeliver with num_delivered
        # unchanged (seen when a waiting pull lapses as the lease expires).
        previous = await asyncio.gather(*(self._fence_record(r.seq) for r in receipts))
        counts = [max(r.delivered, int(old.get("dc", 0)) + 1) if old.get("d", r.delivery) != r.delivery
                  else r.delivered for r, old in zip(receipts, previous, strict=True)]
        # the fence: each task's current delivery, written before anyone holds its receipt
        await asyncio.gather(*(self._js.publish(f"{self._subject}.fence.{r.seq}", json.dumps(
            {"d": r.delivery, "dc": dc}).encode()) for r, dc in zip(receipts, counts, strict=True)))
        out: list[Leased] = []
        for msg, dc in zip(msgs, counts, strict=True):
            *_, token, task_id = msg.subject.split(".")
            base = int((msg.headers or {}).get("Lt-Attempts", "0"))
            tag = "" if token == _UNTAGGED else token
            out.append(Leased(task_id, msg.reply, msg.data or b"", base + dc, tag))
        return out

    async def _promote_due(self) -> None:
        """Move delayed tasks whose time has come into the task stream; nak the others until then."""
        await self._ack_wait("lt-delay", 30.0)
        now, due, later = time.time(), [], []
        for msg in await self._pull(self._streams["delay"], "lt-delay", 256, 0.0):
            wait = float(msg.headers.get("Lt-Due", "0")) - now
            (due if wait <= 0 else later).append((msg, wait))
        keep = ("Lt-Enq", "Lt-Attempts", "Lt-Error")
        # the message id makes a promotion repeated after a lost +ACK a no-op (2-minute window)
        await asyncio.gather(*(self._js.publish(
            self._subj("tasks", *m.subject.split(".")[-2:]), m.data or b"",
            headers={**{k: v for k, v in m.headers.items() if k in keep},
                     "Nats-Msg-Id": f"promote.{_Receipt(m.reply).seq}.{self._name}"}) for m, _ in due))
        await asyncio.gather(*(self._nc.request(m.reply, b"+ACK", timeout=self._timeout) for m, _ in due),
                             *(self._nc.request(m.reply, b'-NAK {"delay": %d}' % int(w * 1e9),
                                                timeout=self._timeout) for m, w in later))

    def _keep_alive(self, receipts: list[_Receipt], lease_secs: float) -> None:
        end = time.monotonic() + lease_secs
        for r in receipts:
            self._keep[r.text] = (r, end)
        if self._keeper is None or self._keeper.done():
            self._keeper = self._loop.create_task(self._keeper_loop())

    async def _keeper_loop(self) -> None:
        """Send +WPI every AckWait/2 for leases longer than AckWait, until each one ends."""
        while self._keep:
            waits = [await self._ack_wait(c) for c in {r.consumer for r, _ in self._keep.values()}]
            await asyncio.sleep(max(0.1, min(waits) / 2))
            now = time.monotonic()
            for text in [t for t, (_, end) in self._keep.items() if end <= now]:
                del self._keep[text]
            try:
                current = await self._current(list(self._keep))
                for text in [t for t, r in current.items() if r is None]:
                    self._keep.pop(text, None)
                await asyncio.gather(*(self._nc.request(t, b"+WPI", timeout=self._timeout)
                                       for t, r in current.items() if r is not None))
            except (nats.errors.Error, TimeoutError):
                pass  # disconnected: the next turn tries again; past AckWait the server redelivers

    async def _current(self, receipts: Sequence[str]) -> dict[str, _Receipt | None]:
        """Each receipt parsed if it is its task's current delivery (the fence record names it),
        else None: stale, settled, deleted or foreign."""
        parsed: dict[str, _Receipt | None] = {}
        for text in receipts:
            try:
                r = _Receipt(text)
                parsed[text] = r if r.stream == self._streams["tasks"] else None
            except ValueError:
                parsed[text] = None
        live = [r for r in parsed.values() if r is not None]
        records = await asyncio.gather(*(self._fence_record(r.seq) for r in live))
        for r, record in zip(live, records, strict=True):
            if record.get("d") != r.delivery:
                parsed[r.text] = None
            r.count = int(record.get("dc", r.delivered))
        return parsed

    async def _fence_record(self, seq: int) -> dict:
        try:
            raw = await self._js.get_msg(self._streams["fence"], subject=f"{self._subject}.fence.{seq}",
                                         direct=True)
        except nats.js.errors.APIError as exc:
            if _not_found(exc):
                return {}
            raise
        return json.loads(raw.data or b"{}")

    async def _stored(self, seq: int) -> Any | None:
        try:
            return await self._js.get_msg(self._streams["tasks"], seq=seq, direct=True)
        except nats.js.errors.APIError as exc:
            if _not_found(exc):
                return None
            raise

    async def _send(self, receipt: str, body: bytes) -> Outcome:
        try:
            await self._nc.request(receipt, body, timeout=self._timeout)
            return Outcome.OK
        except nats.errors.TimeoutError:
            return Outcome.RETRY

    async def _settle(self, receipts: Sequence[str], body: bytes) -> dict[str, Outcome]:
        out = {text: Outcome.LOST for text in receipts}
        live = [t for t, r in (await self._current(list(out))).items() if r is not None]
        sent = await asyncio.gather(*(self._send(t, body) for t in live))
        for text, outcome in zip(live, sent, strict=True):
            out[text] = outcome
        return out

    async def _forget(self, seqs: Sequence[int]) -> None:
        fence = self._streams["fence"]
        await asyncio.gather(*(self._js.purge_stream(fence, subject=f"{self._subject}.fence.{seq}")
                               for seq in seqs))

    def extend(self, receipts: Sequence[str], lease_secs: float) -> dict[str, Outcome]:
        return self._run(self._extend(list(dict.fromkeys(receipts)), lease_secs))

    async def _extend(self, receipts: list[str], lease_secs: float) -> dict[str, Outcome]:
        out = await self._settle(receipts, b"+WPI")
        self._keep_alive([_Receipt(t) for t, o in out.items() if o == Outcome.OK], lease_secs)
        return out

    def ack(self, receipts: Sequence[str]) -> dict[str, Outcome]:
        return self._run(self._ack(list(dict.fromkeys(receipts))))

    async def _ack(self, receipts: list[str]) -> dict[str, Outcome]:
        out = await self._settle(receipts, b"+ACK")
        for text in receipts:
            self._keep.pop(text, None)
        await self._forget([_Receipt(t).seq for t, o in out.items() if o == Outcome.OK])
        return out

    def release(self, receipts: Sequence[str], delay_secs: float | Sequence[float] = 0.0,
                errors: Sequence[str] | None = None, count_attempt: bool = True) -> dict[str, Outcome]:
        # count_attempt is ignored: JetStream counts deliveries itself and cannot take a delivery back
        delays = per_item(delay_secs, len(receipts), "release delay_secs")
        errs = per_item("" if errors is None else errors, len(receipts), "release errors")
        return self._run(self._release(list(receipts), [float(d) for d in delays], errs))

    async def _release(self, receipts: list[str], delays: list[float], errs: list[str]) -> dict[str, Outcome]:
        for text in receipts:
            self._keep.pop(text, None)
        # released now without an error: a plain nak keeps the message. Otherwise it moves to the
        # delay stream (due now or later), where it is DELAYED and carries its error.
        nak = [t for t, d, e in zip(receipts, delays, errs, strict=True) if d <= 0 and not e]
        out = await self._settle(nak, b"-NAK")
        due = time.time()
        moved = [(t, d, e) for t, d, e in zip(receipts, delays, errs, strict=True) if d > 0 or e]
        out.update(await self._move([t for t, _, _ in moved], "delay", [
            {"Lt-Due": f"{due + max(0.0, d):.6f}", **({"Lt-Error": _one_line(e)} if e else {})}
            for _, d, e in moved]))
        if Outcome.OK in out.values():
            await self._nc.publish(f"{self._subject}.wake", b"")
        return out

    def dead_letter(self, receipts: Sequence[str], reason: str | Sequence[str]) -> dict[str, Outcome]:
        reasons = per_item(reason, len(receipts), "dead_letter reason")
        died = f"{time.time():.6f}"
        return self._run(self._move(list(receipts), "dead", [
            {"Lt-Reason": _one_line(why), "Lt-Died": died} for why in reasons]))

    async def _move(self, receipts: list[str], kind: str, extra: list[dict[str, str]]) -> dict[str, Outcome]:
        """Copy each live delivery's task to the ``kind`` stream with its attempts, last error and
        ``extra`` headers, then +TERM the delivery and drop the original."""
        out = {text: Outcome.LOST for text in receipts}
        headers_of = dict(zip(receipts, extra, strict=True))
        current = [r for r in (await self._current(receipts)).values() if r is not None]
        stored = await asyncio.gather(*(self._stored(r.seq) for r in current))
        copies = []
        for r, msg in zip(current, stored, strict=True):
            if msg is None:
                continue
            old = msg.headers or {}
            *_, token, task_id = msg.subject.split(".")
            headers = {"Lt-Enq": old.get("Lt-Enq", "0"),
                       "Lt-Attempts": str(int(old.get("Lt-Attempts", "0")) + r.count),
                       "Lt-Error": old.get("Lt-Error", ""),
                       # a retried call after a half-success must not make a second copy
                       "Nats-Msg-Id": f"{kind}.{task_id}.{r.seq}.{r.delivery}", **headers_of[r.text]}
            copies.append((r.text, r, self._js.publish(self._subj(kind, token, task_id), msg.data or b"",
                                                       headers={k: v for k, v in headers.items() if v})))
        await asyncio.gather(*(c for _, _, c in copies))
        results = await asyncio.gather(*(self._send(text, b"+TERM") for text, _, _ in copies))
        for (text, _, _), outcome in zip(copies, results, strict=True):
            out[text] = outcome
        # +TERM removes the message from a work-queue stream on some versions only: make sure
        done = [r for text, r, _ in copies if out[text] == Outcome.OK]
        await asyncio.gather(*(self._delete_seq(self._streams["tasks"], r.seq) for r in done))
        await self._forget([r.seq for r in done])
        return out

    async def _delete_seq(self, stream: str, seq: int) -> bool:
        try:
            return await self._js.delete_msg(stream, seq)
        except nats.js.errors.APIError as exc:
            if _not_found(exc):
                return False
            raise

    def enqueue(self, payloads: Sequence[bytes], delay_secs: float = 0.0, tag: str = "") -> list[str]:
        self._consumer_for(tag or None)  # validates the tag
        cap = self._limits.max_payload_bytes
        for payload in payloads:
            if len(payload) > cap:
                raise ValueError(f"payload of {len(payload)} bytes is over the {cap}-byte limit of "
                                 f"{self._server} (the server's max_payload less headers)")
        ids = [uuid.uuid4().hex for _ in payloads]
        if ids:
            self._run(self._enqueue(list(payloads), ids, delay_secs, tag or _UNTAGGED))
        return ids

    async def _enqueue(self, payloads: list[bytes], ids: list[str], delay_secs: float, token: str) -> None:
        now = time.time()
        kind = "delay" if delay_secs > 0 else "tasks"
        due = {"Lt-Due": f"{now + delay_secs:.6f}"} if delay_secs > 0 else {}
        # a microsecond apart, so that "oldest first" keeps the order of one batch
        await asyncio.gather(*(self._js.publish(self._subj(kind, token, task_id), payload,
                                                headers={"Lt-Enq": f"{now + i * 1e-6:.6f}", **due})
                               for i, (payload, task_id) in enumerate(zip(payloads, ids, strict=True))))
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
            await self._nc.flush(self._timeout)  # the server has our interest before we look
        self._wake.clear()
        if (await self._counts())["ready"] > 0:
            return True
        try:
            await asyncio.wait_for(self._wake.wait(), timeout_secs)
            return True
        except TimeoutError:
            return False
