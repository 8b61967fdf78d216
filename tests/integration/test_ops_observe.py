"""Observing a running tree: Prometheus metrics scraped over HTTP, JSON logs on stderr, and the
systemd notify protocol read from a socket the test binds."""

from __future__ import annotations

import json
import os
import signal
import socket
import sys
import urllib.request
import uuid
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.integration.harness import RunningTree, enqueue, supervise, wait_until, write_config

pytestmark = pytest.mark.timeout(90)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def scrape(port: int) -> dict[str, float]:
    """sample name + sorted labels -> value, e.g. 'leasetree_task_runs_total{outcome=succeeded}'."""
    try:
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    except OSError:
        return {}
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()))
            out[f"{sample.name}{{{labels}}}"] = sample.value
    return out


def test_metrics_over_http_survive_a_child_kill_and_json_logs_parse(tmp_path: Path) -> None:
    port = free_port()
    config = write_config(tmp_path, metrics={"listen": f"127.0.0.1:{port}"},
                          log={"format": "json", "level": "info"})
    enqueue(config, ["ok"] * 200 + ["fail"] * 5)
    with RunningTree(config) as tree:
        tree.wait_ready()
        done = 'leasetree_task_duration_seconds_count{outcome=ok}'
        got = wait_until(lambda: (m := scrape(port)).get(done, 0) >= 200
                         and m.get("leasetree_task_runs_total{outcome=succeeded}", 0) >= 200
                         and m.get("leasetree_task_settlements_total{outcome=acked}", 0) >= 200 and m,
                         60, "200 acked tasks in the metrics")
        assert got["leasetree_task_runs_total{outcome=succeeded}"] == 200
        assert got["leasetree_tasks_leased_total{}"] >= 205
        assert got["leasetree_children_up{}"] == 4
        assert got["leasetree_backend_calls_total{call=ack,child=reaper}"] >= 1
        assert got["leasetree_backend_call_seconds_count{call=lease,child=leaser}"] >= 1
        assert got["leasetree_queue_tasks{state=ready}"] >= 0
        assert 'leasetree_task_duration_seconds_bucket{le=+Inf,outcome=ok}' in got

        os.kill(tree.child_pids()["executor.0"], signal.SIGKILL)
        restarted = 'leasetree_child_restarts_total{child=root/executors/executor.0}'
        after = wait_until(lambda: (m := scrape(port)).get(restarted) == 1
                           and m.get("leasetree_children_up{}") == 4 and m, 30, "executor.0 restarted")
        # counters are the root's sums over incarnations: a dead executor's runs still count
        assert after[done] == got[done]
        assert after["leasetree_task_runs_total{outcome=succeeded}"] == 200
        assert after["leasetree_task_duration_seconds_sum{outcome=ok}"] == got[
            "leasetree_task_duration_seconds_sum{outcome=ok}"]
        tree.signal(signal.SIGTERM)
        assert tree.wait_exit(30) == 0, tree.output()
    lines = tree.log_path.read_text().splitlines()
    records = [json.loads(line) for line in lines]  # every line is one JSON object
    components = {r["component"] for r in records}
    assert {"root", "root/executors", "root/leaser"} <= components
    assert any(c.startswith("root/executors/executor.") for c in components)
    assert all(c == "root" or c.startswith("root/") for c in components)
    assert all({"time", "level", "component", "pid", "message"} <= set(r) for r in records)
    assert any("task_id" in r and r["component"].startswith("root/executors/") for r in records)
    assert any("child=executor.0" in r["message"] and r["level"] == "error" for r in records)


def test_missing_prometheus_client_and_busy_port_are_one_line_exit_2(tmp_path: Path) -> None:
    fake = tmp_path / "site"
    (fake / "prometheus_client").mkdir(parents=True)
    (fake / "prometheus_client" / "__init__.py").write_text("raise ImportError('not here')\n")
    config = write_config(tmp_path, metrics={"listen": "127.0.0.1:1"})
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(fake), *sys.path]))
    result = supervise("run", str(config), env=env, timeout=30)
    assert result.returncode == 2
    assert result.stderr.decode().strip().splitlines()[-1] == (
        "supervise: metrics.listen = '127.0.0.1:1': prometheus_client is not installed "
        "(pip install 'leasetree[metrics]')")
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        config = write_config(tmp_path, metrics={"listen": f"127.0.0.1:{port}"})
        result = supervise("run", str(config), timeout=30)
    assert result.returncode == 2
    assert f"supervise: metrics.listen = '127.0.0.1:{port}': cannot listen there" in result.stderr.decode()
    assert "Traceback" not in result.stderr.decode()


def test_systemd_notify_ready_watchdog_reload_stopping(tmp_path: Path) -> None:
    name = f"leasetree-notify-{uuid.uuid4().hex}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind("\0" + name)
    sock.settimeout(20)
    messages: list[str] = []

    def receive_until(field: str) -> str:
        while True:
            message = sock.recv(4096).decode()
            messages.append(message)
            if field in message.split("\n"):
                return message

    config = write_config(tmp_path)
    try:
        with RunningTree(config, extra_env={"NOTIFY_SOCKET": "@" + name, "WATCHDOG_USEC": "300000"}) as tree:
            ready = receive_until("READY=1")
            assert f"MAINPID={tree.process.pid}" in ready.split("\n")
            assert any(f.startswith("STATUS=4/4 workers up") for f in ready.split("\n"))
            receive_until("WATCHDOG=1")
            receive_until("WATCHDOG=1")  # it keeps coming from the loop
            write_config(tmp_path, leaser={"lease_secs": 12})
            tree.signal(signal.SIGHUP)
            receive_until("RELOADING=1")
            receive_until("READY=1")
            tree.signal(signal.SIGTERM)
            stopping = receive_until("STOPPING=1")
            assert tree.wait_exit(30) == 0, tree.output()
    finally:
        sock.close()
    assert stopping.startswith("STOPPING=1")
    assert sum(m.startswith("READY=1") for m in messages) == 2  # up, and up again after the reload
