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

The full-disk tests mount a 2 MiB tmpfs (root here); they skip, saying why, where mount is not allowed.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import subprocess
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
