"""What only the SQLite backend promises: its file checks, its WAL mode, several processes and
queues on one file, and fencing across connections. The common contract is in
test_backend_conformance.py."""

from __future__ import annotations

import hashlib
import multiprocessing
import os
import re
import sqlite3
import threading
from collections.abc import Callable
from pathlib import Path

import pytest

import children.backends.sqlite as sqlite_backend
from children.backends import open_backend
from children.backends.base import BackendConfigError, BackendUnavailable, Outcome, TaskState
from children.backends.sqlite import SCHEMA_VERSION, SqliteBackend

pytestmark = pytest.mark.timeout(60)


def snapshot(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` with a hash of its bytes: proof that nothing was written."""
    out = {}
    for path in sorted(folder.rglob("*")):
        out[str(path.relative_to(folder))] = (
            "dir" if path.is_dir() else hashlib.sha256(path.read_bytes()).hexdigest())
    return out


def open_at(folder: Path, name: str = "tasks.db", queue: str = "default") -> SqliteBackend:
    return SqliteBackend(f"sqlite:///{name}", queue, folder)


def expect_config_error(folder: Path, url: str, *words: str) -> str:
    """Opening ``url`` fails with a one-line BackendConfigError holding ``words``, writing nothing."""
    before = snapshot(folder)
    with pytest.raises(BackendConfigError) as caught:
        SqliteBackend(url, "default", folder)
    message = str(caught.value)
    assert "\n" not in message
    for word in words:
        assert word in message, message
    assert snapshot(folder) == before
    return message


# -- bad input: one line, nothing written ----------------------------------------------------------
def test_missing_folder_is_named_and_not_created(tmp_path: Path) -> None:
    message = expect_config_error(tmp_path, "sqlite:///no/such/folder/tasks.db", "does not exist")
    assert str(tmp_path / "no" / "such" / "folder") in message
    assert not (tmp_path / "no").exists()


def test_directory_instead_of_file(tmp_path: Path) -> None:
    (tmp_path / "tasks.db").mkdir()
    expect_config_error(tmp_path, "sqlite:///tasks.db", str(tmp_path / "tasks.db"), "directory")


def test_file_that_is_not_a_database(tmp_path: Path) -> None:
    (tmp_path / "tasks.db").write_bytes(b"this is a text file, not a database\n" * 200)
    expect_config_error(tmp_path, "sqlite:///tasks.db", str(tmp_path / "tasks.db"), "not an SQLite database")


def test_file_with_a_sqlite_header_and_garbage_after(tmp_path: Path) -> None:
    (tmp_path / "tasks.db").write_bytes(b"SQLite format 3\x00" + os.urandom(8192))
    expect_config_error(tmp_path, "sqlite:///tasks.db", str(tmp_path / "tasks.db"))


def test_read_only_file(tmp_path: Path) -> None:
    with open_at(tmp_path) as backend:
        backend.enqueue([b"kept"])
    path = tmp_path / "tasks.db"
    path.chmod(0o444)
    try:
        expect_config_error(tmp_path, "sqlite:///tasks.db", str(path), "read-only")
    finally:
        path.chmod(0o644)
    with open_at(tmp_path) as backend:
        assert backend.stats().ready == 1


def test_database_of_something_else_is_left_alone(tmp_path: Path) -> None:
    conn = sqlite3.connect(tmp_path / "tasks.db")
    conn.execute("CREATE TABLE accounts (id INTEGER)")
    conn.commit()
    conn.close()
    expect_config_error(tmp_path, "sqlite:///tasks.db", "not a leasetree queue")


def test_database_from_a_newer_version_is_refused(tmp_path: Path) -> None:
    open_at(tmp_path).close()
    conn = sqlite3.connect(tmp_path / "tasks.db")
    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    conn.commit()
    conn.close()
    expect_config_error(tmp_path, "sqlite:///tasks.db", "newer", "upgrade leasetree")


@pytest.mark.parametrize("url", [
    "sqlite://", "sqlite:///", "sqlite://host/tasks.db", "sqlite:///tasks.db?mode=ro", "sqlite:///dir/",
])
def test_malformed_urls(tmp_path: Path, url: str) -> None:
    expect_config_error(tmp_path, url, "queue.url")


# -- opening ---------------------------------------------------------------------------------------
def test_relative_and_absolute_paths(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    with open_backend("sqlite:///sub/tasks.db", "q", tmp_path) as backend:
        backend.enqueue([b"x"])
    absolute = tmp_path / "sub" / "tasks.db"
    with open_backend(f"sqlite:///{absolute}", "q", Path("/nonexistent")) as backend:
        assert backend.stats().ready == 1


def test_wal_mode_and_schema_version(tmp_path: Path) -> None:
    open_at(tmp_path).close()
    conn = sqlite3.connect(tmp_path / "tasks.db")
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    conn.close()


def test_database_locked_past_the_timeout_is_unavailable(tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sqlite_backend, "BUSY_TIMEOUT_MS", 50)
    backend = open_at(tmp_path)
    blocker = sqlite3.connect(tmp_path / "tasks.db", isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")
    try:
        with pytest.raises(BackendUnavailable) as caught:
            backend.enqueue([b"x"])
        assert "locked" in str(caught.value) and "\n" not in str(caught.value)
        assert backend.stats().ready == 0  # readers are not blocked under WAL
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()
    assert backend.enqueue([b"x"])  # and the same call succeeds once the lock is gone
    backend.close()


def test_closed_backend_is_unavailable_and_close_is_idempotent(tmp_path: Path) -> None:
    backend = open_at(tmp_path)
    backend.close()
    backend.close()
    with pytest.raises(BackendUnavailable):
        backend.stats()


# -- several holders on one file ---------------------------------------------------------------------
def test_lost_lease_is_fenced_across_connections(tmp_path: Path) -> None:
    first, second = open_at(tmp_path), open_at(tmp_path)
    try:
        [task_id] = first.enqueue([b"job"])
        [old] = first.lease(1, 0.1)
        [new] = second.lease(1, 300.0, wait_secs=10.0)  # wakes when the first lease expires
        assert (new.task_id, new.attempt) == (task_id, 2)
        assert first.ack([old.receipt]) == {old.receipt: Outcome.LOST}
        assert first.extend([old.receipt], 300.0) == {old.receipt: Outcome.LOST}
        info = second.get(task_id)
        assert info is not None and info.state is TaskState.LEASED
        assert second.ack([new.receipt]) == {new.receipt: Outcome.OK}
    finally:
        first.close()
        second.close()


def test_queues_share_a_file_without_mixing(tmp_path: Path) -> None:
    with open_at(tmp_path, queue="tree-a") as a, open_at(tmp_path, queue="tree-b") as b:
        a.enqueue([b"a1", b"a2"])
        b.enqueue([b"b1"], tag="x")
        assert [t.payload for t in b.lease(10, 300.0)] == [b"b1"]
        [task] = a.lease(1, 300.0)
        assert b.ack([task.receipt]) == {task.receipt: Outcome.LOST}  # a receipt of another queue
        assert (a.stats().ready, a.stats().leased, b.stats().leased) == (1, 1, 1)
        assert a.get(task.task_id) is not None and b.get(task.task_id) is None


def _enqueue_and_drain(folder: str, queue: str, count: int, start, results) -> None:
    """Child process: enqueue ``count`` tasks, then lease and ack until the queue is empty."""
    with open_at(Path(folder), queue=queue) as backend:
        start.wait(30)
        ids = []
        for first in range(0, count, 50):
            ids += backend.enqueue([b"p"] * min(50, count - first))
        acked = []
        while leased := backend.lease(20, 300.0):
            outcomes = backend.ack([t.receipt for t in leased])
            acked += [t.task_id for t in leased if outcomes[t.receipt] is Outcome.OK]
        results.put((ids, acked))


def test_two_processes_on_one_file(tmp_path: Path) -> None:
    open_at(tmp_path).close()  # create the schema first, so the children race on data only
    ctx = multiprocessing.get_context("spawn")
    start, results = ctx.Event(), ctx.Queue()
    procs = [ctx.Process(target=_enqueue_and_drain, args=(str(tmp_path), "shared", 500, start, results))
             for _ in range(2)]
    for p in procs:
        p.start()
    start.set()
    outcomes = [results.get(timeout=40) for _ in procs]
    for p in procs:
        p.join(10)
        assert p.exitcode == 0
    enqueued = [i for ids, _ in outcomes for i in ids]
    acked = [i for _, done in outcomes for i in done]
    assert len(set(enqueued)) == len(enqueued) == 1000
    assert sorted(acked, key=int) == sorted(enqueued, key=int)  # each acked exactly once
    with open_at(tmp_path, queue="shared") as backend:
        assert backend.stats().ready == backend.stats().leased == 0


def test_schema_creation_races_safely(tmp_path: Path) -> None:
    errors: list[BaseException] = []

    def opener() -> None:
        try:
            open_at(tmp_path).close()
        except BaseException as exc:  # reported below, where pytest sees it
            errors.append(exc)

    threads = [threading.Thread(target=opener) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert errors == []


# -- storage details ---------------------------------------------------------------------------------
def test_task_ids_increase_and_are_never_reused(tmp_path: Path) -> None:
    with open_at(tmp_path) as backend:
        first = backend.enqueue([b"a", b"b"])
        leased = backend.lease(2, 300.0)
        backend.ack([t.receipt for t in leased])
        second = backend.enqueue([b"c"])
        assert [int(i) for i in first + second] == sorted(int(i) for i in first + second)
        assert int(second[0]) > int(first[-1])


def test_stats_and_lease_use_the_indexes(tmp_path: Path) -> None:
    with open_at(tmp_path) as backend:
        conn = backend._db()
        for tag in (None, "", "x"):
            where, key = backend._tag_filter(tag, "<=")
            plan = conn.execute(f"EXPLAIN QUERY PLAN SELECT id FROM tasks WHERE {where} "
                                f"ORDER BY visible_at LIMIT 5", (*key, 0.0)).fetchall()
            text = " ".join(row[-1] for row in plan)
            assert "USING COVERING INDEX" in text and "TEMP B-TREE" not in text, (tag, text)
        plan = conn.execute("EXPLAIN QUERY PLAN SELECT count(*) FROM tasks WHERE queue = ? "
                            "AND visible_at <= ?", ("default", 0.0)).fetchall()
        assert "COVERING INDEX" in plan[0][-1]


def test_malformed_receipts_and_ids_are_lost_not_errors(tmp_path: Path) -> None:
    with open_at(tmp_path) as backend:
        [task_id] = backend.enqueue([b"job"])
        [task] = backend.lease(1, 300.0)
        bad = ["", "abc", "abc.def", f"{task_id}.0", f"{task_id}", "9" * 30 + ".1", f"{task_id}." + "9" * 30]
        assert backend.ack(bad) == dict.fromkeys(bad, Outcome.LOST)
        assert backend.release(bad, 0.0) == dict.fromkeys(bad, Outcome.LOST)
        assert backend.get("9" * 30) is None and backend.get("x") is None
        assert backend.delete(["9" * 30, "-1", "x"]) == 0
        assert backend.ack([task.receipt]) == {task.receipt: Outcome.OK}



def test_big_payload_is_not_rewritten_by_lease_extend_release_or_ack(tmp_path: Path) -> None:
    with open_at(tmp_path) as backend:
        backend._db().execute("PRAGMA wal_autocheckpoint = 0")  # so the WAL only grows
        wal = tmp_path / "tasks.db-wal"
        backend.enqueue([os.urandom(4 * 1024 * 1024)])

        def written(call: Callable[[], object]) -> int:
            before = wal.stat().st_size
            call()
            return wal.stat().st_size - before

        holder: list[str] = []
        assert written(lambda: holder.append(backend.lease(1, 300.0)[0].receipt)) < 256 * 1024
        assert written(lambda: backend.extend(holder, 300.0)) < 256 * 1024
        assert written(lambda: backend.release(holder, 0.0)) < 256 * 1024
        [again] = backend.lease(1, 300.0)  # attempt 1 -> 2 changes the record's size: rewritten
        assert written(lambda: backend.ack([again.receipt])) < 256 * 1024


def test_batches_beyond_one_statement_are_split(tmp_path: Path) -> None:
    with open_at(tmp_path) as backend:
        ids = backend.enqueue([b"x"] * 2500)
        receipts = []
        while batch := backend.lease(1000, 300.0):
            receipts += [t.receipt for t in batch]
        assert len(receipts) == 2500
        assert set(backend.ack(receipts[:2400]).values()) == {Outcome.OK}
        assert backend.delete(ids) == 100
        assert backend.requeue_dead(ids) == 0


def test_settling_batches_of_every_size_prepares_few_statements(tmp_path: Path) -> None:
    # one statement shape per batch size would fill sqlite3's statement cache with large prepared
    # statements: the reaper's heap grew by 17 MB over a million tasks before IN-lists were padded
    with open_at(tmp_path) as backend:
        backend.enqueue([b"x"] * 300)
        receipts = [t.receipt for t in backend.lease(300, 300.0)]
        statements: set[str] = set()
        backend._db().set_trace_callback(statements.add)
        settled: dict = {}
        for size in range(1, 25):  # 1 + 2 + ... + 24 = 300
            batch, receipts = receipts[:size], receipts[size:]
            settled.update(backend.extend(batch, 60.0))
            settled.update(backend.ack(batch))
        assert set(settled.values()) == {Outcome.OK} and len(settled) == 300
        assert backend.stats().leased == 0
        # the trace shows bound values: numbers back to placeholders gives each statement's shape
        shapes = {re.sub(r"NULL|-?\d+(\.\d+)?", "?", s)
                  for s in statements if s.startswith(("UPDATE", "DELETE"))}
        assert len(shapes) <= 6, shapes  # 8, 16 and 32 places, for extend and for ack
