"""A short chaos run (``scripts/chaos.py``) as a test: kill -9 and SIGSTOP of random children under
load lose nothing, and the duplicates stay within what was in flight at the crashes.

The script runs in a subprocess of its own, as an operator would run it, and hands its figures back
through ``--json``. The long runs are the script's own: ``scripts/chaos.py --backend redis --minutes 2``.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.backends import available, require_server

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "chaos.py"


def run_chaos(tmp_path: Path, backend: str, seconds: float, tasks: int) -> tuple[int, str, dict]:
    out = tmp_path / "chaos.json"
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--backend", backend, "--minutes", str(seconds / 60),
         "--tasks", str(tasks), "--seed", "3", "--drain-secs", "40", "--json", str(out)],
        capture_output=True, text=True, timeout=110)
    summary = json.loads(out.read_text()) if out.exists() else {}
    return result.returncode, result.stdout + result.stderr, summary


@pytest.mark.timeout(120)
@pytest.mark.parametrize("backend", ["sqlite", "redis", "postgresql"])
def test_kills_and_freezes_of_random_children_lose_nothing(tmp_path, backend):
    if backend != "sqlite":
        ok, why = available(backend)
        if not ok:
            require_server(backend, why)
    code, output, summary = run_chaos(tmp_path, backend, seconds=20, tasks=300)
    assert code == 0, output
    figures = summary["figures"]
    assert figures["kills"] >= 1 and figures["stops"] >= 1, output
    assert figures["deaths_under_load"] >= 3, "the chaos came after the work was done: " + output
    assert summary["lost"] == 0 and summary["unfinished"] == 0, output
    assert summary["dead"] == 0, output
    assert summary["tree"]["state"] == "running", output
    assert summary["tree"]["stop_exit"] == 0 and summary["tree"]["leftovers"] == 0, output
    # a duplicate run is possible only for a task in flight (running, or finished and not yet acked)
    # when a process died: no more duplicates than the sum of what was in flight at the deaths, and
    # that is itself at most the leaser's whole ledger per death
    assert summary["duplicates"] <= figures["at_risk"], output
    assert figures["at_risk"] <= figures["deaths"] * figures["max_in_flight"], output
