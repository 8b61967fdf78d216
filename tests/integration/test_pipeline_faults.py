"""The whole tree under faults and bad input: a failing backend, garbage on every socket, awkward
payloads, a bad command, a callable that returns the wrong type. Real processes, real sockets,
a real SQLite queue; faults from ``children/backends/faulty.py`` through the queue URL."""

from __future__ import annotations

import collections
import contextlib
import http.server
import os
import random
import signal
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgpack
import pytest
import zmq

from children.backends import TaskState, open_backend
from config import load
from supervisor.rundir import runtime_dir
from tests.integration.harness import (
    RunningTree,
    enqueue,
    queue_stats,
    records,
    supervise,
    wait_until,
    write_config,
)

pytestmark = pytest.mark.timeout(120)


def settled(config: Path, dead: int = 0) -> bool:
    stats = queue_stats(config)
    return (stats.ready, stats.leased, stats.delayed, stats.dead) == (0, 0, 0, dead)


def restarts(status: dict[str, Any]) -> dict[str, int]:
    return {c["id"]: c.get("restarts", 0) for c in status.get("children", [])}


# -- a backend that keeps failing ---------------------------------------------------------------

# each kind fails on its 2nd call for sure, then at random: 20 % plainly, 5 % after taking effect
FAULTS = ("fail=ack@2,extend@2,lease@2,ack:0.2,extend:0.2,lease:0.2&half=ack:0.05,extend:0.05,lease:0.05"
          "&delay=0.05&seed=7")


def test_tree_on_a_failing_backend_finishes_everything_without_restarts(tmp_path: Path) -> None:
    """A quarter of lease/extend/ack calls fail (a fifth of those after taking effect). Every task
    still runs and is acked, nothing is dead-lettered, and no process restarts: a backend error is
    retried with backoff, not a crash."""
    config = write_config(tmp_path, queue={"url": f"faulty+sqlite:///tasks.db?{FAULTS}"},
                          leaser={"lease_secs": 1.0}, retry={"max_attempts": 20})
    record = tmp_path / "runs.txt"
    count = 300
    # the sleeps outlive a 1 s lease, so extensions happen, and fail, while tasks run
    payloads = ["ok"] * (count - 6) + ["sleep:1.5"] * 6
    with RunningTree(config, record) as tree:
        before = tree.wait_ready()
        pids = tree.child_pids()
        enqueue(config, payloads)
        wait_until(lambda: settled(config), 90, "every task acked")
        status = wait_until(lambda: (s := tree.status()) and s["stats"]["reaper"]["pending"] == 0 and s,
                            10, "the reaper to hold nothing")
        assert tree.child_pids() == pids and restarts(status) == restarts(before)
        output = tree.output()
        for call in ("lease", "extend", "ack"):
            assert f"backend {call} failed" in output, output
        assert "Traceback" not in output
    runs = records(record)
    assert len(runs) == count  # every task ran ...
    duplicates = sum(runs.values()) - count
    # ... and again only where a lost lease let it be leased twice: a handful, not a storm
    assert duplicates <= count // 10, runs.most_common(5)
    # 3 of 4 calls succeed, so a streak of 10 failures in a row means a success did not reset it
    assert "(10 in a row)" not in output, output


def test_kill_9_of_children_on_a_failing_backend_loses_nothing_and_bounds_duplicates(tmp_path: Path) -> None:
    """Both at once: 10 % of backend calls fail and a random worker is SIGKILLed after every 100
    tasks. Nothing is lost, nothing dead-lettered, and a task runs twice only if it was in flight
    at a kill: duplicates <= kills * max_in_flight (DESIGN §3, at-least-once)."""
    in_flight = 8
    config = write_config(
        tmp_path, queue={"url": "faulty+sqlite:///tasks.db?fail=*:0.1&seed=3&delay=0.05"},
        leaser={"lease_secs": 2, "max_in_flight": in_flight}, retry={"max_attempts": 50},
        supervisor={"intensity": 1000, "period_secs": 60})
    record = tmp_path / "runs.txt"
    total, every = 1000, 100
    enqueue(config, ["ok"] * total)
    rng = random.Random(5)
    kills: list[str] = []
    with RunningTree(config, record) as tree:
        tree.wait_ready()
        for step in range(1, total // every):
            wait_until(lambda s=step: sum(records(record).values()) >= s * every, 60, f"{step * every} runs")
            pids = tree.child_pids()
            victim = rng.choice(sorted(pids))
            with contextlib.suppress(ProcessLookupError):
                os.kill(pids[victim], signal.SIGKILL)
                kills.append(victim)
        wait_until(lambda: settled(config), 90, "every task acked after the kills")
        assert tree.process.poll() is None, tree.output()
    runs = records(record)
    assert len(runs) == total and len(kills) >= 8, kills
    duplicates = sum(runs.values()) - total
    assert duplicates <= len(kills) * in_flight, (duplicates, kills)


# -- garbage on every socket --------------------------------------------------------------------

def _nested(depth: int) -> list[Any]:
    value: list[Any] = []
    for _ in range(depth):
        value = [value]
    return value


def garbage_frames(rng: random.Random) -> list[bytes]:
    """Random bytes, truncated msgpack, and valid msgpack of the wrong shape."""
    good = msgpack.packb([1, 23, [["1", "1.2", b"payload", 1, ""]]], use_bin_type=True)
    frames = [b"", bytes(rng.randrange(256) for _ in range(64)), os.urandom(5000), good[:-3], good[:1],
              b"\xc1", b"\xdd\xff\xff\xff\xff",  # a never-used byte; an array claiming 4 G items
              msgpack.packb({"version": 1}), msgpack.packb("hello"), msgpack.packb(None),
              msgpack.packb([1]), msgpack.packb([2, 1, "x", 1]), msgpack.packb([1, 999]),
              msgpack.packb([1, True, "x", 1]), msgpack.packb([1, 1, "only-one-field"]),
              msgpack.packb([1, 20, "x", "executor", 1, 1, [[1, 2]], []]),
              msgpack.packb([1, 23, [[1, 2, 3]]]), msgpack.packb([1, 24, "not a list"]),
              msgpack.packb([1, 26, [1], [2]]), msgpack.packb([1, 10, "status", "not a dict"]),
              msgpack.packb(_nested(500))]
    for _ in range(20):
        frames.append(bytes(rng.randrange(256) for _ in range(rng.randrange(1, 200))))
    return frames


def spray(folder: Path, rng: random.Random) -> int:
    """Send garbage to every socket in the runtime dir through DEALER, REQ and PUSH sockets, several
    frames at a time too, and raw bytes that are not even ZMTP; returns how many sockets were hit."""
    paths = sorted(folder.glob("*.ipc"))
    ctx = zmq.Context()
    try:
        for path in paths:
            for kind in (zmq.DEALER, zmq.REQ, zmq.PUSH):
                sock = ctx.socket(kind)
                sock.setsockopt(zmq.LINGER, 1000)  # let the frames go out before close
                sock.connect(f"ipc://{path}")
                frames = garbage_frames(rng)
                try:
                    if kind == zmq.REQ:  # a REQ must wait for a reply between sends: one multipart
                        sock.send_multipart(frames, zmq.NOBLOCK)
                    else:
                        for frame in frames:
                            sock.send(frame, zmq.NOBLOCK)
                        sock.send_multipart(frames[:3], zmq.NOBLOCK)
                except zmq.Again:
                    pass  # the peer refused this socket type at the handshake (PUSH to a ROUTER)
                finally:
                    sock.close()
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as raw:
                raw.connect(str(path))
                raw.sendall(os.urandom(4096))
    finally:
        ctx.destroy(linger=1000)  # closes whatever is left, and never waits longer than that
    return len(paths)


def test_garbage_on_every_socket_is_dropped_and_nothing_crashes(tmp_path: Path) -> None:
    config = write_config(tmp_path)
    record = tmp_path / "runs.txt"
    with RunningTree(config, record) as tree:
        before = tree.wait_ready()
        pids = tree.child_pids()
        enqueue(config, ["ok"] * 50)
        hit = spray(runtime_dir(config, create=False), random.Random(1))
        assert hit >= 3  # sup, control, leaser at least
        enqueue(config, ["ok"] * 50)
        wait_until(lambda: settled(config), 60, "every task acked")
        status = tree.status()  # the control socket still answers
        assert status is not None and tree.process.poll() is None
        assert tree.child_pids() == pids and restarts(status) == restarts(before)
        output = tree.output()
        assert "dropped" in output and "Traceback" not in output, output
    runs = records(record)
    assert len(runs) == 100 and set(runs.values()) == {1}


# -- payloads, byte-exact through a command ----------------------------------------------------

class Sink(http.server.BaseHTTPRequestHandler):
    posts: dict[str, bytes] = {}

    def do_POST(self) -> None:  # noqa: N802 - the stdlib's name
        Sink.posts[self.path.rsplit("/", 1)[1]] = self.rfile.read(int(self.headers["Content-Length"]))
        self.send_response(200)
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def sink() -> Iterator[str]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Sink)
    Sink.posts = {}
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/out/"
    server.shutdown()


def test_empty_huge_and_binary_payloads_pass_byte_exact(tmp_path: Path, sink: str) -> None:
    payloads = [b"", os.urandom(10 * 1024 * 1024), b"\xff\xfe\x00\x80 not utf-8 \xc3\x28",
                "žluťoučký kůň\n\r\t".encode(), b"\x00" * 1000, b"\n"]
    # /bin/cp INPUT_FILE OUTPUT_FILE: the output is the input, so the posted body must be the payload
    config = write_config(tmp_path, executors={"command": ["/bin/cp"], "output_url": sink})
    cfg = load(config)
    with open_backend(cfg.queue.url, cfg.queue.name, cfg.base_dir) as backend:
        ids = backend.enqueue(payloads)
    with RunningTree(config, burst=True) as tree:
        assert tree.wait_exit(timeout=90) == 0, tree.output()
    assert settled(config)
    assert sorted(Sink.posts) == sorted(ids)
    for task_id, payload in zip(ids, payloads, strict=True):
        assert Sink.posts[task_id] == payload, (task_id, len(payload), len(Sink.posts[task_id]))


# -- a bad command, a bad callable ---------------------------------------------------------------

@pytest.mark.parametrize("case", ["missing", "on_path_missing", "not_executable", "directory"])
def test_unusable_command_is_one_line_and_exit_2(tmp_path: Path, case: str) -> None:
    program = {"missing": str(tmp_path / "no-such-program"), "on_path_missing": "no-such-program-xyz",
               "not_executable": str(tmp_path / "script.sh"), "directory": str(tmp_path)}[case]
    (tmp_path / "script.sh").write_text("#!/bin/sh\nexit 0\n")
    (tmp_path / "script.sh").chmod(0o644)
    config = write_config(tmp_path, executors={"command": [program, "--flag"]})
    started = time.monotonic()
    result = supervise("run", str(config), timeout=30)
    err = result.stderr.decode()
    assert result.returncode == 2, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert "executors.command" in lines[0] and repr(program) in lines[0], err
    assert ("not executable" if case == "not_executable" else "not found") in lines[0], err
    assert time.monotonic() - started < 20  # refused at start, not after restarts


BAD_CALLABLES = '''
import os

def _count(task):
    with open(os.path.join(os.path.dirname(__file__), "attempts.txt"), "a") as handle:
        handle.write(f"{task.id} {task.attempt}\\n")

def wrong_type(task):
    _count(task)
    return {"a dict": "is not an output"} if task.payload == b"dict" else 42
'''


def test_callable_returning_a_wrong_type_is_retried_then_dead_lettered(tmp_path: Path) -> None:
    (tmp_path / "bad_tasks.py").write_text(BAD_CALLABLES)
    config = write_config(tmp_path,
                          executors={"callable": "bad_tasks:wrong_type", "python_path": [str(tmp_path)]},
                          retry={"max_attempts": 3, "backoff_secs": 0.01, "backoff_max_secs": 0.02})
    enqueue(config, ["dict", "int"])
    with RunningTree(config, burst=True) as tree:
        assert tree.wait_exit(timeout=60) == 0, tree.output()
    assert settled(config, dead=2)
    attempts = (tmp_path / "attempts.txt").read_text().split()
    assert sorted(attempts[1::2]) == ["1", "1", "2", "2", "3", "3"]  # each ran max_attempts times
    cfg = load(config)
    with open_backend(cfg.queue.url, cfg.queue.name, cfg.base_dir) as backend:
        dead = {bytes(t.payload): t for t in backend.list_tasks(TaskState.DEAD)}
    assert dead[b"dict"].last_error == "callable returned dict; expected bytes, str or None"
    assert dead[b"int"].last_error == "callable returned int; expected bytes, str or None"
    assert all(t.attempt == 3 and t.dead_reason for t in dead.values()), dead


# -- a callable that holds the GIL, one that leaks ----------------------------------------------

def dead_tasks(config: Path) -> dict[bytes, Any]:
    cfg = load(config)
    with open_backend(cfg.queue.url, cfg.queue.name, cfg.base_dir) as backend:
        return {bytes(t.payload): t for t in backend.list_tasks(TaskState.DEAD)}


def test_callable_blocking_the_gil_is_killed_by_the_heartbeat_retried_then_dead_lettered(
        tmp_path: Path) -> None:
    """``gil:60`` sleeps in C holding the GIL: the executor's heartbeat thread stops, the root kills
    it after heartbeat_timeout_secs (a crash, counted), the leaser releases the task with the
    attempt counted, and after max_attempts it is dead. The other tasks all run, once."""
    config = write_config(tmp_path, executors={"count": 2},
                          supervisor={"heartbeat_secs": 0.2, "heartbeat_timeout_secs": 1.5},
                          retry={"max_attempts": 2})
    record = tmp_path / "runs.txt"
    others = 40
    enqueue(config, ["gil:60"] + ["sleep:0.02"] * others)
    with RunningTree(config, record, burst=True) as tree:
        assert tree.wait_exit(timeout=60) == 0, tree.output()
        output = tree.output()
    assert settled(config, dead=1)
    assert output.count("reason=heartbeat timeout (1.5s): killing it") == 2, output  # one per attempt
    (dead,) = dead_tasks(config).values()
    assert bytes(dead.payload) == b"gil:60" and dead.attempt == 2, dead
    runs = records(record)
    (blocker,) = [task for task, line in _payloads(record).items() if line == "gil:60"]
    assert runs.pop(blocker) == 2
    assert len(runs) == others and set(runs.values()) == {1}, runs


def _payloads(record: Path) -> dict[str, str]:
    """Task id -> the payload it recorded (its first 40 bytes)."""
    import ast

    return {line.split(" ", 1)[0]: ast.literal_eval(line.split(" ", 3)[3]).decode()
            for line in record.read_text().splitlines()}


def test_callable_leaking_memory_recycles_its_executor_without_using_up_the_intensity(
        tmp_path: Path) -> None:
    """Each ``leak:48`` task keeps 48 MB alive; past ``max_memory_mb`` the executor finishes the task
    that crossed the line, exits EXIT_RECYCLE and is started again. Intensity 1 would make the root
    give up on a second crash, so several recycles prove none counted; every task ran exactly once."""
    config = write_config(tmp_path, executors={"count": 1, "max_memory_mb": 160},
                          supervisor={"intensity": 1, "period_secs": 60})
    record = tmp_path / "runs.txt"
    count = 12
    enqueue(config, ["leak:48"] * count)
    with RunningTree(config, record, burst=True) as tree:
        assert tree.wait_exit(timeout=90) == 0, tree.output()
        output = tree.output()
    assert settled(config)
    runs = records(record)
    assert len(runs) == count and set(runs.values()) == {1}, runs
    per_pid = collections.Counter(line.split()[2] for line in record.read_text().splitlines())
    # 12 × 48 MB cannot fit under 160 MB: several incarnations, each retiring after a few tasks
    assert len(per_pid) >= 3 and max(per_pid.values()) <= 4, per_pid
    # every incarnation but perhaps the last retired for memory, none for anything else
    assert output.count("retiring: max_memory_mb reached") >= len(per_pid) - 1, output
    assert "recycled" in output and "abnormal" not in output, output


# -- output_url that refuses, that hangs ----------------------------------------------------------

@pytest.fixture
def refusing_url() -> str:
    with socket.socket() as probe:  # a port that was free a moment ago and has no listener now
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    return f"http://127.0.0.1:{port}/out/"


@pytest.fixture
def hanging_url() -> Iterator[str]:
    """A sink that accepts connections and never answers (nor reads)."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(16)
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        server.settimeout(0.1)
        while not stop.is_set():
            with contextlib.suppress(TimeoutError, OSError):
                held.append(server.accept()[0])

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.getsockname()[1]}/out/"
    stop.set()
    thread.join(5)
    for conn in held:
        conn.close()
    server.close()


@pytest.mark.parametrize("sink_kind", ["refusing", "hanging"])
def test_output_url_refusing_or_hanging_is_retried_not_acked_then_dead_lettered(
        tmp_path: Path, sink_kind: str, request: pytest.FixtureRequest) -> None:
    """Beside the 500 case (test_pipeline_e2e.py): a closed port and a sink that never answers. The
    task ran, but its output was not delivered, so it is not acked: retried, then dead-lettered
    after max_attempts with the error kept. The POST's timeout is timeout_secs (here 1 s; clamped to
    1..60 s, children/executor.py), and it blocks the executor loop for that long."""
    url = request.getfixturevalue(f"{sink_kind}_url")
    config = write_config(tmp_path, executors={"count": 1, "output_url": url, "timeout_secs": 1},
                          retry={"max_attempts": 2})
    record = tmp_path / "runs.txt"
    enqueue(config, ["echo:x", "echo:y"])
    with RunningTree(config, record, burst=True) as tree:
        assert tree.wait_exit(timeout=60) == 0, tree.output()
    assert settled(config, dead=2)
    runs = records(record)
    assert len(runs) == 2 and set(runs.values()) == {2}, runs  # each ran max_attempts times
    expected = "Connection refused" if sink_kind == "refusing" else "timed out"
    for task in dead_tasks(config).values():
        assert task.attempt == 2, task
        assert task.last_error.startswith("output_url failed") and expected in task.last_error, task
        assert task.last_error in task.dead_reason, task
