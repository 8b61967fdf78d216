"""`supervise top`: one frame for scripts (--once), and the live view in a real terminal (tmux),
refreshing in place."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.integration.harness import RunningTree, enqueue, supervise, wait_until, write_config

pytestmark = pytest.mark.timeout(60)


def test_top_once_prints_children_with_cpu_rss_and_the_pipeline(tmp_path: Path) -> None:
    config = write_config(tmp_path)
    enqueue(config, ["ok"] * 20)
    with RunningTree(config) as tree:
        tree.wait_ready()
        wait_until(lambda: (tree.status() or {}).get("stats", {}).get("reaper", {}).get("acked_total") == 20,
                   30, "20 acked")
        result = supervise("top", str(config), "--once", env=tree.env)
        pids = tree.child_pids()
    out = result.stdout.decode()
    assert result.returncode == 0, result.stderr.decode()
    for child, pid in pids.items():
        line = next(x for x in out.splitlines() if f" {child} " in x)
        assert str(pid) in line and "running" in line and "MiB" in line and "%" in line
    assert "tasks/s 10s" in out and "tasks/s 1min" in out
    assert "ready 0, leased 0, delayed 0, dead 0" in out
    assert any(" done " in x and " 20 " in x for x in out.splitlines())


def test_top_once_without_a_tree_is_one_line_exit_1(tmp_path: Path) -> None:
    result = supervise("top", str(write_config(tmp_path)), "--once")
    assert result.returncode == 1
    assert result.stderr.decode().startswith("supervise: no tree is running")


@pytest.mark.skipif(shutil.which("tmux") is None and not os.environ.get("CI"),
                    reason="tmux is not installed (CI installs it: apt-get install -y tmux)")
def test_top_live_in_a_real_terminal_refreshes_in_place(tmp_path: Path) -> None:
    config = write_config(tmp_path)
    socket = str(tmp_path / "tmux.sock")
    tmux = ["tmux", "-S", socket]

    def screen() -> str:
        return subprocess.run([*tmux, "capture-pane", "-p", "-t", "top"], capture_output=True,
                              text=True).stdout

    with RunningTree(config) as tree:
        tree.wait_ready()
        command = f"{sys.executable} -m supervisor top {config} --interval 0.2"
        env = ["-e", f"PYTHONPATH={os.pathsep.join(sys.path)}"]
        subprocess.run([*tmux, "new-session", "-d", "-s", "top", "-x", "120", "-y", "40", *env, command],
                       check=True, env=dict(os.environ, TERM="xterm-256color"))
        try:
            wait_until(lambda: "executor.1" in screen() and "tasks/s 10s" in screen(), 20, "the first frame")
            enqueue(config, ["ok"] * 30)

            def thirty_done() -> str | None:
                shown = screen()
                return shown if any(" done " in x and " 30 " in x for x in shown.splitlines()) else None

            shown = wait_until(thirty_done, 20, "30 done on screen")
            assert shown.count("leasetree ") == 1  # redrawn in place, not scrolled
            assert "root" in shown and "RSS" in shown and "ready 0" in shown
            print("\n" + shown)  # the captured screen, for the record
            subprocess.run([*tmux, "send-keys", "-t", "top", "C-c"], check=True)
            wait_until(lambda: subprocess.run([*tmux, "has-session", "-t", "top"], capture_output=True)
                       .returncode != 0, 10, "top to quit on Ctrl-C")
        finally:
            subprocess.run([*tmux, "kill-server"], capture_output=True)
