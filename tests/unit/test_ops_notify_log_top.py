"""systemd notify datagrams (to a socket bound by the test), JSON log records, and `top` frames."""

from __future__ import annotations

import io
import json
import logging
import os
import socket
import uuid

import pytest

from supervisor.logconfig import JsonFormatter, component_of, setup_logging
from supervisor.notify import Notifier
from supervisor.top import ProcSample, build_frame, proc_sample

pytestmark = pytest.mark.timeout(10)


@pytest.fixture
def abstract_socket():
    name = f"leasetree-test-{uuid.uuid4().hex}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind("\0" + name)
    sock.settimeout(2.0)
    yield "@" + name, sock
    sock.close()


def test_notify_speaks_to_an_abstract_socket_and_the_watchdog_runs_at_half_the_interval(abstract_socket):
    address, sock = abstract_socket
    env = {"NOTIFY_SOCKET": address, "WATCHDOG_USEC": "2000000", "WATCHDOG_PID": str(os.getpid())}
    notifier = Notifier.from_env(env)
    assert env == {}  # taken out, so children never talk to systemd
    notifier.ready("4 workers up")
    assert sock.recv(4096).decode().split("\n")[:2] == ["READY=1", "STATUS=4 workers up"]
    assert notifier.watchdog_deadline(10.0) == 10.0
    notifier.on_timer(10.0)
    assert sock.recv(4096) == b"WATCHDOG=1"
    assert notifier.watchdog_deadline(10.5) == 11.0  # WATCHDOG_USEC / 2
    notifier.on_timer(10.9)  # not due: nothing sent
    notifier.stopping("draining")
    assert sock.recv(4096) == b"STOPPING=1\nSTATUS=draining"
    notifier.close()


def test_notify_to_a_path_socket_and_watchdog_only_for_our_pid(tmp_path):
    path = str(tmp_path / "notify.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(2.0)
    try:
        notifier = Notifier.from_env({"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "1000", "WATCHDOG_PID": "1"})
        assert notifier.watchdog_deadline(0.0) is None  # the watchdog is some other process's
        notifier.status("hello")
        assert sock.recv(4096) == b"STATUS=hello"
    finally:
        sock.close()


def test_notify_without_socket_is_silent_and_a_vanished_socket_is_not_fatal(tmp_path):
    assert Notifier.from_env({}).send("READY=1") is False
    gone = Notifier(str(tmp_path / "nobody.sock"))
    assert gone.send("READY=1") is False and gone.send("READY=1") is False


def test_component_is_the_place_in_the_tree():
    assert component_of("root") == "root"
    assert component_of("root/executors/executor.3") == "root/executors/executor.3"
    assert component_of("root.executors") == "root/executors"  # a supervisor, in the root
    assert component_of("supervisor.runner") == "root"  # a module logger in the root process


def test_json_formatter_writes_one_object_per_record_with_task_id():
    stream = io.StringIO()
    setup_logging("debug", "json", stream)
    try:
        logging.getLogger("root/leaser").info("leased %d", 3, extra={"task_id": "t-1"})
        try:
            raise ValueError("boom")
        except ValueError:
            logging.getLogger("children.tasks").exception("it failed")
    finally:
        setup_logging("info", "text")
    first, second = (json.loads(line) for line in stream.getvalue().splitlines())
    assert first["component"] == "root/leaser" and first["task_id"] == "t-1"
    assert first["message"] == "leased 3" and first["level"] == "info" and first["pid"] == os.getpid()
    assert first["time"].endswith("Z")
    assert second["component"] == "root" and second["logger"] == "children.tasks"
    assert "ValueError: boom" in second["traceback"]
    assert isinstance(JsonFormatter().format(logging.makeLogRecord({"msg": "x"})), str)


def test_proc_sample_reads_this_process():
    sample = proc_sample(os.getpid())
    assert sample is not None and sample.rss_bytes > 1_000_000 and sample.cpu_secs > 0
    assert proc_sample(2 ** 22 + 12345) is None


def test_top_frame_rows_cpu_and_pipeline():
    status = {
        "pid": 10,
        "children": [{"id": "reaper", "path": "root/reaper", "pid": 11, "state": "running", "type": "worker",
                      "restarts": 1, "uptime": 75.0},
                     {"id": "executors", "path": "root/executors", "pid": 10, "state": "running",
                      "type": "supervisor", "restarts": 0, "uptime": 75.0},
                     {"id": "executor.0", "path": "root/executors/executor.0", "pid": None,
                      "state": "restarting", "type": "worker", "restarts": 3, "uptime": None}],
        "stats": {"leaser": {"leased_total": 9, "succeeded_total": 7, "failed_total": 1, "in_flight": 1},
                  "reaper": {"acked_total": 7}, "executor.0": {"running": 1}},
        "rates": {"tasks_10s": 2.5, "tasks_60s": 1.25},
    }
    before = {10: ProcSample(1.0, 0), 11: ProcSample(2.0, 0)}
    now = {10: ProcSample(1.5, 50 * 2 ** 20), 11: ProcSample(2.1, 2048)}

    class Queue:
        ready, leased, delayed, dead = 4, 1, 0, 2

    frame = build_frame(status, now, before, 1.0, Queue())
    assert frame.children[0] == ("root", "10", "running", "-", "-", "50.0%", "50.0MiB")
    assert frame.children[1] == ("reaper", "11", "running", "1", "1m15s", "10.0%", "2.0KiB")
    assert frame.children[2][:2] == ("executors", "(root)")
    assert frame.children[3] == ("  executor.0", "-", "restarting", "3", "-", "-", "-")
    pipeline = dict(frame.pipeline)
    assert pipeline["done"] == "7" and pipeline["running"] == "1" and pipeline["tasks/s 10s"] == "2.5"
    assert pipeline["queue"] == "ready 4, leased 1, delayed 0, dead 2"
    assert dict(build_frame(status, now, before, 1.0, None, "down").pipeline)["queue"] == "unavailable: down"
