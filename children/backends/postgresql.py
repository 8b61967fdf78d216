"""PostgreSQL backend: ``postgresql://user[:password]@host:port/db``, psycopg 3.

One table, ``leasetree_tasks``, holds every queue's tasks (column ``queue``). A task is in one of three
stored states; a fourth, *delayed*, is a ready row whose ``visible_at`` is in the future:

- ``ready``   leasable once ``visible_at <= now()``;
- ``leased``  held until ``visible_at`` (the lease deadline) by whoever holds ``lease_token``; once the
  deadline passes it is leasable again, by the same query that takes ready rows;
- ``dead``    dead-lettered, with ``dead_reason``, ``attempts`` and ``last_error`` kept.

Lease is one statement (``SELECT ... FOR UPDATE SKIP LOCKED`` feeding an ``UPDATE``), so concurrent
leasers never wait on each other and never take the same row. Each lease draws a fresh token from a
sequence; a receipt is ``<id>:<token>`` and every settle matches both, so a stale receipt (its lease
expired and another holder leased the task) changes nothing. Settles take whole batches through
``unnest`` of arrays: one round-trip per batch.

Enqueue, release and requeue NOTIFY a per-queue channel in the same statement; a waiting lease
LISTENs on it, so it wakes within milliseconds of the commit rather than at the next poll.

The schema is created on first use, inside a transaction holding an advisory lock (two hosts starting
at once do not race), and versioned in ``leasetree_schema``. The connection is autocommit: every
statement is its own transaction, and the hot ones are server-side prepared.
"""

from __future__ import annotations

import hashlib
import os
import socket
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import psycopg
from psycopg import errors as pg_errors
from psycopg import sql

from children.backends import redact_url
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

SCHEMA_VERSION = 1
_SCHEMA_LOCK = 0x6C65617365  # pg_advisory_xact_lock key: "lease" in ASCII
_MIGRATIONS: dict[int, list[str]] = {
    1: [
        "CREATE SEQUENCE IF NOT EXISTS leasetree_lease_token",
        """CREATE TABLE IF NOT EXISTS leasetree_tasks (
            id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
            queue       text        NOT NULL,
            tag         text        NOT NULL DEFAULT '',
            state       text        NOT NULL DEFAULT 'ready' CHECK (state IN ('ready', 'leased', 'dead')),
            payload     bytea       NOT NULL,
            attempts    integer     NOT NULL DEFAULT 0,
            lease_token bigint,
            visible_at  timestamptz NOT NULL DEFAULT now(),
            enqueued_at timestamptz NOT NULL DEFAULT now(),
            last_error  text        NOT NULL DEFAULT '',
            dead_reason text        NOT NULL DEFAULT '')""",
        # The lease query walks one of these in order and stops after k rows, so its cost does not
        # grow with the queue; dead rows stay out of them.
        """CREATE INDEX IF NOT EXISTS leasetree_tasks_due
            ON leasetree_tasks (queue, visible_at, id) WHERE state <> 'dead'""",
        """CREATE INDEX IF NOT EXISTS leasetree_tasks_tag_due
            ON leasetree_tasks (queue, tag, visible_at, id) WHERE state <> 'dead'""",
        """CREATE INDEX IF NOT EXISTS leasetree_tasks_dead
            ON leasetree_tasks (queue, id) WHERE state = 'dead'""",
    ],
}

# The ANY(ARRAY(...)) repeats the join on purpose: it makes the UPDATE find its rows through the
# primary key at any table size; with the join alone the planner hash-joins against a sequential scan
# of the whole table while it is below some 50k rows, and the cost of a lease grows with the queue.
_LEASE = """
WITH c AS (
    SELECT id, visible_at AS due FROM leasetree_tasks
    WHERE queue = %(q)s AND state <> 'dead' AND visible_at <= now() {tag}
    ORDER BY visible_at, id
    LIMIT %(k)s
    FOR UPDATE SKIP LOCKED)
UPDATE leasetree_tasks t
SET state = 'leased', lease_token = nextval('leasetree_lease_token'), attempts = t.attempts + 1,
    visible_at = now() + %(lease)s * interval '1 second'
FROM c WHERE t.id = c.id AND t.id = ANY(ARRAY(SELECT id FROM c))
RETURNING t.id, t.lease_token, t.payload, t.attempts, t.tag, c.due"""
_LEASE_ANY = _LEASE.format(tag="")
_LEASE_TAG = _LEASE.format(tag="AND tag = %(tag)s")

# seconds until the next row of this queue becomes leasable (negative: one is leasable now)
_NEXT_DUE = """
SELECT extract(epoch FROM min(visible_at) - now())::float8 FROM leasetree_tasks
WHERE queue = %(q)s AND state <> 'dead' {tag}"""

_RECEIPTS = "unnest(%(ids)s::bigint[], %(tokens)s::bigint[]{extra}) AS r(id, token{names})"
_FENCE = "t.id = r.id AND t.lease_token = r.token AND t.state = 'leased' AND t.queue = %(q)s"

_ACK = f"DELETE FROM leasetree_tasks t USING {_RECEIPTS.format(extra='', names='')} " \
       f"WHERE {_FENCE} RETURNING r.id, r.token"
_EXTEND = f"""UPDATE leasetree_tasks t SET visible_at = now() + %(lease)s * interval '1 second'
FROM {_RECEIPTS.format(extra='', names='')} WHERE {_FENCE} RETURNING r.id, r.token"""
_RELEASE = f"""
WITH done AS (
    UPDATE leasetree_tasks t
    SET state = 'ready', lease_token = NULL, visible_at = now() + r.delay * interval '1 second',
        last_error = coalesce(r.err, t.last_error), attempts = greatest(t.attempts - %(uncount)s, 0)
    FROM {_RECEIPTS.format(extra=', %(delays)s::float8[], %(errors)s::text[]', names=', delay, err')}
    WHERE {_FENCE} RETURNING r.id, r.token),
  n AS (SELECT pg_notify(%(channel)s, '') WHERE EXISTS (SELECT 1 FROM done))
SELECT done.* FROM done LEFT JOIN n ON true"""
_DEAD = f"""UPDATE leasetree_tasks t SET state = 'dead', lease_token = NULL, dead_reason = r.reason
FROM {_RECEIPTS.format(extra=', %(reasons)s::text[]', names=', reason')}
WHERE {_FENCE} RETURNING r.id, r.token"""
_ENQUEUE = """
WITH ins AS (
    INSERT INTO leasetree_tasks (queue, tag, payload, visible_at)
    SELECT %(q)s, %(tag)s, u.p, now() + %(delay)s * interval '1 second'
    FROM unnest(%(payloads)s::bytea[]) WITH ORDINALITY AS u(p, n) ORDER BY u.n
    RETURNING id),
  n AS (SELECT pg_notify(%(channel)s, ''))
SELECT ins.id FROM ins LEFT JOIN n ON true ORDER BY ins.id"""

_STATE_SQL = """CASE WHEN state = 'dead' THEN 'dead' WHEN visible_at <= now() THEN 'ready'
    WHEN state = 'leased' THEN 'leased' ELSE 'delayed' END"""
_WHERE_STATE = {
    None: "",
    TaskState.READY: "AND state <> 'dead' AND visible_at <= now()",
    TaskState.LEASED: "AND state = 'leased' AND visible_at > now()",
    TaskState.DELAYED: "AND state = 'ready' AND visible_at > now()",
    TaskState.DEAD: "AND state = 'dead'",
}
_INFO = f"""SELECT id, {_STATE_SQL}, payload, attempts, tag, extract(epoch FROM enqueued_at)::float8,
    extract(epoch FROM visible_at)::float8, last_error, dead_reason
FROM leasetree_tasks WHERE queue = %(q)s"""
_STATS = """
SELECT count(*) FILTER (WHERE state <> 'dead' AND visible_at <= now()),
       count(*) FILTER (WHERE state = 'leased' AND visible_at > now()),
       count(*) FILTER (WHERE state = 'ready' AND visible_at > now()),
       count(*) FILTER (WHERE state = 'dead'),
       extract(epoch FROM now() - min(enqueued_at) FILTER (WHERE state <> 'dead'))::float8
FROM leasetree_tasks WHERE queue = %(q)s"""

# Faults that mean "the server is there but the operator must act": never worth a retry.
_CONFIG_FAULTS = ("authentication failed", "does not exist", "no pg_hba.conf entry",
                  "invalid connection option", "invalid dsn", "invalid uri", "missing \"=\"",
                  "permission denied")


class PostgresBackend(Backend):
    """A queue in PostgreSQL; one connection per instance, opened on first use and after a fault."""

    name = "postgresql"

    def __init__(self, url: str, name: str, base_dir: Path) -> None:
        if not name:
            raise BackendConfigError("queue.name = '': a queue name must not be empty")
        self._url = url
        self._where = redact_url(url)
        self._queue = name
        # channel names are identifiers (63 bytes at most): hash the queue name into one
        self._channel = "leasetree_" + hashlib.sha1(name.encode()).hexdigest()[:24]
        self._client_name = f"leasetree:{socket.gethostname()}:{os.getpid()}:{os.urandom(4).hex()}"[:63]
        self._conn: psycopg.Connection[Any] | None = None
        self._listening = False
        self._limits = Limits(min_lease_secs=0.01)

    @property
    def limits(self) -> Limits:
        return self._limits

    @property
    def client_name(self) -> str:
        """The ``application_name`` of its connection (pg_stat_activity): ``leasetree:host:pid:random``."""
        return self._client_name

    # -- connection ----------------------------------------------------------------------------
    def _connect(self) -> psycopg.Connection[Any]:
        if self._conn is not None and not self._conn.closed:
            return self._conn
        self._conn = None
        conn = psycopg.connect(self._url, autocommit=True, connect_timeout=5,
                               application_name=self._client_name)
        try:
            _ensure_schema(conn)
            if self._listening:
                conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(self._channel)))
        except BaseException:
            conn.close()
            raise
        self._conn = conn
        return conn

    @contextmanager
    def _session(self) -> Iterator[psycopg.Connection[Any]]:
        """The live connection; driver faults become BackendUnavailable (the connection is dropped,
        the next call reconnects) or BackendConfigError (the operator must fix something)."""
        try:
            yield self._connect()
        except (pg_errors.InsufficientPrivilege, pg_errors.InvalidAuthorizationSpecification) as exc:
            raise BackendConfigError(f"queue.url = {self._where!r}: {_first_line(exc)}") from None
        except (psycopg.OperationalError, psycopg.InterfaceError, pg_errors.UndefinedTable,
                pg_errors.TransactionRollback) as exc:
            text = _first_line(exc)
            if self._conn is None and any(f in text.lower() for f in _CONFIG_FAULTS):
                raise BackendConfigError(f"queue.url = {self._where!r}: {text}") from None
            self._drop()
            raise BackendUnavailable(f"postgresql at {self._where} unavailable: {text}") from None
        except psycopg.ProgrammingError as exc:
            if self._conn is None:  # a malformed connection string
                raise BackendConfigError(f"queue.url = {self._where!r}: {_first_line(exc)}") from None
            raise

    def _drop(self) -> None:
        if self._conn is not None:
            try:
                self._conn.close()
            except psycopg.Error:
                pass
        self._conn = None

    def _rows(self, query: str, params: dict[str, Any]) -> list[tuple[Any, ...]]:
        with self._session() as conn:
            return conn.execute(query, {"q": self._queue, **params}, prepare=True).fetchall()

    # -- waiting -------------------------------------------------------------------------------
    def _listen(self) -> None:
        if not self._listening:
            self._listening = True
            with self._session() as conn:
                conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(self._channel)))

    def _drain(self) -> None:
        """Forget notifications already received: what they announce is visible to the next query."""
        with self._session() as conn:
            for _ in conn.notifies(timeout=0):
                pass

    def _next_due(self, tag: str | None) -> float | None:
        query = _NEXT_DUE.format(tag="" if tag is None else "AND tag = %(tag)s")
        (due,), = self._rows(query, {"tag": tag})
        return due

    def _wait(self, until: float, next_due: float | None) -> bool | None:
        """Block for a NOTIFY, at most until ``until`` (monotonic) and ``next_due`` seconds from now.
        None when ``until`` has passed, else whether a notification arrived."""
        remaining = until - time.monotonic()
        if remaining <= 0:
            return None
        if next_due is not None:
            # at least 5 ms: a due row another leaser holds locked right now must not make us spin
            remaining = min(remaining, max(0.005, next_due))
        with self._session() as conn:
            for _ in conn.notifies(timeout=remaining, stop_after=1):
                return True
        return False

    def wait_for_work(self, timeout_secs: float) -> bool:
        """Block up to ``timeout_secs`` on LISTEN; True as soon as a task is leasable. A NOTIFY for
        work that is not leasable yet (a delayed enqueue) only shortens the wait."""
        until = time.monotonic() + max(0.0, timeout_secs)
        self._listen()
        while True:
            self._drain()
            next_due = self._next_due(None)
            if next_due is not None and next_due <= 0:
                return True
            if self._wait(until, next_due) is None:
                return False

    # -- the data path -------------------------------------------------------------------------
    def lease(self, max_tasks: int, lease_secs: float, wait_secs: float = 0.0,
              tag: str | None = None) -> list[Leased]:
        """See ``Backend.lease``; with ``wait_secs`` it LISTENs between attempts."""
        want = min(max_tasks, self._limits.max_lease_batch)
        if want <= 0:
            return []
        until = time.monotonic() + max(0.0, wait_secs)
        if wait_secs > 0:
            self._listen()
        query = _LEASE_ANY if tag is None else _LEASE_TAG
        params = {"k": want, "lease": max(0.001, lease_secs), "tag": tag}
        while True:
            if self._listening:
                self._drain()  # before the query: a NOTIFY after it is then never missed
            rows = self._rows(query, params)
            if rows:
                rows.sort(key=lambda r: (r[5], r[0]))
                return [Leased(task_id=str(r[0]), receipt=f"{r[0]}:{r[1]}", payload=bytes(r[2]),
                               attempt=r[3], tag=r[4]) for r in rows]
            if wait_secs <= 0 or self._wait(until, self._next_due(tag)) is None:
                return []

    def _settle(self, query: str, receipts: Sequence[str], params: dict[str, Any] | None = None,
                per_item: dict[str, Sequence[Any]] | None = None) -> dict[str, Outcome]:
        """Run a fenced batch statement; ``per_item`` holds arrays parallel to ``receipts``."""
        outcomes: dict[str, Outcome] = {}
        ids: list[int] = []
        tokens: list[int] = []
        picked: list[int] = []
        for i, receipt in enumerate(receipts):
            if receipt in outcomes:
                continue  # a duplicate in the batch settles once; the first one's values win
            task_id, sep, token = receipt.partition(":")
            outcomes[receipt] = Outcome.LOST
            if sep and task_id.isdigit() and token.isdigit():
                ids.append(int(task_id))
                tokens.append(int(token))
                picked.append(i)
        if ids:
            arrays = {k: [v[i] for i in picked] for k, v in (per_item or {}).items()}
            rows = self._rows(query, {"ids": ids, "tokens": tokens, **(params or {}), **arrays})
            for task_id, token in rows:
                outcomes[f"{task_id}:{token}"] = Outcome.OK
        return outcomes

    def extend(self, receipts: Sequence[str], lease_secs: float) -> dict[str, Outcome]:
        return self._settle(_EXTEND, receipts, {"lease": max(0.001, lease_secs)})

    def ack(self, receipts: Sequence[str]) -> dict[str, Outcome]:
        return self._settle(_ACK, receipts)

    def release(self, receipts: Sequence[str], delay_secs: float | Sequence[float] = 0.0,
                errors: Sequence[str] | None = None, count_attempt: bool = True) -> dict[str, Outcome]:
        delays = ([float(delay_secs)] * len(receipts) if isinstance(delay_secs, int | float)
                  else [float(d) for d in delay_secs])
        errs = list(errors) if errors is not None else [None] * len(receipts)
        params = {"channel": self._channel, "uncount": 0 if count_attempt else 1}
        return self._settle(_RELEASE, receipts, params,
                            {"delays": delays, "errors": errs})

    def dead_letter(self, receipts: Sequence[str], reason: str | Sequence[str]) -> dict[str, Outcome]:
        reasons = [reason] * len(receipts) if isinstance(reason, str) else list(reason)
        return self._settle(_DEAD, receipts, per_item={"reasons": reasons})

    def enqueue(self, payloads: Sequence[bytes], delay_secs: float = 0.0, tag: str = "") -> list[str]:
        """See ``Backend.enqueue``: one statement, so one transaction, with its NOTIFY."""
        if not payloads:
            return []
        for payload in payloads:
            if len(payload) > self._limits.max_payload_bytes:
                raise ValueError(f"payload of {len(payload)} bytes exceeds the postgresql backend's "
                                 f"max_payload_bytes = {self._limits.max_payload_bytes}")
        rows = self._rows(_ENQUEUE, {"tag": tag, "delay": float(delay_secs), "channel": self._channel,
                                     "payloads": [bytes(p) for p in payloads]})
        return [str(r[0]) for r in rows]

    def stats(self) -> QueueStats:
        (ready, leased, delayed, dead, oldest), = self._rows(_STATS, {})
        return QueueStats(ready=ready, leased=leased, delayed=delayed, dead=dead,
                          oldest_age_secs=None if oldest is None else max(0.0, oldest))

    # -- admin ---------------------------------------------------------------------------------
    def list_tasks(self, state: TaskState | None = None, limit: int = 100) -> list[TaskInfo]:
        rows = self._rows(f"{_INFO} {_WHERE_STATE[state]} ORDER BY id LIMIT %(limit)s", {"limit": limit})
        return [_info(r) for r in rows]

    def get(self, task_id: str) -> TaskInfo | None:
        if not task_id.isdigit():
            return None
        rows = self._rows(f"{_INFO} AND id = %(id)s", {"id": int(task_id)})
        return _info(rows[0]) if rows else None

    def delete(self, task_ids: Sequence[str]) -> int:
        ids = [int(t) for t in task_ids if t.isdigit()]
        if not ids:
            return 0
        return len(self._rows("DELETE FROM leasetree_tasks WHERE queue = %(q)s AND id = ANY(%(ids)s) "
                              "RETURNING id", {"ids": ids}))

    def requeue_dead(self, task_ids: Sequence[str] | None = None) -> int:
        which = ""
        params: dict[str, Any] = {"channel": self._channel}
        if task_ids is not None:
            params["ids"] = [int(t) for t in task_ids if t.isdigit()]
            which = "AND id = ANY(%(ids)s)"
        rows = self._rows(f"""
            WITH moved AS (
                UPDATE leasetree_tasks SET state = 'ready', attempts = 0, dead_reason = '',
                    visible_at = now()
                WHERE queue = %(q)s AND state = 'dead' {which} RETURNING id),
              n AS (SELECT pg_notify(%(channel)s, '') WHERE EXISTS (SELECT 1 FROM moved))
            SELECT count(*) FROM moved LEFT JOIN n ON true""", params)
        return rows[0][0]

    def purge(self) -> int:
        return len(self._rows("DELETE FROM leasetree_tasks WHERE queue = %(q)s RETURNING id", {}))

    def close(self) -> None:
        self._drop()
        self._listening = False


def _ensure_schema(conn: psycopg.Connection[Any]) -> None:
    """Create or upgrade the tables; cheap when they are current (one SELECT, no lock)."""
    try:
        (version,), = conn.execute("SELECT max(version) FROM leasetree_schema").fetchall()
        if version is not None and version >= SCHEMA_VERSION:
            return
    except pg_errors.UndefinedTable:
        pass
    with conn.transaction():
        # two hosts starting at once: the second waits here, then finds the work done
        conn.execute("SELECT pg_advisory_xact_lock(%s)", [_SCHEMA_LOCK])
        conn.execute("CREATE TABLE IF NOT EXISTS leasetree_schema (version integer NOT NULL)")
        (current,), = conn.execute("SELECT coalesce(max(version), 0) FROM leasetree_schema").fetchall()
        for version in sorted(v for v in _MIGRATIONS if v > current):
            for statement in _MIGRATIONS[version]:
                conn.execute(statement)
            conn.execute("INSERT INTO leasetree_schema (version) VALUES (%s)", [version])


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _info(row: tuple[Any, ...]) -> TaskInfo:
    task_id, state, payload, attempts, tag, enqueued_at, visible_at, last_error, dead_reason = row
    state = TaskState(state)
    return TaskInfo(
        task_id=str(task_id), state=state, payload=bytes(payload), attempt=attempts, tag=tag,
        enqueued_at=enqueued_at,
        visible_at=visible_at if state in (TaskState.LEASED, TaskState.DELAYED) else None,
        last_error=last_error, dead_reason=dead_reason)
