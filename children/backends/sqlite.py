"""The embedded backend: one SQLite file (stdlib sqlite3, WAL), shared by processes and trees on a host.

URL: ``sqlite:///relative/path.db`` (relative to the config file's folder, ``base_dir``) or
``sqlite:////absolute/path.db``. Several queues (``name``) live in one file; any number of processes
and trees may open it at once: every mutation is one ``BEGIN IMMEDIATE`` transaction, and
``busy_timeout`` makes a writer wait for another instead of failing. Nothing is created until the
path has been checked: a missing folder, a directory, a read-only, unreadable or corrupt file is a
one-line ``BackendConfigError`` naming the path.

Data model (schema version ``SCHEMA_VERSION`` in ``PRAGMA user_version``): one ``tasks`` table; a
task's state follows from two columns. ``visible_at`` is when it can be leased next (NULL = dead);
``leased`` says whether the future ``visible_at`` is a lease expiry or a delay. So an expired lease is
simply a ready task, with no sweeper: ``ready`` = ``visible_at <= now``; ``leased``/``delayed`` =
``visible_at > now`` with ``leased`` 1/0; ``dead`` = ``visible_at IS NULL``.

- Task ids are the table's AUTOINCREMENT rowid as a decimal string: unique across processes, never
  reused, increasing in enqueue order (compare numerically).
- A receipt is ``f"{task_id}.{token}"``; every lease draws a fresh random 64-bit token, and every
  settling statement matches both, so a stale receipt (its task leased again since) settles nothing.
  Release and dead letter draw a new token too: a token is (almost) always 8 bytes, so the common updates
  (lease, extend, release) keep the record's size and SQLite rewrites only the page that changed,
  not a large payload's overflow pages. A record that changes size (attempt 1 -> 2, a recorded
  error, dead letter) is rewritten whole.
  A receipt stays valid until its task is settled or leased again: a holder whose lease expired but
  whose task nobody has leased since may still ack or extend it.
- ``tag=None`` leases any tag; a string leases exactly that tag (``""`` = untagged only).
- Ready tasks are leased in the order they became ready (enqueue time, release delay, lease
  expiry); a batch comes back sorted by id.
- Times are wall-clock seconds (``time.time()``, or the ``clock`` given to the constructor), because
  every process on the host shares them; a step of the system clock moves lease expiries and delays
  with it (docs/guarantees.md, "Clock"). Waits (``wait_secs``, polling) use the monotonic clock.
- A connection must not cross ``fork``: open the backend in the process that uses it.
- ``lease(wait_secs>0)`` and ``wait_for_work`` do not spin: they poll ``PRAGMA data_version`` (it
  changes only when another connection commits) every ``POLL_SECS`` and query again only when it
  changed or a delayed task or lease fell due.
- Indexes: (queue, visible_at, leased, tag) serves leases of any tag or of untagged tasks and
  the counts in ``stats()`` (index-only); (queue, tag, visible_at) serves leases of one tag. An
  untagged task stores tag NULL and stays out of that partial index, so a queue that does not use
  tags does not pay for it (measured: ~20 % of lease+ack time). No index finds the oldest task
  for ``stats()`` (one on (queue) cost ~8 % of lease+ack): it walks rows in id order from the oldest,
  which stops at once unless older rows are dead or belong to other queues. Lease and ack cost
  stays flat with queue length. A lease of untagged tasks (``tag=""``) steps
  over ready tagged tasks in the index, which is cheap unless most ready tasks are tagged.
"""

from __future__ import annotations

import os
import sqlite3
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import quote

from children.backends.base import (
    Backend,
    BackendConfigError,
    BackendError,
    BackendUnavailable,
    Leased,
    Limits,
    Outcome,
    QueueStats,
    TaskInfo,
    TaskState,
    per_item,
)

SCHEMA_VERSION = 1
MIN_SQLITE = (3, 35, 0)  # UPDATE/DELETE ... RETURNING
BUSY_TIMEOUT_MS = 5000  # a writer waits this long for another before BackendUnavailable
POLL_SECS = 0.005  # how soon a waiting lease first looks at PRAGMA data_version again ...
POLL_MAX_SECS = 0.03  # ... backing off to this, so an idle tree costs well under 1 % of a core
CACHE_KIB = 64 * 1024  # page cache per connection: keeps the indexes of a 1 M-task queue in memory

_SCHEMA = (
    """CREATE TABLE IF NOT EXISTS tasks (
        id          INTEGER PRIMARY KEY AUTOINCREMENT,
        queue       TEXT    NOT NULL,
        tag         TEXT,                          -- NULL = untagged (keeps it out of tasks_tag)
        payload     BLOB    NOT NULL,
        attempt     INTEGER NOT NULL DEFAULT 0,
        enqueued_at REAL    NOT NULL,
        visible_at  REAL,                          -- NULL = dead
        leased      INTEGER NOT NULL DEFAULT 0,    -- 1: a future visible_at is a lease expiry
        token       INTEGER NOT NULL,              -- the current delivery's fence (random)
        last_error  TEXT    NOT NULL DEFAULT '',
        dead_reason TEXT    NOT NULL DEFAULT ''
    )""",
    "CREATE INDEX IF NOT EXISTS tasks_visible ON tasks (queue, visible_at, leased, tag)",
    "CREATE INDEX IF NOT EXISTS tasks_tag ON tasks (queue, tag, visible_at) WHERE tag IS NOT NULL",
)

# one statement per batch: pick the oldest ready ids by index, fence each with a fresh token
_LEASE = ("UPDATE tasks SET visible_at = ?, leased = 1, token = random(), attempt = attempt + 1 "
          "WHERE id IN (SELECT id FROM tasks WHERE {where} ORDER BY visible_at LIMIT ?) "
          "RETURNING id, token, payload, attempt, tag")
# which tasks a tag filter selects: None = any tag, "" = untagged only, else exactly that tag
_TAG_WHERE = {None: "queue = ? AND visible_at {op} ?", "": "queue = ? AND tag IS NULL AND visible_at {op} ?"}
_TAG_WHERE_ONE = "queue = ? AND tag = ? AND visible_at {op} ?"

_COLUMNS = "id, payload, attempt, tag, enqueued_at, visible_at, leased, last_error, dead_reason"

_SQLITE_HEADER = b"SQLite format 3\x00"

# primary result codes (sqlite3.h)
_BUSY, _LOCKED, _READONLY, _CORRUPT, _FULL, _CANTOPEN, _NOTADB = 5, 6, 8, 11, 13, 14, 26


_INT64 = range(-(2**63), 2**63)


def _parse_receipt(receipt: str) -> tuple[int, int] | None:
    """(task id, token) of a well-formed receipt, else None: a malformed receipt can only be LOST."""
    id_text, _, token_text = receipt.partition(".")
    try:
        task_id, token = int(id_text), int(token_text)
    except ValueError:
        return None
    if task_id not in _INT64 or token not in _INT64:
        return None
    return task_id, token


def _marks(count: int) -> str:
    return ",".join("?" * count)


def _padded(values: Sequence[Any], limit: int = 1000) -> tuple[Any, ...]:
    """``values`` and NULLs up to the next power of two (at most ``limit``) for an IN-list: a few
    statement shapes instead of one per batch size, so prepared statements are reused and the
    sqlite3 statement cache (128 entries, some hundreds of KB each at these sizes) stays small."""
    size = min(limit, max(8, 1 << (len(values) - 1).bit_length()))
    return (*values, *(None,) * (size - len(values)))


def _chunks(items: list, size: int = 1000) -> Iterator[list]:
    """Pieces small enough for one statement's variables (32766 since SQLite 3.32, 999 before)."""
    for first in range(0, len(items), size):
        yield items[first:first + size]


def resolve_path(url: str, base_dir: Path) -> Path:
    """The database file a ``sqlite://`` URL names; BackendConfigError for any other shape."""
    rest = url.split("://", 1)[1] if "://" in url else ""
    if not rest.startswith("/") or "?" in rest or "#" in rest:
        raise BackendConfigError(
            f"queue.url = {url!r}: expected sqlite:///relative/path.db or sqlite:////absolute/path.db")
    text = rest[1:]
    if not text or text.endswith("/"):
        raise BackendConfigError(f"queue.url = {url!r}: names no database file")
    path = Path(text)
    return (path if path.is_absolute() else Path(base_dir) / path).absolute()


def check_path(path: Path) -> bool:
    """Check, without creating or writing anything, that ``path`` can be our database.

    Returns whether the file exists already. Raises BackendConfigError naming the path and the
    problem: missing or unwritable folder, a directory, an unreadable or read-only file, a file
    that is not an SQLite database.
    """
    folder = path.parent
    if not folder.is_dir():
        raise BackendConfigError(f"sqlite database {path}: folder {folder} does not exist; create it first")
    if path.is_dir():
        raise BackendConfigError(f"sqlite database {path}: is a directory, not a file")
    if not path.exists():
        if not os.access(folder, os.W_OK | os.X_OK):
            raise BackendConfigError(f"sqlite database {path}: folder {folder} is not writable")
        return False
    if not path.is_file():
        raise BackendConfigError(f"sqlite database {path}: is not a regular file")
    # root passes os.access on a 0444 file: the mode bits say what the operator meant
    if not os.access(path, os.R_OK):
        raise BackendConfigError(f"sqlite database {path}: file is not readable")
    if not os.access(path, os.W_OK) or not os.stat(path).st_mode & 0o222:
        raise BackendConfigError(f"sqlite database {path}: file is read-only; make it writable")
    # WAL needs to create path-wal and path-shm beside it
    if not os.access(folder, os.W_OK | os.X_OK):
        raise BackendConfigError(f"sqlite database {path}: folder {folder} is not writable (WAL needs it)")
    with open(path, "rb") as handle:
        header = handle.read(len(_SQLITE_HEADER))
    if header and header != _SQLITE_HEADER:
        raise BackendConfigError(f"sqlite database {path}: file is not an SQLite database")
    return True


class SqliteBackend(Backend):
    """A lease queue in one SQLite file; see the module docstring for URL, schema and semantics."""

    name = "sqlite"

    def __init__(self, url: str, name: str = "default", base_dir: Path | None = None, *,
                 clock: Callable[[], float] = time.time) -> None:
        self._clock = clock  # wall-clock seconds; injectable so a test can step it (clock jumps)
        self.path = resolve_path(url, base_dir or Path.cwd())
        self.queue = name
        self._limits = Limits(min_lease_secs=0.05)
        self._conn: sqlite3.Connection | None = None
        if sqlite3.sqlite_version_info < MIN_SQLITE:
            raise BackendConfigError(
                f"queue.url = {url!r}: needs SQLite {'.'.join(map(str, MIN_SQLITE))} or newer "
                f"(UPDATE ... RETURNING); this Python has {sqlite3.sqlite_version}")
        exists = check_path(self.path)
        try:
            self._conn = self._connect(exists)
            self._check_schema()  # before anything writes, even the switch to WAL
            self._set_pragmas()
            self._migrate()
        except sqlite3.DatabaseError as exc:
            self.close()
            raise self._config_error(exc) from None
        except BackendError:
            self.close()
            raise

    def _config_error(self, exc: sqlite3.DatabaseError) -> BackendError:
        code = getattr(exc, "sqlite_errorcode", 0) & 0xFF
        if code in (_BUSY, _LOCKED):
            return BackendUnavailable(f"sqlite database {self.path}: locked by another process ({exc})")
        return BackendConfigError(f"sqlite database {self.path}: {exc}")

    def _connect(self, exists: bool) -> sqlite3.Connection:
        # mode=rw on an existing file: never create one behind a check that said it exists
        uri = f"file:{quote(str(self.path))}?mode={'rw' if exists else 'rwc'}"
        conn = sqlite3.connect(uri, uri=True, isolation_level=None, check_same_thread=False,
                               timeout=BUSY_TIMEOUT_MS / 1000, cached_statements=512)
        conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        return conn

    def _check_schema(self) -> None:
        """Refuse, without writing, a file written by a newer leasetree or by something else."""
        conn = self._db()
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise BackendConfigError(
                f"sqlite database {self.path}: schema version {version} is newer than this leasetree "
                f"understands ({SCHEMA_VERSION}); upgrade leasetree")
        # Our own tables at version 0 are another process's schema creation seen mid-way (the
        # switch to WAL lets a reader in between): not foreign; _migrate settles it under the lock.
        if version == 0 and conn.execute(
                "SELECT count(*) FROM sqlite_master WHERE name NOT LIKE 'sqlite_%' "
                "AND name NOT IN ('tasks', 'tasks_visible', 'tasks_tag')").fetchone()[0]:
            raise BackendConfigError(
                f"sqlite database {self.path}: holds other tables and is not a leasetree queue")

    def _set_pragmas(self) -> None:
        conn = self._db()
        mode = self._switch_to_wal(conn)
        if str(mode).lower() != "wal":
            raise BackendConfigError(
                f"sqlite database {self.path}: cannot use WAL mode (got {mode!r}); use a local disk")
        # NORMAL under WAL: a commit survives a process crash; only an OS crash may lose the last ones
        conn.execute("PRAGMA synchronous = NORMAL")
        conn.execute(f"PRAGMA cache_size = -{CACHE_KIB}")
        conn.execute("PRAGMA temp_store = MEMORY")
        # Debian builds default to secure_delete=ON, which zeroes a big payload's overflow pages in
        # the WAL on every ack; FAST still zeroes deleted cells, but only where no extra I/O is needed
        conn.execute("PRAGMA secure_delete = FAST")

    def _switch_to_wal(self, conn: sqlite3.Connection) -> str:
        """``PRAGMA journal_mode = WAL``, waiting out other openers of a new file: the switch
        needs the file to itself and answers SQLITE_BUSY at once, without the busy handler, when
        another connection is switching it too (4 threads opening one new file lost about one
        race in a hundred). On a file already in WAL mode it takes no lock and never waits."""
        deadline = time.monotonic() + BUSY_TIMEOUT_MS / 1000
        pause = 0.001
        while True:
            try:
                return str(conn.execute("PRAGMA journal_mode = WAL").fetchone()[0])
            except sqlite3.OperationalError as exc:
                code = getattr(exc, "sqlite_errorcode", 0) & 0xFF
                if code not in (_BUSY, _LOCKED) or time.monotonic() > deadline:
                    raise
            time.sleep(pause)  # a retry's backoff: the other opener finishes in a millisecond or so
            pause = min(pause * 2, 0.05)

    def _migrate(self) -> None:
        conn = self._db()
        if conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION:
            return
        with self._write():
            # re-read under the write lock: another process may have migrated meanwhile
            self._check_schema()
            if conn.execute("PRAGMA user_version").fetchone()[0] == 0:
                for statement in _SCHEMA:  # not executescript: it would COMMIT our transaction
                    conn.execute(statement)
                conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            # later schema versions add their steps here, each from the version before

    def _db(self) -> sqlite3.Connection:
        if self._conn is None:
            raise BackendUnavailable(f"sqlite database {self.path}: backend is closed")
        return self._conn

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """One write transaction; sqlite errors become BackendUnavailable or BackendConfigError."""
        conn = self._db()
        try:
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield conn
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
        except sqlite3.DatabaseError as exc:
            raise self._mapped(exc) from None

    @contextmanager
    def _read(self) -> Iterator[sqlite3.Connection]:
        try:
            yield self._db()
        except sqlite3.DatabaseError as exc:
            raise self._mapped(exc) from None

    def _mapped(self, exc: sqlite3.DatabaseError) -> BackendError:
        code = getattr(exc, "sqlite_errorcode", 0) & 0xFF
        if code in (_READONLY, _CORRUPT, _NOTADB, _CANTOPEN):
            return BackendConfigError(f"sqlite database {self.path}: {exc}")
        # busy/locked past busy_timeout, disk full, I/O errors: the caller retries with backoff
        return BackendUnavailable(f"sqlite database {self.path}: {exc}")

    @property
    def limits(self) -> Limits:
        return self._limits

    # -- the data path -------------------------------------------------------------------------
    def lease(self, max_tasks: int, lease_secs: float, wait_secs: float = 0.0,
              tag: str | None = None) -> list[Leased]:
        max_tasks = min(max_tasks, self._limits.max_lease_batch)
        if max_tasks <= 0:
            return []
        lease_secs = self.clamp_lease(lease_secs)
        if wait_secs <= 0:
            return self._lease_once(max_tasks, lease_secs, tag)
        deadline = time.monotonic() + wait_secs
        while True:
            # read the version before looking, so a commit between the two is not missed
            version = self._data_version()
            leased = self._lease_once(max_tasks, lease_secs, tag)
            if leased or not self._wait_for_change(version, deadline, tag):
                return leased

    def _lease_once(self, max_tasks: int, lease_secs: float, tag: str | None) -> list[Leased]:
        where, key = self._tag_filter(tag, "<=")
        with self._write() as conn:
            now = self._clock()
            rows = conn.execute(_LEASE.format(where=where), (now + lease_secs, *key, now, max_tasks)
                                ).fetchall()
        rows.sort()
        return [Leased(str(i), f"{i}.{token}", payload, attempt, tg or "")
                for i, token, payload, attempt, tg in rows]

    def _tag_filter(self, tag: str | None, op: str) -> tuple[str, tuple]:
        """The WHERE clause (up to the time, compared with ``op``) and its parameters for ``tag``."""
        if tag in _TAG_WHERE:
            return _TAG_WHERE[tag].format(op=op), (self.queue,)
        return _TAG_WHERE_ONE.format(op=op), (self.queue, tag)

    def _data_version(self) -> int:
        """A number that changes when another connection commits (never for our own commits)."""
        with self._read() as conn:
            return conn.execute("PRAGMA data_version").fetchone()[0]

    def _wait_for_change(self, version: int, deadline: float, tag: str | None) -> bool:
        """Sleep in steps (POLL_SECS growing to POLL_MAX_SECS) until the data version differs from
        ``version`` or a task falls due (True), or until ``deadline`` on the monotonic clock (False)."""
        step = POLL_SECS
        with self._read() as conn:
            due = self._next_due(conn, tag)
            while True:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                time.sleep(min(step, remaining))
                step = min(POLL_MAX_SECS, step * 1.5)
                if due is not None and self._clock() >= due:
                    return True
                now_version = conn.execute("PRAGMA data_version").fetchone()[0]
                if now_version != version:
                    # someone committed: wake only if it made work ready (acks elsewhere do not),
                    # so that a waiting lease takes the write lock only when it may get something
                    version = now_version
                    if self._has_ready(conn, tag):
                        return True
                    due = self._next_due(conn, tag)

    def _has_ready(self, conn: sqlite3.Connection, tag: str | None) -> bool:
        where, key = self._tag_filter(tag, "<=")
        return conn.execute(f"SELECT 1 FROM tasks WHERE {where} LIMIT 1", (*key, self._clock())
                            ).fetchone() is not None

    def _next_due(self, conn: sqlite3.Connection, tag: str | None) -> float | None:
        """When the next delayed task or lease falls due (wall clock), None if nothing will."""
        where, key = self._tag_filter(tag, ">")
        return conn.execute(f"SELECT min(visible_at) FROM tasks WHERE {where}", (*key, self._clock())
                            ).fetchone()[0]

    def wait_for_work(self, timeout_secs: float) -> bool:
        version = self._data_version()
        with self._read() as conn:
            if self._has_ready(conn, None):
                return True
        return self._wait_for_change(version, time.monotonic() + max(0.0, timeout_secs), None)

    def _settle(self, receipts: Sequence[str], sql: str, params: tuple) -> dict[str, Outcome]:
        """Run ``sql`` (with ``{ids}``/``{tokens}`` IN-lists, returning id, token) on the receipts' tasks;
        OK for each receipt whose task matched, LOST for the rest."""
        parsed = {receipt: _parse_receipt(receipt) for receipt in receipts}
        fences = [fence for fence in parsed.values() if fence is not None]
        done: set[tuple[int, int]] = set()
        if fences:
            with self._write() as conn:
                for chunk in _chunks(fences):
                    ids, tokens = (_padded(column) for column in zip(*chunk, strict=True))
                    statement = sql.format(ids=_marks(len(ids)), tokens=_marks(len(tokens)))
                    # ids IN (...) AND token IN (...) fences exactly: a token is drawn for one
                    # delivery of one task, so a row's current token is listed only if its receipt is
                    done.update(conn.execute(statement, (*params, self.queue, *ids, *tokens)))
        return {receipt: Outcome.OK if fence in done else Outcome.LOST for receipt, fence in parsed.items()}

    def extend(self, receipts: Sequence[str], lease_secs: float) -> dict[str, Outcome]:
        until = self._clock() + self.clamp_lease(lease_secs)
        return self._settle(receipts, "UPDATE tasks SET visible_at = ? WHERE +queue = ? AND id IN ({ids}) "
                                      "AND token IN ({tokens}) AND leased = 1 RETURNING id, token", (until,))

    def ack(self, receipts: Sequence[str]) -> dict[str, Outcome]:
        return self._settle(receipts, "DELETE FROM tasks WHERE +queue = ? AND id IN ({ids}) "
                                      "AND token IN ({tokens}) AND leased = 1 RETURNING id, token", ())

    def release(self, receipts: Sequence[str], delay_secs: float | Sequence[float] = 0.0,
                errors: Sequence[str] | None = None, count_attempt: bool = True) -> dict[str, Outcome]:
        delays = per_item(delay_secs, len(receipts), "release delay_secs")
        errs = per_item(errors, len(receipts), "release errors") if errors is not None else None
        now = self._clock()
        rows = []
        for i, receipt in enumerate(receipts):
            err = errs[i] if errs is not None else None
            rows.append((now + max(0.0, float(delays[i])), err, receipt))
        return self._settle_each(
            rows, "UPDATE tasks SET visible_at = ?, leased = 0, token = random(), "
                  "last_error = coalesce(?, last_error)"
                  + ("" if count_attempt else ", attempt = max(attempt - 1, 0)")
                  + " WHERE +queue = ? AND id = ? AND token = ? AND leased = 1")

    def dead_letter(self, receipts: Sequence[str], reason: str | Sequence[str]) -> dict[str, Outcome]:
        reasons = per_item(reason, len(receipts), "dead_letter reason")
        return self._settle_each(
            [(reasons[i], receipt) for i, receipt in enumerate(receipts)],
            "UPDATE tasks SET visible_at = NULL, leased = 0, token = random(), dead_reason = ? "
            "WHERE +queue = ? AND id = ? AND token = ? AND leased = 1")

    def _settle_each(self, rows: list[tuple], sql: str) -> dict[str, Outcome]:
        """Run ``sql`` once per receipt (rows end with the receipt; its values come first), all in
        one transaction; OK where it changed a row."""
        out = {row[-1]: Outcome.LOST for row in rows}
        parsed = []
        for row in rows:
            fence = _parse_receipt(row[-1])
            if fence is not None:
                parsed.append((row[-1], (*row[:-1], self.queue, *fence)))
        if parsed:
            with self._write() as conn:
                for receipt, params in parsed:
                    if conn.execute(sql, params).rowcount == 1:
                        out[receipt] = Outcome.OK
        return out

    def enqueue(self, payloads: Sequence[bytes], delay_secs: float = 0.0, tag: str = "") -> list[str]:
        cap = self._limits.max_payload_bytes
        for payload in payloads:
            if len(payload) > cap:
                raise ValueError(f"payload of {len(payload)} bytes is over the {cap}-byte limit")
        if not payloads:
            return []
        now = self._clock()
        visible = now + max(0.0, delay_secs)
        with self._write() as conn:
            conn.executemany(
                "INSERT INTO tasks (queue, tag, payload, enqueued_at, visible_at, token) "
                "VALUES (?, ?, ?, ?, ?, random())",
                ((self.queue, tag or None, payload, now, visible) for payload in payloads))
            # under the write lock AUTOINCREMENT hands out consecutive ids
            last = conn.execute("SELECT last_insert_rowid()").fetchone()[0]
        first = last - len(payloads) + 1
        return [str(i) for i in range(first, last + 1)]

    def stats(self) -> QueueStats:
        with self._read() as conn:
            now = self._clock()
            q = self.queue
            ready = conn.execute("SELECT count(*) FROM tasks WHERE queue = ? AND visible_at <= ?",
                                 (q, now)).fetchone()[0]
            later = dict(conn.execute("SELECT leased, count(*) FROM tasks WHERE queue = ? AND visible_at > ? "
                                      "GROUP BY leased", (q, now)).fetchall())
            dead = conn.execute("SELECT count(*) FROM tasks WHERE queue = ? AND visible_at IS NULL",
                                (q,)).fetchone()[0]
            # ids grow with enqueue time: walk the table from its oldest row to the first live task
            # of this queue (the + keeps the planner off the indexes, which would sort them all)
            oldest = conn.execute("SELECT enqueued_at FROM tasks WHERE +queue = ? "
                                  "AND +visible_at IS NOT NULL ORDER BY id LIMIT 1", (q,)).fetchone()
        return QueueStats(ready, later.get(1, 0), later.get(0, 0), dead,
                          None if oldest is None else max(0.0, now - oldest[0]))

    # -- admin ---------------------------------------------------------------------------------
    @staticmethod
    def _info(row: tuple, now: float) -> TaskInfo:
        task_id, payload, attempt, tag, enqueued_at, visible_at, leased, last_error, dead_reason = row
        if visible_at is None:
            state = TaskState.DEAD
        elif visible_at <= now:
            state, visible_at = TaskState.READY, None
        else:
            state = TaskState.LEASED if leased else TaskState.DELAYED
        return TaskInfo(str(task_id), state, payload, attempt, tag or "", enqueued_at, visible_at,
                        last_error, dead_reason)

    def list_tasks(self, state: TaskState | None = None, limit: int = 100) -> list[TaskInfo]:
        where = {
            None: "",
            TaskState.READY: "AND visible_at <= :now",
            TaskState.LEASED: "AND visible_at > :now AND leased = 1",
            TaskState.DELAYED: "AND visible_at > :now AND leased = 0",
            TaskState.DEAD: "AND visible_at IS NULL",
        }[state]
        with self._read() as conn:
            now = self._clock()
            rows = conn.execute(f"SELECT {_COLUMNS} FROM tasks WHERE queue = :q {where} ORDER BY id LIMIT :n",
                                {"q": self.queue, "now": now, "n": max(0, limit)}).fetchall()
        return [self._info(row, now) for row in rows]

    def get(self, task_id: str) -> TaskInfo | None:
        if not task_id.isdigit() or int(task_id) not in _INT64:
            return None
        with self._read() as conn:
            row = conn.execute(f"SELECT {_COLUMNS} FROM tasks WHERE queue = ? AND id = ?",
                               (self.queue, int(task_id))).fetchone()
        return None if row is None else self._info(row, self._clock())

    @staticmethod
    def _ids(task_ids: Sequence[str]) -> list[int]:
        return [int(t) for t in task_ids if t.isdigit() and int(t) in _INT64]

    def delete(self, task_ids: Sequence[str]) -> int:
        ids = self._ids(task_ids)
        if not ids:
            return 0
        with self._write() as conn:
            return sum(conn.execute(f"DELETE FROM tasks WHERE queue = ? AND id IN ({_marks(len(chunk))})",
                                    (self.queue, *chunk)).rowcount for chunk in _chunks(ids))

    def requeue_dead(self, task_ids: Sequence[str] | None = None) -> int:
        sql = ("UPDATE tasks SET visible_at = ?, attempt = 0, dead_reason = '' "
               "WHERE queue = ? AND visible_at IS NULL")
        params = (self._clock(), self.queue)
        with self._write() as conn:
            if task_ids is None:
                return conn.execute(sql, params).rowcount
            return sum(conn.execute(f"{sql} AND id IN ({_marks(len(chunk))})", (*params, *chunk)).rowcount
                       for chunk in _chunks(self._ids(task_ids)))

    def purge(self) -> int:
        with self._write() as conn:
            return conn.execute("DELETE FROM tasks WHERE queue = ?", (self.queue,)).rowcount

    def close(self) -> None:
        if self._conn is not None:
            conn, self._conn = self._conn, None
            conn.close()


