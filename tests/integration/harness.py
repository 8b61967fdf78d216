"""Helpers for end-to-end tests: write a config, run ``supervise`` for real, wait on conditions."""

from __future__ import annotations

import collections
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from children.backends import open_backend
from supervisor import sweep

HERE = Path(__file__).resolve().parent
SUPERVISE = [sys.executable, "-m", "supervisor"]


def wait_until(predicate: Callable[[], Any], timeout: float = 10.0, what: str = "condition",
               interval: float = 0.01) -> Any:
    """Call ``predicate`` until it returns something truthy (returned) or ``timeout`` seconds pass
    (AssertionError naming ``what``): wait on a condition, never sleep and hope. The one copy for
    every test (tests/conftest.py's fixture and tests/integration/workers.py use it too)."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    raise TypeError(value)


def write_config(folder: Path, name: str = "tree.toml", **sections: dict[str, Any]) -> Path:
    """A config in ``folder``: defaults fit for tests, overridden per section."""
    base: dict[str, dict[str, Any]] = {
        "queue": {"url": "sqlite:///tasks.db"},
        "leaser": {"lease_secs": 10},
        "executors": {"count": 2, "callable": "task_funcs:run", "python_path": [str(HERE)],
                      "timeout_secs": 60},
        "reaper": {"max_latency_ms": 5},
        "retry": {"max_attempts": 3, "backoff_secs": 0.05, "backoff_max_secs": 0.2},
        "supervisor": {"shutdown_secs": 10, "heartbeat_secs": 0.5, "heartbeat_timeout_secs": 5},
    }
    for section, values in sections.items():
        base.setdefault(section, {}).update(values)
    if "command" in base["executors"]:
        base["executors"].pop("callable", None)
    lines = []
    for section, values in base.items():
        lines.append(f"[{section}]")
        lines += [f"{key} = {toml_value(value)}" for key, value in values.items()]
        lines.append("")
    path = folder / name
    path.write_text("\n".join(lines))
    return path


def supervise(*args: str, env: dict[str, str] | None = None, input: bytes | None = None,
              timeout: float = 60) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([*SUPERVISE, *args], env=env, input=input, capture_output=True, timeout=timeout)


def enqueue(config: Path, payloads: list[str], tag: str = "") -> None:
    extra = ["--tag", tag] if tag else []
    result = supervise("enqueue", str(config), *extra, input="\n".join(payloads).encode() + b"\n")
    assert result.returncode == 0, result.stderr.decode()


def queue_stats(config: Path, queue_url: str | None = None):
    from config import load

    cfg = load(config)
    with open_backend(queue_url or cfg.queue.url, cfg.queue.name, cfg.base_dir) as backend:
        return backend.stats()


def records(path: Path) -> collections.Counter[str]:
    """How many times each task id ran, from the record file."""
    counts: collections.Counter[str] = collections.Counter()
    if path.exists():
        for line in path.read_text().splitlines():
            counts[line.split(" ", 1)[0]] += 1
    return counts


class RunningTree:
    """``supervise run CONFIG`` in a subprocess of its own session; always torn down."""

    def __init__(self, config: Path, record: Path | None = None, burst: bool = False,
                 extra_env: dict[str, str] | None = None) -> None:
        self.config = config
        env = dict(os.environ)
        if record is not None:
            env["LEASETREE_TEST_RECORD"] = str(record)
        env.update(extra_env or {})
        # every process of this tree inherits the marker, so teardown can find stragglers
        self.marker = f"LEASETREE_TEST_TREE={os.getpid()}-{time.monotonic_ns()}"
        env[self.marker.split("=")[0]] = self.marker.split("=")[1]
        self.env = env
        args = ["run", str(config)] + (["--burst"] if burst else [])
        self.log_path = config.with_suffix(f".{time.monotonic_ns()}.log")
        self.log = open(self.log_path, "wb")
        self.process = subprocess.Popen([*SUPERVISE, *args], env=env, stdout=self.log, stderr=self.log,
                                        start_new_session=True)

    def status(self) -> dict[str, Any] | None:
        result = supervise("status", str(self.config), "--json", env=self.env, timeout=20)
        if result.returncode != 0:
            return None
        return json.loads(result.stdout)

    def wait_ready(self, timeout: float = 30) -> dict[str, Any]:
        def up() -> dict[str, Any] | None:
            assert self.process.poll() is None, f"tree exited {self.process.returncode}: {self.output()}"
            status = self.status()
            if status and all(c.get("pid") for c in status.get("children", [])
                              if c.get("type", "worker") == "worker"):
                return status
            return None
        return wait_until(up, timeout, "the tree to be up")

    def child_pids(self) -> dict[str, int]:
        status = self.status() or {}
        pids: dict[str, int] = {}
        for child in _walk(status.get("children", [])):
            if child.get("pid") and child.get("type", "worker") == "worker":
                pids[child["id"]] = child["pid"]
        return pids

    def output(self) -> str:
        self.log.flush()
        return self.log_path.read_text(errors="replace")[-4000:]

    def wait_exit(self, timeout: float = 60) -> int:
        return self.process.wait(timeout=timeout)

    def signal(self, signum: int) -> None:
        self.process.send_signal(signum)

    def leftovers(self) -> list[int]:
        return processes_with_env(self.marker)

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(timeout=10)
        for pid in self.leftovers():  # a failed test must not leak processes into the next
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.log.close()

    def __enter__(self) -> RunningTree:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _walk(children: list[dict[str, Any]]):
    for child in children:
        yield child
        yield from _walk(child.get("children", []))


def processes_with_env(marker: str) -> list[int]:
    """Pids of live processes whose environment contains ``marker`` (``KEY=value``)."""
    variable, _, value = marker.partition("=")
    return sweep.processes_with(variable, value)
