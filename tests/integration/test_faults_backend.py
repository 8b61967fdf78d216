"""The SQLite backend under real storage faults: a file made read-only while in use, and a full disk.

What each fault is, as the backend reports it (docs/guarantees.md has the table):
- A handle that is already open and finds its writes refused (``chattr +i``: the kernel's EPERM, seen
  by SQLite as a disk I/O error) or the disk full: ``BackendUnavailable``. Nothing is known to have
  happened, the caller retries with backoff, and the same handle works again once the operator
  fixes the file or frees space. A running tree rides it out (warnings, no restarts).
- Opening the database while it is read-only (mode bits, even for root; immutable; read-only
  mount) or, for a new file, while the disk is full: ``BackendConfigError``, one line naming the path.
  That is what a starting tree (exit 2) and ``supervise enqueue`` report.
- ``chmod 0444`` while a handle is open changes nothing for that handle: permission is checked when
  a file is opened, and SQLite keeps its descriptors.
Every test ends with ``PRAGMA integrity_check`` and an account of every task enqueued.

The ``test_tree_*`` cases do the same under a running tree draining tasks: the disk fills or the file
turns immutable mid-run, then is repaired; the root must not give up and no task is lost or run twice.
A child that restarts during the fault cannot open the file and its failed restarts use up the
restart intensity at once (a strict xfail records it).

The full-disk tests mount a 2 MiB tmpfs (root here); they skip, saying why, where mount is not allowed.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from children.backends import BackendConfigError, BackendError, BackendUnavailable, Outcome
from children.backends.sqlite import SqliteBackend

pytestmark = pytest.mark.timeout(60)

PAYLOAD = 20_000  # bytes: a 2 MiB disk fills after ~55 of these


def url(path: Path) -> str:
    return f"sqlite:///{path}"  # path is absolute: four slashes in all


def integrity(path: Path) -> str:
    with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as conn:
        return conn.execute("PRAGMA integrity_check").fetchone()[0]


def ids_in(path: Path) -> set[str]:
    with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as conn:
        return {str(row[0]) for row in conn.execute("SELECT id FROM tasks")}


def one_line(exc: BaseException) -> str:
    text = str(exc)
    assert text and "\n" not in text and "Traceback" not in text, text
    return text


@contextlib.contextmanager
def immutable(*paths: Path) -> Iterator[None]:
    """``chattr +i`` on ``paths`` for the block; always undone, or tmp_path could not be removed."""
    done = subprocess.run(["chattr", "+i", *map(str, paths)], capture_output=True, text=True)
    try:
        if done.returncode != 0:
            pytest.skip(f"chattr +i not possible here: {done.stderr.strip()}")
        yield
    finally:
        subprocess.run(["chattr", "-i", *map(str, paths)], capture_output=True)


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 2 MiB tmpfs, unmounted afterwards (lazily if a test left a file open)."""
    folder = tmp_path / "disk"
    folder.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(folder)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip() or done.returncode}")
    try:
        yield folder
    finally:
        if subprocess.run(["umount", str(folder)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(folder)], capture_output=True)


def resize(folder: Path, size: str) -> None:
    subprocess.run(["mount", "-o", f"remount,size={size}", str(folder)], check=True, capture_output=True)


def fill(folder: Path) -> Path:
    """Write a filler file until the disk refuses: the disk is then full to the last block."""
    filler = folder / "filler"
    with open(filler, "wb", buffering=0) as handle:
        with contextlib.suppress(OSError):
            while True:
                handle.write(b"\0" * 4096)
    return filler


# -- read-only while in use --------------------------------------------------------------------

def test_immutable_mid_use_refuses_writes_as_unavailable_and_recovers(tmp_path: Path) -> None:
    db = tmp_path / "tasks.db"
    backend = SqliteBackend(url(db), "q")
    enqueued = set(backend.enqueue([b"t%d" % i for i in range(20)]))
    held = backend.lease(5, 60)
    # not -shm: SQLite writes it through mmap, and an immutable one kills the process with SIGBUS
    with immutable(db, db.with_name("tasks.db-wal")):
        for name, call in [("ack", lambda: backend.ack([held[0].receipt])),
                           ("lease", lambda: backend.lease(5, 60)),
                           ("extend", lambda: backend.extend([held[1].receipt], 60)),
                           ("release", lambda: backend.release([held[2].receipt], 0.0)),
                           ("enqueue", lambda: backend.enqueue([b"more"]))]:
            with pytest.raises(BackendUnavailable) as info:
                call()
            assert str(db) in one_line(info.value), name
        assert backend.stats().leased == 5  # reads still work
        with pytest.raises(BackendConfigError) as info:
            SqliteBackend(url(db), "q")  # a process starting now (a restarted child, the CLI)
        assert one_line(info.value) == f"sqlite database {db}: file is read-only; make it writable"
    # the operator fixed it: the very same handle retries the same calls and they go through
    assert backend.ack([held[0].receipt]) == {held[0].receipt: Outcome.OK}
    assert backend.extend([held[1].receipt], 60) == {held[1].receipt: Outcome.OK}
    assert backend.release([held[2].receipt], 0.0) == {held[2].receipt: Outcome.OK}
    backend.close()
    assert integrity(db) == "ok"
    assert ids_in(db) == enqueued - {held[0].task_id}


def test_chmod_read_only_mid_use_is_refused_at_the_next_open(tmp_path: Path) -> None:
    db = tmp_path / "tasks.db"
    backend = SqliteBackend(url(db), "q")
    enqueued = set(backend.enqueue([b"a", b"b", b"c"]))
    (task,) = backend.lease(1, 60)
    db.chmod(0o444)
    try:
        # the open handle is not affected: its descriptors were opened read-write
        assert backend.ack([task.receipt]) == {task.receipt: Outcome.OK}
        with pytest.raises(BackendConfigError) as info:
            SqliteBackend(url(db), "q")
        assert one_line(info.value) == f"sqlite database {db}: file is read-only; make it writable"
    finally:
        db.chmod(0o644)
    with SqliteBackend(url(db), "q") as again:
        assert {t.task_id for t in again.lease(10, 60)} == enqueued - {task.task_id}
    backend.close()
    assert integrity(db) == "ok"


# -- a full disk -------------------------------------------------------------------------------

def test_disk_filled_by_the_queue_itself_loses_no_acknowledged_enqueue(small_disk: Path) -> None:
    db = small_disk / "tasks.db"
    backend = SqliteBackend(url(db), "q")
    enqueued: list[str] = []
    with pytest.raises(BackendUnavailable) as info:
        for _ in range(1000):
            enqueued += backend.enqueue([os.urandom(PAYLOAD)])
    assert one_line(info.value) == f"sqlite database {db}: database or disk is full"
    assert 20 < len(enqueued) < 1000
    # full: every write is refused the same way, reads still answer
    with pytest.raises(BackendUnavailable):
        backend.lease(10, 60)
    assert backend.stats().ready == len(enqueued)
    assert integrity(db) == "ok"
    assert ids_in(db) == set(enqueued)  # every enqueue that returned ids is there; no half task
    resize(small_disk, "8m")  # the operator gives it room
    enqueued += backend.enqueue([os.urandom(PAYLOAD)] * 5)
    leased = backend.lease(1000, 60)
    assert sorted((t.task_id for t in leased), key=int) == sorted(enqueued, key=int)
    assert set(backend.ack([t.receipt for t in leased]).values()) == {Outcome.OK}
    backend.close()
    assert integrity(db) == "ok" and ids_in(db) == set()


def test_disk_full_mid_use_settlements_are_retried_once_there_is_room(small_disk: Path) -> None:
    db = small_disk / "tasks.db"
    backend = SqliteBackend(url(db), "q")
    enqueued = backend.enqueue([b"p%d" % i for i in range(60)])
    held = backend.lease(30, 60)
    filler = fill(small_disk)
    calls = {"ack": lambda: backend.ack([t.receipt for t in held[:10]]),
             "release": lambda: backend.release([t.receipt for t in held[10:20]], 0.0, ["disk full"] * 10),
             "dead_letter": lambda: backend.dead_letter([t.receipt for t in held[20:25]], "poison"),
             "extend": lambda: backend.extend([t.receipt for t in held[25:]], 60),
             "enqueue": lambda: backend.enqueue([os.urandom(PAYLOAD)])}
    failed = []
    for name, call in calls.items():
        try:
            call()  # a settlement may still fit in WAL pages already allocated
        except BackendUnavailable as exc:
            assert "database or disk is full" in one_line(exc), name
            failed.append(name)
    assert "enqueue" in failed  # a 20 kB row cannot fit on a disk with no free block
    assert integrity(db) == "ok"
    filler.unlink()
    # the reaper's way: the same calls again; idempotent, so a call that did land answers LOST
    for name in failed:
        if name != "enqueue":
            calls[name]()
    stats = backend.stats()
    assert (stats.ready, stats.leased, stats.dead) == (60 - 10 - 5 - 5, 5, 5)
    assert ids_in(db) == set(enqueued) - {t.task_id for t in held[:10]}
    backend.close()
    assert integrity(db) == "ok"


def test_new_database_on_a_full_disk_is_a_config_error(small_disk: Path) -> None:
    fill(small_disk)
    db = small_disk / "tasks.db"
    with pytest.raises(BackendError) as info:
        SqliteBackend(url(db), "q")
    assert isinstance(info.value, BackendConfigError)
    assert one_line(info.value).startswith(f"sqlite database {db}: ")


# -- the same faults under a running tree -------------------------------------------------------

def _tree_config(folder: Path, db: Path, supervisor: dict | None = None) -> Path:
    from tests.integration.harness import write_config

    # a long lease: the fault outlasts no lease, so every duplicate would be a bug, not an expiry
    return write_config(folder, queue={"url": url(db)}, leaser={"lease_secs": 30},
                        supervisor=supervisor or {"intensity": 3, "period_secs": 60})


def _ran_everything(record: Path, count: int) -> bool:
    from tests.integration.harness import records

    return len(records(record)) == count


def _drained(db: Path) -> bool:
    with SqliteBackend(url(db), "default") as backend:
        stats = backend.stats()
    return (stats.ready, stats.leased, stats.delayed, stats.dead) == (0, 0, 0, 0)


def _backend_errors(status: dict | None, child: str) -> int:
    return int(((status or {}).get("stats", {}).get(child) or {}).get("backend_errors_total", 0))


def _ride_out(tmp_path: Path, db: Path, fault, repair, warning: str) -> None:
    """Run a tree draining 300 tasks from ``db``, start ``fault()`` once a third has run, keep it
    until the leaser has failed 4 leases in a row (backoff 0.2 + 0.4 + 0.8 s) and leaser and
    reaper logged ``warning``, then ``repair()``: the root must not give up, no child restart,
    every task ran exactly once and the queue ends empty and intact."""
    from tests.integration.harness import RunningTree, enqueue, records, wait_until

    config = _tree_config(tmp_path, db)
    record = tmp_path / "runs.txt"
    count = 300
    enqueue(config, ["sleep:0.01"] * count)
    with RunningTree(config, record) as tree:
        tree.wait_ready()
        pids = tree.child_pids()
        wait_until(lambda: len(records(record)) >= count // 3, 60, "a third of the tasks to run")
        fault()
        try:
            wait_until(lambda: _backend_errors(tree.status(), "leaser") >= 4, 30, "4 failed leases")
            output = tree.output()
            for child in ("leaser", "reaper"):
                assert any(f"root/{child}[" in line and warning in line and "WARNING" in line
                           for line in output.splitlines()), output
            assert tree.process.poll() is None, tree.output()
            stuck = len(records(record))
        finally:
            repair()
        assert stuck < count, "the fault stopped nothing: it was not a fault"
        wait_until(lambda: _ran_everything(record, count) and _drained(db), 60, "every task acked")
        assert tree.process.poll() is None, tree.output()
        assert tree.child_pids() == pids, tree.output()  # nobody crashed, nobody was restarted
        output = tree.output()
        assert "Traceback" not in output and "giving up" not in output, output
    runs = records(record)
    assert len(runs) == count and set(runs.values()) == {1}, runs.most_common(3)
    assert integrity(db) == "ok" and ids_in(db) == set()


def test_tree_rides_out_a_disk_that_fills_mid_run(tmp_path: Path, small_disk: Path) -> None:
    resize(small_disk, "4m")
    db = small_disk / "tasks.db"
    filler: list[Path] = []
    _ride_out(tmp_path, db, fault=lambda: filler.append(fill(small_disk)),
              repair=lambda: [path.unlink() for path in filler], warning="database or disk is full")


def test_tree_rides_out_a_database_made_read_only_mid_run(tmp_path: Path) -> None:
    db = tmp_path / "tasks.db"
    files = [str(db), str(db.with_name("tasks.db-wal"))]  # not -shm: see immutable()

    def fault() -> None:
        done = subprocess.run(["chattr", "+i", *files], capture_output=True, text=True)
        if done.returncode != 0:
            pytest.skip(f"chattr +i not possible here: {done.stderr.strip()}")

    _ride_out(tmp_path, db, fault=fault,
              repair=lambda: subprocess.run(["chattr", "-i", *files], capture_output=True),
              warning="disk I/O error")


def test_leaser_and_reaper_restarted_while_the_database_is_read_only_do_not_make_the_root_give_up(
        tmp_path: Path) -> None:
    """The leaser and the reaper are SIGKILLed while the file is immutable: their restarts cannot
    open the database (``file is read-only``), a transient fault that the operator then repairs.
    Failing the start would be retried at once and spend the root's intensity (10/60 s) in a
    second; each starts anyway and retries the open with backoff, and once the file is writable
    the tree drains everything."""
    from tests.integration.harness import RunningTree, enqueue, records, wait_until

    db = tmp_path / "tasks.db"
    files = [str(db), str(db.with_name("tasks.db-wal"))]
    config = _tree_config(tmp_path, db, supervisor={"intensity": 10, "period_secs": 60,
                                                    "shutdown_secs": 2})
    record = tmp_path / "runs.txt"
    count = 100
    enqueue(config, ["sleep:0.01"] * count)
    with RunningTree(config, record) as tree:
        tree.wait_ready()
        wait_until(lambda: len(records(record)) >= 10, 60, "some tasks to run")
        done = subprocess.run(["chattr", "+i", *files], capture_output=True, text=True)
        if done.returncode != 0:
            pytest.skip(f"chattr +i not possible here: {done.stderr.strip()}")
        try:
            pids = tree.child_pids()
            os.kill(pids["leaser"], 9)
            os.kill(pids["reaper"], 9)

            def alive() -> bool:
                output = tree.output()
                gave_up = tree.process.poll() is not None or "reached_max_restart_intensity" in output
                assert not gave_up, f"the root gave up: {output}"
                return True
            # the restart meets the fault, and starts anyway (children/backends/deferred.py)
            wait_until(lambda: alive() and "leaser: queue not open yet" in tree.output()
                       and "reaper: queue not open yet" in tree.output(), 30,
                       "the restarted leaser and reaper to meet the read-only file")
            # the fault lasts 2 s from there: an operator's repair is seconds, not microseconds
            since = time.monotonic()
            wait_until(lambda: alive() and time.monotonic() - since > 2.0, 30, "2 s of the fault")
        finally:
            subprocess.run(["chattr", "-i", *files], capture_output=True)
        wait_until(lambda: alive() and _ran_everything(record, count) and _drained(db), 60,
                   "every task acked")
    assert integrity(db) == "ok"
