"""Amazon SQS backend (boto3): ``sqs://[ACCESS_KEY:SECRET_KEY@]?region=REGION[&endpoint_url=URL]``.

The queue is ``[queue] name`` (1-75 letters, digits, ``_`` or ``-``); its dead letters go to
``<name>-dead``. Both are created when missing. Credentials come from the URL when it has them, else
from boto3's usual chain (environment, ``~/.aws``, instance role); the region from ``region=``, else
from that chain. ``endpoint_url=`` points at a local SQS (moto, ElasticMQ, LocalStack).

Mapping: lease = ReceiveMessage (at most 10, VisibilityTimeout = the lease rounded up to whole
seconds, long polling up to 20 s per request); extend = ChangeMessageVisibilityBatch; ack =
DeleteMessageBatch; release now without an error = ChangeMessageVisibilityBatch(0); release with a
delay or an error = SendMessageBatch of a copy (DelaySeconds = the delay, at most 900 s, so SQS counts
it as delayed; attempts and error as attributes) then DeleteMessageBatch; dead_letter = the same copy
to ``<name>-dead`` with the reason. Every batch is checked entry by entry: an invalid or expired
receipt handle is LOST, a server-side fault is RETRY. The attempt is ``ApproximateReceiveCount`` plus
the deliveries before the last copy (attribute ``lt-attempts``). The payload travels base64 in the
body; the task id, tag and enqueue time are attributes, so a released or requeued task keeps its id.

Receipts are JSON ``[receipt handle, task id, tag, enqueued at, attempt, last error, body]``: SQS
cannot read a message by its receipt handle, so the receipt carries what a copy needs. A receipt is
as large as the task's payload. A receipt this handle settled is LOST when settled again (SQS itself
accepts a delete twice).

Limitations (SQS has no API for them):
- a stale receipt is not fenced: SQS keeps old receipt handles usable (moto honours them; on AWS a
  delete with an old handle "succeeds but the message might not be deleted"). Use a lease long enough
  and let the leaser extend it.
- a standard queue delivers at least once: now and then two receives get the same message (moto's
  threaded server does it under racing receives too). The leaser skips a task already running on its
  host; across hosts a duplicate run is possible, as after any crash.
- no filtering by tag: ``lease(tag=None)`` returns every task, any tag (even ``""``) is a
  BackendConfigError; tags are kept and reported, but use one queue name per tag to lease by tag.
- ``list_tasks``, ``get`` and ``delete`` see dead tasks only (reading a live message would lease it);
  ``stats()`` counts are SQS's approximate ones and ``oldest_age_secs`` is None.
- enqueue delays are at most 900 s (DelaySeconds; a longer one is a ValueError), release delays are
  capped at 900 s. ``wait_for_work`` polls the approximate count once a second.
- ``purge`` is PurgeQueue, which AWS allows once per 60 s per queue: within that minute it deletes
  the visible messages one batch at a time instead (leased ones stay). Its count is approximate.
"""

from __future__ import annotations

import base64
import json
import math
import re
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import boto3
import botocore.config
import botocore.exceptions

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
    per_item,
)

_NAME = re.compile(r"[A-Za-z0-9_-]{1,75}")
_BATCH = 10
_MAX_DELAY = 900  # SendMessage DelaySeconds
_MAX_WAIT = 20  # ReceiveMessage WaitTimeSeconds
_MESSAGE_BYTES = 256 * 1024
_SETTLED_MEMORY = 100_000  # receipt handles this instance settled, to answer LOST when asked again
# base64 turns 3 bytes into 4; 4 KiB is kept for the message attributes
_MAX_PAYLOAD = (_MESSAGE_BYTES - 4096) // 4 * 3
# entry errors that mean the delivery is gone, not that SQS had a bad moment
_GONE = {"ReceiptHandleIsInvalid", "MessageNotInflight", "InvalidParameterValue",
         "AWS.SimpleQueueService.MessageNotInflight"}
_UNAVAILABLE = {"Throttling", "ThrottlingException", "RequestThrottled", "ServiceUnavailable",
                "InternalError", "InternalFailure", "KmsThrottled", "PurgeQueueInProgress",
                "AWS.SimpleQueueService.PurgeQueueInProgress", "RequestTimeout"}




def _one_line(text: str) -> str:
    return " ".join(str(text).split())[:1000]


def _chunks(items: Sequence[Any], size: int = _BATCH) -> list[Sequence[Any]]:
    return [items[i:i + size] for i in range(0, len(items), size)]


def _attr(message: dict, name: str, default: str = "") -> str:
    return message.get("MessageAttributes", {}).get(name, {}).get("StringValue", default)


def _attrs(**values: str) -> dict[str, dict[str, str]]:
    # SQS refuses empty string attributes: an absent one reads back as ""
    return {k.replace("_", "-"): {"DataType": "String", "StringValue": v} for k, v in values.items() if v}


class SqsBackend(Backend):
    """A lease queue on SQS; see the module docstring for the URL form and the limitations."""

    name = "sqs"

    def __init__(self, url: str, name: str = "default", base_dir: Path | None = None) -> None:
        parts = urlsplit(url)
        query = {k: v[-1] for k, v in parse_qs(parts.query).items()}
        unknown = sorted(set(query) - {"region", "endpoint_url"})
        if unknown:
            raise BackendConfigError(
                f"queue.url: unknown sqs:// option {unknown[0]!r}; allowed: region, endpoint_url")
        if not _NAME.fullmatch(name):
            raise BackendConfigError(f"queue.name = {name!r}: an SQS queue name is 1-75 letters, digits, "
                                     "'_' or '-' (the dead-letter queue adds '-dead')")
        self._name = name
        self._settled: OrderedDict[str, None] = OrderedDict()
        where = f" at {query['endpoint_url']}" if "endpoint_url" in query else ""
        self._where = f"sqs queue {name!r}{where}"
        kwargs: dict[str, Any] = {
            "region_name": query.get("region"),
            "endpoint_url": query.get("endpoint_url"),
            # a long poll holds the request up to 20 s: the read timeout must outlast it
            "config": botocore.config.Config(connect_timeout=5, read_timeout=_MAX_WAIT + 10,
                                             retries={"mode": "standard", "max_attempts": 3}),
        }
        if parts.username:
            kwargs["aws_access_key_id"] = unquote(parts.username)
            kwargs["aws_secret_access_key"] = unquote(parts.password or "")
        try:
            self._sqs = boto3.session.Session().client("sqs", **kwargs)
        except (botocore.exceptions.NoRegionError, ValueError) as exc:
            raise BackendConfigError(f"queue.url: {exc}; add ?region=... to the sqs:// URL") from None
        self._url = self._call(lambda: self._sqs.create_queue(QueueName=name))["QueueUrl"]
        self._dead_url = self._call(lambda: self._sqs.create_queue(QueueName=f"{name}-dead"))["QueueUrl"]
        self._limits = Limits(max_lease_batch=_BATCH, max_ack_batch=_BATCH, max_extend_batch=_BATCH,
                              min_lease_secs=1.0, max_lease_secs=43200.0, max_payload_bytes=_MAX_PAYLOAD)

    def _call(self, fn: Callable[[], dict]) -> dict:
        """Run one SQS request; map its failure to BackendUnavailable or BackendConfigError."""
        try:
            return fn()
        except (botocore.exceptions.EndpointConnectionError, botocore.exceptions.ConnectionError,
                botocore.exceptions.HTTPClientError) as exc:
            raise BackendUnavailable(f"{self._where}: {exc}") from None
        except botocore.exceptions.NoCredentialsError:
            raise BackendConfigError(
                f"{self._where}: no AWS credentials; put them in the sqs:// URL or the environment "
                "(AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY)") from None
        except botocore.exceptions.ClientError as exc:
            error = exc.response.get("Error", {})
            code, message = error.get("Code", ""), error.get("Message", "")
            status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
            if code in _UNAVAILABLE or status >= 500:
                raise BackendUnavailable(f"{self._where}: {code} {message}".strip()) from None
            raise BackendConfigError(f"{self._where}: {code} {message}".strip()) from None

    @property
    def limits(self) -> Limits:
        return self._limits

    # -- the data path ---------------------------------------------------------------------------
    def lease(self, max_tasks: int, lease_secs: float, wait_secs: float = 0.0,
              tag: str | None = None) -> list[Leased]:
        if tag is not None:
            raise BackendConfigError(f"[leaser] tag = {tag!r}: sqs:// cannot lease by tag; "
                                     "use one queue name per tag")
        max_tasks = min(max_tasks, _BATCH)
        if max_tasks <= 0:
            return []
        visibility = int(math.ceil(min(max(lease_secs, 1.0), 43200.0)))
        deadline = time.monotonic() + max(0.0, wait_secs)
        while True:
            # WaitTimeSeconds is whole seconds: never wait past the caller's deadline
            wait = int(min(_MAX_WAIT, max(0.0, deadline - time.monotonic())))
            reply = self._call(lambda w=wait: self._sqs.receive_message(
                QueueUrl=self._url, MaxNumberOfMessages=max_tasks, VisibilityTimeout=visibility,
                WaitTimeSeconds=w, AttributeNames=["ApproximateReceiveCount"],
                MessageAttributeNames=["All"]))
            messages = reply.get("Messages", [])
            if messages or time.monotonic() >= deadline - 0.05:
                return [self._leased(m) for m in messages]

    def _leased(self, message: dict) -> Leased:
        task_id = _attr(message, "lt-id", message["MessageId"])
        tag = _attr(message, "lt-tag")
        # a released task is a new message: its earlier deliveries ride along in lt-attempts
        attempt = int(_attr(message, "lt-attempts", "0")) + int(
            message.get("Attributes", {}).get("ApproximateReceiveCount", "1"))
        receipt = json.dumps([message["ReceiptHandle"], task_id, tag, _attr(message, "lt-enq", "0"),
                              str(attempt), _attr(message, "lt-error"), message["Body"]],
                             separators=(",", ":"))
        return Leased(task_id, receipt, base64.b64decode(message["Body"]), attempt, tag)

    @staticmethod
    def _parse(receipt: str) -> list | None:
        try:
            parsed = json.loads(receipt)
        except ValueError:
            return None
        ok = isinstance(parsed, list) and len(parsed) == 7 and all(isinstance(p, str) for p in parsed)
        return parsed if ok else None

    def _batch(self, action: str, url: str, receipts: Sequence[str],
               entry: Callable[[str, list], dict]) -> dict[str, Outcome]:
        """Send ``action`` in tens with one entry per receipt; OK, LOST or RETRY per receipt."""
        out: dict[str, Outcome] = {}
        valid = []
        for receipt in dict.fromkeys(receipts):
            parsed = self._parse(receipt)
            if parsed is None or parsed[0] in self._settled:
                out[receipt] = Outcome.LOST
            else:
                valid.append((receipt, parsed))
        method = getattr(self._sqs, action)
        for chunk in _chunks(valid):
            entries = [{"Id": str(i), **entry(receipt, parsed)} for i, (receipt, parsed) in enumerate(chunk)]
            reply = self._call(lambda e=entries: method(QueueUrl=url, Entries=e))
            by_id = {str(i): receipt for i, (receipt, _) in enumerate(chunk)}
            for ok in reply.get("Successful", []):
                out[by_id[ok["Id"]]] = Outcome.OK
            for failed in reply.get("Failed", []):
                gone = failed.get("Code") in _GONE or (failed.get("SenderFault") and
                                                       failed.get("Code") not in _UNAVAILABLE)
                out[by_id[failed["Id"]]] = Outcome.LOST if gone else Outcome.RETRY
            for receipt in by_id.values():
                out.setdefault(receipt, Outcome.RETRY)  # neither listed: ask again
        return out

    def _remember(self, receipts: Sequence[str], outcomes: dict[str, Outcome]) -> None:
        """Note the handles this instance settled: SQS accepts a delete twice, we answer LOST."""
        for receipt in receipts:
            if outcomes.get(receipt) == Outcome.OK:
                self._settled[json.loads(receipt)[0]] = None
        while len(self._settled) > _SETTLED_MEMORY:
            self._settled.popitem(last=False)

    def extend(self, receipts: Sequence[str], lease_secs: float) -> dict[str, Outcome]:
        visibility = int(math.ceil(min(max(lease_secs, 1.0), 43200.0)))
        return self._batch("change_message_visibility_batch", self._url, receipts,
                           lambda r, p: {"ReceiptHandle": p[0], "VisibilityTimeout": visibility})

    def ack(self, receipts: Sequence[str]) -> dict[str, Outcome]:
        out = self._batch("delete_message_batch", self._url, receipts, lambda r, p: {"ReceiptHandle": p[0]})
        self._remember(receipts, out)
        return out

    def release(self, receipts: Sequence[str], delay_secs: float | Sequence[float] = 0.0,
                errors: Sequence[str] | None = None, count_attempt: bool = True) -> dict[str, Outcome]:
        # count_attempt is ignored: SQS counts receives itself and cannot take a delivery back
        delays = per_item(delay_secs, len(receipts), "release delay_secs")
        delay_of = dict(zip(receipts, delays, strict=True))
        error_of = dict(zip(receipts, per_item(errors if errors is not None else "", len(receipts),
                                                "release errors"), strict=True))
        # visible again at once and nothing to note: the message stays, one cheap call. Otherwise it
        # is sent anew (DelaySeconds: SQS counts it DELAYED) with its attempts and error attached.
        now = [r for r in receipts if float(delay_of[r]) <= 0 and not error_of[r]]
        out = self._batch("change_message_visibility_batch", self._url, now,
                          lambda r, p: {"ReceiptHandle": p[0], "VisibilityTimeout": 0})
        moved = [r for r in receipts if r not in out]
        out.update(self._move(moved, self._url, lambda r, p: {
            "DelaySeconds": min(_MAX_DELAY, int(math.ceil(float(delay_of[r])))),
            "MessageAttributes": _attrs(lt_id=p[1], lt_tag=p[2], lt_enq=p[3], lt_attempts=p[4],
                                        lt_error=_one_line(error_of[r]))}))
        self._remember(now, out)
        return out

    def dead_letter(self, receipts: Sequence[str], reason: str | Sequence[str]) -> dict[str, Outcome]:
        reason_of = dict(zip(receipts, per_item(reason, len(receipts), "dead_letter reason"), strict=True))
        died = f"{time.time():.6f}"
        return self._move(list(receipts), self._dead_url, lambda r, p: {"MessageAttributes": _attrs(
            lt_id=p[1], lt_tag=p[2], lt_enq=p[3], lt_attempts=p[4], lt_error=p[5],
            lt_reason=_one_line(reason_of[r]), lt_died=died)})

    def _move(self, receipts: list[str], url: str, entry: Callable[[str, list], dict]) -> dict[str, Outcome]:
        """Send each delivery's body to ``url`` as a new message, then delete the delivery. Copy first:
        a crash between the two leaves a duplicate, never a loss."""
        if not receipts:
            return {}
        sent = self._batch("send_message_batch", url, receipts,
                           lambda r, p: {"MessageBody": p[6], **entry(r, p)})
        copied = [r for r in dict.fromkeys(receipts) if sent[r] == Outcome.OK]
        deleted = self.ack(copied) if copied else {}
        return {r: deleted.get(r, sent[r]) for r in dict.fromkeys(receipts)}

    def enqueue(self, payloads: Sequence[bytes], delay_secs: float = 0.0, tag: str = "") -> list[str]:
        for payload in payloads:
            if len(payload) > _MAX_PAYLOAD:
                raise ValueError(f"payload of {len(payload)} bytes is over the {_MAX_PAYLOAD}-byte limit "
                                 "of sqs:// (256 KiB per message after base64)")
        if delay_secs > _MAX_DELAY:
            raise ValueError(f"delay of {delay_secs:g} s is over the {_MAX_DELAY} s that SQS allows")
        ids = [uuid.uuid4().hex for _ in payloads]
        now = f"{time.time():.6f}"
        delay = int(math.ceil(max(0.0, delay_secs)))
        entries = [{"Id": str(i), "MessageBody": base64.b64encode(p).decode(), "DelaySeconds": delay,
                    "MessageAttributes": _attrs(lt_id=task_id, lt_tag=tag, lt_enq=now)}
                   for i, (p, task_id) in enumerate(zip(payloads, ids, strict=True))]
        self._send(self._url, entries)
        return ids

    def _send(self, url: str, entries: list[dict]) -> None:
        """SendMessageBatch in tens; entries that fail for a transient reason are sent again."""
        for chunk in _chunks(entries):
            pending = list(chunk)
            for _ in range(3):
                reply = self._call(lambda p=pending: self._sqs.send_message_batch(QueueUrl=url, Entries=p))
                failed = {f["Id"]: f for f in reply.get("Failed", [])}
                bad = [f for f in failed.values() if f.get("SenderFault")]
                if bad:
                    raise ValueError(f"{self._where}: SQS refused a message: {bad[0].get('Message', '')}")
                pending = [e for e in pending if e["Id"] in failed]
                if not pending:
                    break
            else:
                raise BackendUnavailable(f"{self._where}: {len(pending)} messages not sent after 3 tries")

    def wait_for_work(self, timeout_secs: float) -> bool:
        """Poll ApproximateNumberOfMessages once a second: SQS has no change signal short of a
        receive, which would lease. On AWS that count can lag; ``lease(wait_secs)`` long-polls."""
        deadline = time.monotonic() + max(0.0, timeout_secs)
        while True:
            if self._attributes(self._url).get("ApproximateNumberOfMessages", 0) > 0:
                return True
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            time.sleep(min(1.0, remaining))

    def stats(self) -> QueueStats:
        main = self._attributes(self._url)
        dead = self._attributes(self._dead_url)
        return QueueStats(main.get("ApproximateNumberOfMessages", 0),
                          main.get("ApproximateNumberOfMessagesNotVisible", 0),
                          main.get("ApproximateNumberOfMessagesDelayed", 0),
                          sum(dead.values()), None)

    def _attributes(self, url: str) -> dict[str, int]:
        names = ["ApproximateNumberOfMessages", "ApproximateNumberOfMessagesNotVisible",
                 "ApproximateNumberOfMessagesDelayed"]
        reply = self._call(lambda: self._sqs.get_queue_attributes(QueueUrl=url, AttributeNames=names))
        return {k: int(v) for k, v in reply.get("Attributes", {}).items()}

    # -- admin: dead tasks only ------------------------------------------------------------------
    def _scan_dead(self, keep: Callable[[dict], bool]) -> list[dict]:
        """Receive every visible dead message once; return those ``keep`` accepts, still hidden.

        The others are made visible again at the end. A receive hides what it returns for 30 s, so
        the loop sees each message once; long polling (1 s) asks every SQS server, not a sample."""
        kept, others = [], []
        while True:
            reply = self._call(lambda: self._sqs.receive_message(
                QueueUrl=self._dead_url, MaxNumberOfMessages=_BATCH, VisibilityTimeout=30, WaitTimeSeconds=1,
                MessageAttributeNames=["All"], AttributeNames=["All"]))
            messages = reply.get("Messages", [])
            if not messages:
                break
            for message in messages:
                (kept if keep(message) else others).append(message)
        for chunk in _chunks(others):
            self._call(lambda c=chunk: self._sqs.change_message_visibility_batch(
                QueueUrl=self._dead_url, Entries=[{"Id": str(i), "ReceiptHandle": m["ReceiptHandle"],
                                                   "VisibilityTimeout": 0} for i, m in enumerate(c)]))
        return kept

    def _dead_info(self, message: dict) -> TaskInfo:
        return TaskInfo(_attr(message, "lt-id", message["MessageId"]), TaskState.DEAD,
                        base64.b64decode(message["Body"]), int(_attr(message, "lt-attempts", "0")),
                        _attr(message, "lt-tag"), float(_attr(message, "lt-enq", "0")), None,
                        _attr(message, "lt-error"), _attr(message, "lt-reason"))

    def _refuse(self, what: str) -> BackendConfigError:
        return BackendConfigError(f"{self._where}: {what} works on dead tasks only: SQS cannot read a "
                                  "live message without leasing it")

    def list_tasks(self, state: TaskState | None = None, limit: int = 100) -> list[TaskInfo]:
        if state != TaskState.DEAD:
            raise self._refuse("queue list")
        found = self._scan_dead(lambda m: True)
        self._reveal(found)
        return sorted((self._dead_info(m) for m in found), key=lambda i: i.enqueued_at)[:limit]

    def _reveal(self, messages: list[dict]) -> None:
        for chunk in _chunks(messages):
            self._call(lambda c=chunk: self._sqs.change_message_visibility_batch(
                QueueUrl=self._dead_url, Entries=[{"Id": str(i), "ReceiptHandle": m["ReceiptHandle"],
                                                   "VisibilityTimeout": 0} for i, m in enumerate(c)]))

    def get(self, task_id: str) -> TaskInfo | None:
        found = self._scan_dead(lambda m: _attr(m, "lt-id", m["MessageId"]) == task_id)
        self._reveal(found)
        if not found:
            raise self._refuse("queue get")
        return self._dead_info(found[0])

    def delete(self, task_ids: Sequence[str]) -> int:
        wanted = set(task_ids)
        found = self._scan_dead(lambda m: _attr(m, "lt-id", m["MessageId"]) in wanted)
        for chunk in _chunks(found):
            self._call(lambda c=chunk: self._sqs.delete_message_batch(
                QueueUrl=self._dead_url,
                Entries=[{"Id": str(i), "ReceiptHandle": m["ReceiptHandle"]} for i, m in enumerate(c)]))
        return len({_attr(m, "lt-id", m["MessageId"]) for m in found})

    def requeue_dead(self, task_ids: Sequence[str] | None = None) -> int:
        wanted = None if task_ids is None else set(task_ids)
        found = self._scan_dead(lambda m: wanted is None or _attr(m, "lt-id", m["MessageId"]) in wanted)
        for chunk in _chunks(found):
            # a new message, so ApproximateReceiveCount (the attempt) starts again from 0
            self._send(self._url, [{"Id": str(i), "MessageBody": m["Body"], "MessageAttributes": _attrs(
                lt_id=_attr(m, "lt-id", m["MessageId"]), lt_tag=_attr(m, "lt-tag"),
                lt_enq=_attr(m, "lt-enq"))}
                for i, m in enumerate(chunk)])
            self._call(lambda c=chunk: self._sqs.delete_message_batch(
                QueueUrl=self._dead_url,
                Entries=[{"Id": str(i), "ReceiptHandle": m["ReceiptHandle"]} for i, m in enumerate(c)]))
        return len(found)

    def purge(self) -> int:
        count = sum(self._attributes(self._url).values()) + sum(self._attributes(self._dead_url).values())
        for url in (self._url, self._dead_url):
            try:
                self._sqs.purge_queue(QueueUrl=url)
            except botocore.exceptions.ClientError as exc:
                if "PurgeQueueInProgress" not in exc.response.get("Error", {}).get("Code", ""):
                    self._call(lambda u=url: self._sqs.purge_queue(QueueUrl=u))  # raises, mapped
                # purged less than 60 s ago (AWS allows one per minute): delete what is visible now
                self._drain(url)
            except botocore.exceptions.BotoCoreError:
                self._call(lambda u=url: self._sqs.purge_queue(QueueUrl=u))
        return count

    def _drain(self, url: str) -> None:
        while messages := self._call(lambda: self._sqs.receive_message(
                QueueUrl=url, MaxNumberOfMessages=_BATCH, VisibilityTimeout=30)).get("Messages", []):
            self._call(lambda m=messages: self._sqs.delete_message_batch(QueueUrl=url, Entries=[
                {"Id": str(i), "ReceiptHandle": x["ReceiptHandle"]} for i, x in enumerate(m)]))

    def close(self) -> None:
        self._sqs.close()
