"""A moto SQS server for the tests, started on demand, once per test session.

``moto_endpoint()`` starts ``python -m moto.server -p <free port>`` the first time it is called,
waits until it answers, and returns ``http://127.0.0.1:<port>``. The address goes into the
environment, so processes spawned by the tests reach the same server instead of starting their own;
the process that started it stops it at exit (or when ``stop_moto()`` is called, e.g. by a session
fixture). ``sqs_url(endpoint)`` is the backend URL with throwaway credentials that moto accepts.
"""

from __future__ import annotations

import atexit
import os
import socket
import subprocess
import sys
import time
import urllib.request

_ENV = "LEASETREE_TEST_MOTO_URL"
_process: subprocess.Popen | None = None


def sqs_url(endpoint: str) -> str:
    return f"sqs://test:test@?endpoint_url={endpoint}&region=us-east-1"


def moto_available() -> tuple[bool, str]:
    try:
        import moto.server  # noqa: F401
    except ImportError:
        return False, "moto is not installed: pip install 'moto[server]'"
    return True, ""


def _answers(endpoint: str) -> bool:
    try:
        with urllib.request.urlopen(f"{endpoint}/moto-api/", timeout=1):
            return True
    except OSError:
        return False


def start_moto(timeout: float = 30.0) -> tuple[subprocess.Popen, str]:
    """A new moto server on a free port: (process, endpoint). The caller stops it."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    process = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout
    while not _answers(endpoint):
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            raise RuntimeError(f"moto server on port {port} did not start (exit code {process.poll()})")
        time.sleep(0.05)  # polling a starting server: there is no event to wait on
    return process, endpoint


def moto_endpoint() -> str:
    """The session's moto server, started on first use."""
    global _process
    endpoint = os.environ.get(_ENV)
    if endpoint and _answers(endpoint):
        return endpoint
    _process, endpoint = start_moto()
    os.environ[_ENV] = endpoint
    owner = os.getpid()
    atexit.register(lambda: os.getpid() == owner and stop_moto())
    return endpoint


def stop_moto() -> None:
    global _process
    if _process is not None:
        _process.terminate()
        try:
            _process.wait(10)
        except subprocess.TimeoutExpired:
            _process.kill()
            _process.wait()
        _process = None
        os.environ.pop(_ENV, None)
