"""`supervise config.toml` end to end on SQLite: real processes, real sockets, a real queue file."""

from __future__ import annotations

import collections
import http.server
import os
import random
import signal
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.integration import e2e_funcs
from tests.integration.harness import (
    RunningTree,
    enqueue,
    queue_stats,
    records,
    supervise,
    wait_until,
    write_config,
)

pytestmark = pytest.mark.timeout(180)


def drained(config: Path) -> bool:
    stats = queue_stats(config)
    return stats.ready == 0 and stats.leased == 0 and stats.delayed == 0


def dead_tasks(config: Path) -> list:
    from children.backends import TaskState, open_backend
    from config import load

    cfg = load(config)
    with open_backend(cfg.queue.url, cfg.queue.name, cfg.base_dir) as backend:
        return backend.list_tasks(TaskState.DEAD)


def test_burst_drains_10k_tasks_each_run_once(tmp_path):
    config = write_config(tmp_path)
    record = tmp_path / "runs.txt"
    enqueue(config, ["ok"] * 10_000)
    with RunningTree(config, record, burst=True) as tree:
        assert tree.wait_exit(timeout=150) == 0, tree.output()
        assert tree.leftovers() == []
    runs = records(record)
    assert len(runs) == 10_000
    assert set(runs.values()) == {1}
    stats = queue_stats(config)
    assert (stats.ready, stats.leased, stats.delayed, stats.dead) == (0, 0, 0, 0)


class Recorder(http.server.BaseHTTPRequestHandler):
    posts: dict[str, bytes] = {}
    status = 200

    def do_POST(self):  # noqa: N802 - the stdlib's name
        body = self.rfile.read(int(self.headers["Content-Length"]))
        Recorder.posts[self.path] = body
        self.send_response(Recorder.status)
        self.end_headers()

    def log_message(self, *args):
        pass


@pytest.fixture
def http_sink():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Recorder)
    Recorder.posts, Recorder.status = {}, 200
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/out/", Recorder
    server.shutdown()


def test_command_task_gets_input_and_output_files_and_output_is_posted(tmp_path, http_sink):
    url, recorder = http_sink
    script = tmp_path / "upper.sh"
    script.write_text('#!/bin/sh\n[ -n "$SUPERVISE_TASK_ID" ] || exit 9\ntr a-z A-Z < "$1" > "$2"\n')
    script.chmod(0o755)
    config = write_config(tmp_path, executors={"command": [str(script)], "output_url": url})
    enqueue(config, ["hello", "world"])
    with RunningTree(config, burst=True) as tree:
        assert tree.wait_exit(timeout=60) == 0, tree.output()
    assert sorted(recorder.posts.values()) == [b"HELLO", b"WORLD"]  # stdin lines lose their newline
    assert all(path.startswith("/out/") for path in recorder.posts)
    assert drained(config) and queue_stats(config).dead == 0


def test_output_url_answering_500_is_retried_not_acked(tmp_path, http_sink):
    url, recorder = http_sink
    recorder.status = 500
    config = write_config(tmp_path, executors={"output_url": url}, retry={"max_attempts": 2})
    enqueue(config, ["echo:x"])
    with RunningTree(config, burst=True) as tree:
        assert tree.wait_exit(timeout=60) == 0, tree.output()
    stats = queue_stats(config)
    assert stats.dead == 1
    from children.backends import TaskState, open_backend
    from config import load
    cfg = load(config)
    with open_backend(cfg.queue.url, cfg.queue.name, cfg.base_dir) as backend:
        (dead,) = backend.list_tasks(TaskState.DEAD)
    assert "output_url answered 500" in dead.dead_reason


def test_a_failed_command_is_reported_with_the_end_of_its_own_stderr(tmp_path):
    # one executor, one slot: every task writes to the same stderr file, truncated for each
    script = tmp_path / "noisy.sh"
    script.write_text('#!/bin/sh\ncase "$(cat "$1")" in\n'
                      '  loud*) for i in 1 2 3 4 5; do echo "line $i of a complaint" >&2; done; exit 0;;\n'
                      '  *) echo "boom from $(cat "$1")" >&2; exit 3;;\nesac\n')
    script.chmod(0o755)
    config = write_config(tmp_path, executors={"command": [str(script)], "count": 1},
                          retry={"max_attempts": 1})
    enqueue(config, ["loud1", "quiet1", "loud2", "quiet2"])
    with RunningTree(config, burst=True) as tree:
        assert tree.wait_exit(timeout=60) == 0, tree.output()
    from children.backends import TaskState, open_backend
    from config import load
    cfg = load(config)
    with open_backend(cfg.queue.url, cfg.queue.name, cfg.base_dir) as backend:
        reasons = sorted(task.dead_reason for task in backend.list_tasks(TaskState.DEAD))
    assert len(reasons) == 2
    assert reasons[0].endswith("exit 3: boom from quiet1") and reasons[1].endswith("exit 3: boom from quiet2")


def test_failing_task_is_retried_with_backoff_then_dead_lettered_and_flaky_succeeds(tmp_path):
    backoff = 0.2  # release delays are backoff·2^(attempt-1)·U(1,2): 0.2-0.4 s, then 0.4-0.8 s
    config = write_config(tmp_path, executors={"callable": "e2e_funcs:timed"},
                          retry={"max_attempts": 3, "backoff_secs": backoff, "backoff_max_secs": 10})
    record = tmp_path / "runs.txt"
    enqueue(config, ["fail", "flaky:3", "ok"])
    with RunningTree(config, record, burst=True) as tree:
        assert tree.wait_exit(timeout=60) == 0, tree.output()
    by_payload: dict[str, list[e2e_funcs.Run]] = {}
    for run in e2e_funcs.runs(record):
        by_payload.setdefault(run.payload, []).append(run)
    for payload in ("fail", "flaky:3"):
        attempts = sorted(by_payload[payload], key=lambda run: run.attempt)
        assert [run.attempt for run in attempts] == [1, 2, 3], payload
        for before, after in zip(attempts, attempts[1:], strict=False):
            # a lower bound from the config, not a timing of the tree: attempt n+1 may not start
            # before attempt n's failure was released with its backoff
            floor = backoff * 2 ** (before.attempt - 1)
            assert after.start - before.end >= floor, (payload, before, after)
    assert [run.attempt for run in by_payload["ok"]] == [1]
    stats = queue_stats(config)
    assert (stats.ready, stats.leased, stats.delayed, stats.dead) == (0, 0, 0, 1)
    (dead,) = dead_tasks(config)
    assert dead.payload == b"fail" and dead.attempt == 3
    assert dead.dead_reason == "failed 3 attempts; last error: RuntimeError: failing on purpose (attempt 3)"


def test_task_that_kills_its_executor_ends_in_dead_letter_and_the_rest_run(tmp_path):
    config = write_config(tmp_path, retry={"max_attempts": 3})
    record = tmp_path / "runs.txt"
    enqueue(config, ["crash"] + ["ok"] * 50)
    with RunningTree(config, record, burst=True) as tree:
        assert tree.wait_exit(timeout=90) == 0, tree.output()
    lines = [line.split() for line in record.read_text().splitlines()]
    (crash_id,) = {task_id for task_id, _attempt, _pid, payload in lines if payload == "b'crash'"}
    assert [int(attempt) for task_id, attempt, _pid, _ in lines if task_id == crash_id] == [1, 2, 3]
    crashed = {pid for task_id, _attempt, pid, _ in lines if task_id == crash_id}
    runs = records(record)
    others = {task_id: count for task_id, count in runs.items() if task_id != crash_id}
    assert len(others) == 50 and set(others.values()) <= {1, 2}, "an innocent task ran 3 times or never"
    # at least once: an innocent task runs again only if it had finished on an executor that the
    # crash then killed before its Done went out (docs/guarantees.md §3), never anywhere else
    for task_id in (t for t, count in others.items() if count == 2):
        first = next(pid for t, _attempt, pid, _ in lines if t == task_id)
        assert first in crashed, (task_id, first, crashed)
    stats = queue_stats(config)
    assert (stats.ready, stats.leased, stats.delayed, stats.dead) == (0, 0, 0, 1)
    (dead,) = dead_tasks(config)
    assert dead.task_id == crash_id and dead.attempt == 3
    assert dead.dead_reason.startswith("failed 3 attempts; last error: executor died"), dead.dead_reason


def test_command_past_its_timeout_is_killed_with_its_children(tmp_path):
    pidfile = tmp_path / "pids"
    script = tmp_path / "hang.sh"
    script.write_text(f'#!/bin/sh\nsleep 300 &\necho $! >> {pidfile}\necho $$ >> {pidfile}\nwait\n')
    script.chmod(0o755)
    config = write_config(tmp_path, executors={"command": [str(script)], "timeout_secs": 0.5},
                          retry={"max_attempts": 1})
    enqueue(config, ["x"])
    with RunningTree(config, burst=True) as tree:
        assert tree.wait_exit(timeout=60) == 0, tree.output()
    pids = [int(x) for x in pidfile.read_text().split()]
    assert len(pids) == 2
    for pid in pids:
        assert not os.path.exists(f"/proc/{pid}") or _is_zombie(pid)
    assert queue_stats(config).dead == 1


def _is_zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as handle:
            return handle.read().rsplit(b")", 1)[1].split()[0] == b"Z"
    except OSError:
        return True


def test_sigterm_drains_running_tasks_and_leaves_the_rest_ready_with_no_lease(tmp_path):
    config = write_config(tmp_path, executors={"count": 2}, leaser={"max_in_flight": 6})
    record = tmp_path / "runs.txt"
    enqueue(config, ["sleep:1.5"] * 20)
    with RunningTree(config, record) as tree:
        wait_until(lambda: len(records(record)) >= 2, 30, "two tasks to start")
        tree.signal(signal.SIGTERM)
        assert tree.wait_exit(timeout=60) == 0, tree.output()
        assert tree.leftovers() == []
    started = records(record)
    stats = queue_stats(config)
    # every task that started finished and was acked; the rest are ready, none leased
    assert stats.leased == 0 and stats.dead == 0
    assert stats.ready == 20 - len(started)


def test_kill_9_of_random_children_under_load_loses_nothing(tmp_path):
    config = write_config(tmp_path, supervisor={"intensity": 1000, "period_secs": 60, "heartbeat_secs": 0.5},
                          leaser={"lease_secs": 3})
    record = tmp_path / "runs.txt"
    total = 3000  # about 8 s of work for two executors: the kills land while it runs
    enqueue(config, ["sleep:0.005"] * total)
    rng = random.Random(7)
    kills = []
    with RunningTree(config, record) as tree:
        tree.wait_ready()
        while len(kills) < 10:
            pids = tree.child_pids()
            victim = rng.choice(sorted(pids))
            try:
                os.kill(pids[victim], signal.SIGKILL)
                kills.append((victim, len(records(record))))
            except ProcessLookupError:
                pass
            time.sleep(rng.uniform(0.2, 0.4))  # the chaos cadence itself, not a synchronisation
        wait_until(lambda: drained(config), 120, "the queue to drain after the kills")
        assert tree.process.poll() is None, "the tree gave up: " + tree.output()
    runs = records(record)
    assert kills[-1][1] < total, "the kills came after the work was done"
    assert len(runs) == total, f"lost {total - len(runs)} tasks"  # nothing lost
    assert queue_stats(config).dead == 0


def test_kill_9_of_the_root_leaves_nothing_and_a_new_tree_finishes(tmp_path):
    config = write_config(tmp_path, leaser={"lease_secs": 2})
    record = tmp_path / "runs.txt"
    enqueue(config, ["sleep:0.2"] * 40)
    with RunningTree(config, record) as tree:
        wait_until(lambda: len(records(record)) >= 4, 30, "tasks to start")
        tree.process.send_signal(signal.SIGKILL)
        tree.process.wait(timeout=10)
        wait_until(lambda: tree.leftovers() == [], 5, "every process of the killed tree to be gone")
    with RunningTree(config, record, burst=True) as second:
        assert second.wait_exit(timeout=90) == 0, second.output()
    assert len(records(record)) == 40
    assert drained(config) and queue_stats(config).dead == 0


def test_task_longer_than_its_lease_runs_once_with_a_second_tree_on_the_queue(tmp_path):
    first = write_config(tmp_path, "a.toml", leaser={"lease_secs": 1}, executors={"count": 1})
    second = write_config(tmp_path, "b.toml", leaser={"lease_secs": 1}, executors={"count": 1})
    record = tmp_path / "runs.txt"
    enqueue(first, ["sleep:4"])
    with RunningTree(first, record):
        wait_until(lambda: len(records(record)) == 1, 30, "the task to start on tree a")
        with RunningTree(second, record) as b:
            b.wait_ready()
            wait_until(lambda: drained(first), 30, "the long task to finish")
    assert list(records(record).values()) == [1]


def test_two_trees_on_one_queue_one_killed_the_other_finishes(tmp_path):
    first = write_config(tmp_path, "a.toml", leaser={"lease_secs": 2})
    second = write_config(tmp_path, "b.toml", leaser={"lease_secs": 2})
    record = tmp_path / "runs.txt"
    total = 300  # about 1.5 s of work for four executors
    with RunningTree(first, record) as a, RunningTree(second, record) as b:
        a.wait_ready()
        b.wait_ready()
        a_pids = set(a.child_pids().values())
        enqueue(first, ["sleep:0.02"] * total)  # both trees are up: both get a share
        wait_until(lambda: len(records(record)) >= 30, 30, "work to start")
        a.process.send_signal(signal.SIGKILL)  # the root: the whole tree goes with it
        a.process.wait(timeout=10)
        wait_until(lambda: a.leftovers() == [], 10, "every process of the killed tree to be gone")
        assert len(records(record)) < total, "tree a was killed after the work was done"
        wait_until(lambda: drained(second), 90, "tree b to finish everything")
        assert b.process.poll() is None, b.output()
    runners = {int(line.split()[2]) for line in record.read_text().splitlines()}
    assert runners & a_pids and runners - a_pids, "both trees should have run tasks"
    assert len(records(record)) == total
    assert queue_stats(second).dead == 0


def test_supervise_run_with_a_missing_command_is_one_line_and_exit_2(tmp_path):
    config = write_config(tmp_path, executors={"command": ["/no/such/program"]})
    result = supervise("run", str(config))
    assert result.returncode == 2
    err = result.stderr.decode().strip().splitlines()
    assert len(err) == 1 and "/no/such/program" in err[0] and "not found" in err[0]


def test_status_and_stop_commands_against_a_running_tree(tmp_path):
    config = write_config(tmp_path)
    enqueue(config, ["ok"] * 10)
    with RunningTree(config) as tree:
        status = tree.wait_ready()
        ids = {c["id"] for c in status["children"]}
        assert {"reaper", "executors", "leaser"} <= ids
        wait_until(lambda: drained(config), 30, "the queue to drain")
        text = supervise("status", str(config))
        assert text.returncode == 0 and b"leaser" in text.stdout
        stopped = supervise("stop", str(config))
        assert stopped.returncode == 0, stopped.stderr
        assert tree.wait_exit(timeout=30) == 0
    assert supervise("status", str(config)).returncode == 1  # no tree running now


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-x", "-q"]))


def test_a_second_tree_on_the_same_config_is_refused_with_one_line(tmp_path):
    config = write_config(tmp_path)
    with RunningTree(config) as tree:
        tree.wait_ready()
        second = supervise("run", str(config), timeout=30)
        assert second.returncode == 2
        lines = second.stderr.decode().strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("supervise: a tree is already running"), lines
        assert tree.process.poll() is None


def test_callable_past_its_timeout_fails_with_a_timeout_error_and_the_executor_lives_on(tmp_path):
    config = write_config(tmp_path, executors={"timeout_secs": 0.3, "count": 1}, retry={"max_attempts": 1})
    record = tmp_path / "runs.txt"
    enqueue(config, ["sleep:30", "ok"])
    with RunningTree(config, record, burst=True) as tree:
        assert tree.wait_exit(timeout=60) == 0, tree.output()
    pids = {line.split()[2] for line in record.read_text().splitlines()}
    assert len(pids) == 1  # the same executor ran both: the timeout did not cost a restart
    from children.backends import TaskState, open_backend
    from config import load
    cfg = load(config)
    with open_backend(cfg.queue.url, cfg.queue.name, cfg.base_dir) as backend:
        (dead,) = backend.list_tasks(TaskState.DEAD)
    assert "timeout" in dead.dead_reason
    assert len(records(record)) == 2


def test_executors_recycle_after_max_tasks_per_child_without_using_up_the_restart_intensity(tmp_path):
    config = write_config(tmp_path, executors={"max_tasks_per_child": 40},
                          supervisor={"intensity": 2, "period_secs": 60})
    record = tmp_path / "runs.txt"
    enqueue(config, ["ok"] * 600)
    with RunningTree(config, record, burst=True) as tree:
        assert tree.wait_exit(timeout=120) == 0, tree.output()
    runs = records(record)
    assert len(runs) == 600 and set(runs.values()) == {1}
    per_pid = collections.Counter(line.split()[2] for line in record.read_text().splitlines())
    assert max(per_pid.values()) <= 40  # each incarnation retired at the line
    assert len(per_pid) >= 600 // 40


def test_stop_reaches_the_tree_even_after_its_config_was_broken_on_disk(tmp_path):
    config = write_config(tmp_path)
    with RunningTree(config) as tree:
        tree.wait_ready()
        config.write_text("[executors\ncount = two\n")
        result = supervise("stop", str(config))
        assert result.returncode == 0, result.stderr
        assert b"stopping the tree started from this path anyway" in result.stderr
        assert tree.wait_exit(timeout=30) == 0


def test_repeated_warm_stops_do_not_use_up_the_attempts_of_tasks_that_never_started(tmp_path):
    config = write_config(tmp_path, leaser={"max_in_flight": 60}, retry={"max_attempts": 2})
    record = tmp_path / "runs.txt"
    enqueue(config, ["sleep:0.05"] * 150)
    for _ in range(4):  # each stop releases the ~60 leased tasks that had not started
        with RunningTree(config, record) as tree:
            target = len(records(record)) + 2
            wait_until(lambda target=target: len(records(record)) >= target, 30, "tasks to start")
            tree.signal(signal.SIGTERM)
            assert tree.wait_exit(timeout=60) == 0, tree.output()
    with RunningTree(config, record, burst=True) as tree:
        assert tree.wait_exit(timeout=60) == 0, tree.output()
    stats = queue_stats(config)
    assert (stats.ready, stats.leased, stats.dead) == (0, 0, 0)
    assert len(records(record)) == 150


def test_a_command_task_inherits_only_stdin_stdout_and_stderr(tmp_path, http_sink):
    url, recorder = http_sink
    lister = "import os, sys; fds = os.listdir('/proc/self/fd'); open(sys.argv[2], 'w').write(' '.join(fds))"
    config = write_config(tmp_path, executors={"command": [sys.executable, "-c", lister], "output_url": url})
    enqueue(config, ["x"])
    with RunningTree(config, burst=True) as tree:
        assert tree.wait_exit(timeout=60) == 0, tree.output()
    (listing,) = recorder.posts.values()
    assert set(listing.split()) == {b"0", b"1", b"2", b"3"}  # 3: the listing's own descriptor
