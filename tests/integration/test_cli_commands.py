"""`supervise` commands through ``main()`` in this process, against a real SQLite queue file, and
the core ones again against the Redis, PostgreSQL and NATS servers of this machine.

Faster than a subprocess per case, with the same parsing, loading and backend code; the
subprocess view (exit codes, stderr, no traceback) is in test_cli_process.py.
"""

from __future__ import annotations

import base64
import contextlib
import io
import json
import sys
import tomllib
import types
from collections.abc import Iterator
from pathlib import Path

import pytest

import config
from children.backends import BackendUnavailable, open_backend
from children.backends.memory import MemoryBackend
from supervisor import cli
from supervisor.exits import EXIT_GAVE_UP, EXIT_OK, EXIT_USAGE
from tests.backends import SERVER_URLS, available, limitation, require_server, unique_queue

pytestmark = pytest.mark.timeout(30)


@pytest.fixture()
def cfg_path(tmp_path: Path) -> Path:
    path = tmp_path / "tree.toml"
    path.write_text('[queue]\nurl = "sqlite:///tasks.db"\nname = "jobs"\n')
    return path


def run(capsys: pytest.CaptureFixture[str], *argv: str, stdin: bytes | None = None,
        monkeypatch: pytest.MonkeyPatch | None = None) -> tuple[int, str, str]:
    if stdin is not None:
        assert monkeypatch is not None
        monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(stdin)))
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def one_error_line(err: str) -> str:
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("supervise: ") and "Traceback" not in err
    return lines[0]


def stats(capsys: pytest.CaptureFixture[str], cfg_path: Path) -> dict:
    code, out, _ = run(capsys, "queue", "stats", str(cfg_path), "--json")
    assert code == EXIT_OK
    return json.loads(out)


def tasks(capsys: pytest.CaptureFixture[str], cfg_path: Path, *extra: str) -> list[dict]:
    code, out, _ = run(capsys, "queue", "list", str(cfg_path), "--json", *extra)
    assert code == EXIT_OK
    return json.loads(out)


# -- check -------------------------------------------------------------------------------------

def test_check_prints_the_effective_config_with_passwords_hidden(
        capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    path = tmp_path / "redis.toml"
    path.write_text('[queue]\nurl = "redis://app:hunter2@127.0.0.1:6379/0"\n[executors]\ncount = 4\n')
    code, out, err = run(capsys, "check", str(path))
    assert (code, err) == (EXIT_OK, "")
    assert "hunter2" not in out and 'url = "redis://app:***@127.0.0.1:6379/0"' in out
    parsed = tomllib.loads(out)
    assert parsed["executors"]["count"] == 4 and parsed["leaser"]["lease_secs"] == 30.0
    assert set(parsed) == {"queue", "leaser", "executors", "reaper", "retry", "supervisor", "metrics", "log"}


def test_check_reports_every_error_one_line_each(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text('[executors]\ncout = 2\n[log]\nlevel = "loud"\n')
    code, out, err = run(capsys, "check", str(path))
    assert code == EXIT_USAGE and out == ""
    assert err.splitlines() == [
        f"supervise: {path}: executors.cout: unknown key; did you mean executors.count?",
        f'supervise: {path}: log.level = "loud": must be one of "debug", "info", "warning", "error"',
    ]


# -- enqueue -----------------------------------------------------------------------------------

def test_enqueue_from_arguments_with_tag_and_delay(
        capsys: pytest.CaptureFixture[str], cfg_path: Path) -> None:
    code, out, _ = run(capsys, "enqueue", str(cfg_path), "--tag", "t1", "a", "--delay", "60", "b")
    assert (code, out) == (EXIT_OK, "enqueued 2 tasks to queue 'jobs'\n")
    listed = tasks(capsys, cfg_path)
    assert [(t["payload"], t["tag"], t["state"]) for t in listed] == [
        ("a", "t1", "delayed"), ("b", "t1", "delayed")]
    assert (cfg_path.parent / "tasks.db").exists()  # relative to the config, not the working dir


def test_enqueue_from_stdin_skips_blank_lines(capsys: pytest.CaptureFixture[str], cfg_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    code, out, _ = run(capsys, "enqueue", str(cfg_path), stdin=b"one\n\ntwo\r\nthree",
                       monkeypatch=monkeypatch)
    assert (code, out) == (EXIT_OK, "enqueued 3 tasks to queue 'jobs'\n")
    assert [t["payload"] for t in tasks(capsys, cfg_path)] == ["one", "two", "three"]


def test_enqueue_more_than_one_batch(capsys: pytest.CaptureFixture[str], cfg_path: Path,
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    lines = b"".join(b"task-%d\n" % i for i in range(2500))  # > limits.max_ack_batch (1000)
    code, out, _ = run(capsys, "enqueue", str(cfg_path), stdin=lines, monkeypatch=monkeypatch)
    assert (code, out) == (EXIT_OK, "enqueued 2500 tasks to queue 'jobs'\n")
    assert stats(capsys, cfg_path)["ready"] == 2500


def test_enqueue_base64_keeps_binary_payloads(capsys: pytest.CaptureFixture[str], cfg_path: Path) -> None:
    blob = bytes(range(256))
    code, _, _ = run(capsys, "enqueue", str(cfg_path), "--base64", base64.b64encode(blob).decode())
    assert code == EXIT_OK
    [task] = tasks(capsys, cfg_path)
    assert task["payload_encoding"] == "base64" and base64.b64decode(task["payload"]) == blob
    with open_backend(f"sqlite:///{cfg_path.parent}/tasks.db", "jobs") as backend:
        assert backend.get(task["id"]).payload == blob


def test_enqueue_bad_base64_names_the_payload_and_enqueues_nothing(
        capsys: pytest.CaptureFixture[str], cfg_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    code, out, err = run(capsys, "enqueue", str(cfg_path), "--base64", "aGk=", "not base64!")
    assert code == EXIT_USAGE and out == ""
    assert one_error_line(err) == "supervise: payload 2 is not valid base64; nothing enqueued"
    code, _, err = run(capsys, "enqueue", str(cfg_path), "--base64", stdin=b"aGk=\n\n%%%\n",
                       monkeypatch=monkeypatch)
    assert code == EXIT_USAGE
    assert one_error_line(err) == "supervise: stdin line 3 is not valid base64; nothing enqueued"
    assert stats(capsys, cfg_path)["ready"] == 0


# -- queue VERB --------------------------------------------------------------------------------

def test_queue_stats_text(capsys: pytest.CaptureFixture[str], cfg_path: Path) -> None:
    run(capsys, "enqueue", str(cfg_path), "x", "y")
    code, out, _ = run(capsys, "queue", "stats", str(cfg_path))
    assert code == EXIT_OK
    lines = out.splitlines()
    assert lines[0] == f"queue    jobs at sqlite:///{cfg_path.parent}/tasks.db"
    assert lines[1:5] == ["ready    2", "leased   0", "delayed  0", "dead     0"]
    assert lines[5].startswith("oldest   ") and lines[5].endswith("s")


def test_queue_list_filters_and_limits(capsys: pytest.CaptureFixture[str], cfg_path: Path) -> None:
    run(capsys, "enqueue", str(cfg_path), "a", "b", "c")
    run(capsys, "enqueue", str(cfg_path), "--delay", "600", "later")
    assert [t["payload"] for t in tasks(capsys, cfg_path, "--limit", "2")] == ["a", "b"]
    assert [t["payload"] for t in tasks(capsys, cfg_path, "--state", "delayed")] == ["later"]
    code, out, _ = run(capsys, "queue", "list", str(cfg_path))
    assert code == EXIT_OK
    header, *rows = out.splitlines()
    assert header.split() == ["ID", "STATE", "ATTEMPT", "TAG", "AGE", "PAYLOAD"]
    assert len(rows) == 4 and rows[3].split()[-1] == "later"


def test_queue_get(capsys: pytest.CaptureFixture[str], cfg_path: Path) -> None:
    run(capsys, "enqueue", str(cfg_path), "--tag", "red", "héllo")
    [task] = tasks(capsys, cfg_path)
    code, out, _ = run(capsys, "queue", "get", str(cfg_path), task["id"])
    assert code == EXIT_OK
    assert f"id:                {task['id']}" in out.splitlines()
    assert "payload (utf-8):   héllo" in out.splitlines() and "tag:               red" in out.splitlines()
    code, out, _ = run(capsys, "queue", "get", str(cfg_path), task["id"], "--json")
    assert json.loads(out)["payload"] == "héllo"
    code, out, err = run(capsys, "queue", "get", str(cfg_path), "999")
    assert code == EXIT_GAVE_UP and one_error_line(err) == "supervise: no task '999' in queue 'jobs'"


def test_queue_delete(capsys: pytest.CaptureFixture[str], cfg_path: Path) -> None:
    run(capsys, "enqueue", str(cfg_path), "a", "b")
    ids = [t["id"] for t in tasks(capsys, cfg_path)]
    code, out, _ = run(capsys, "queue", "delete", str(cfg_path), ids[0], "999")
    assert (code, out) == (EXIT_OK, "deleted 1 task (1 not found)\n")
    assert [t["id"] for t in tasks(capsys, cfg_path)] == ids[1:]


def test_queue_lease_prints_receipts(capsys: pytest.CaptureFixture[str], cfg_path: Path) -> None:
    run(capsys, "enqueue", str(cfg_path), "a", "b", "c")
    run(capsys, "enqueue", str(cfg_path), "--tag", "gpu", "g")
    code, out, _ = run(capsys, "queue", "lease", str(cfg_path), "--count", "2", "--lease-secs", "60",
                       "--json")
    assert code == EXIT_OK
    leased = json.loads(out)
    assert [(t["payload"], t["attempt"]) for t in leased] == [("a", 1), ("b", 1)]
    assert all(t["receipt"] for t in leased)
    code, out, _ = run(capsys, "queue", "lease", str(cfg_path), "--tag", "gpu")
    assert code == EXIT_OK and "g" in out.splitlines()[1].split() and out.startswith("ID")
    assert stats(capsys, cfg_path)["leased"] == 3
    # the receipts printed are real: they settle the delivery
    with open_backend(f"sqlite:///{cfg_path.parent}/tasks.db", "jobs") as backend:
        assert set(backend.ack([leased[0]["receipt"]]).values()) == {"ok"}


def test_queue_lease_refuses_a_lease_length_the_backend_does_not_take(
        capsys: pytest.CaptureFixture[str], cfg_path: Path) -> None:
    code, _, err = run(capsys, "queue", "lease", str(cfg_path), "--lease-secs", "1e9")
    assert code == EXIT_USAGE and "--lease-secs 1e+09: this backend takes" in one_error_line(err)


def test_queue_requeue_dead(capsys: pytest.CaptureFixture[str], cfg_path: Path) -> None:
    run(capsys, "enqueue", str(cfg_path), "a", "b", "c")
    with open_backend(f"sqlite:///{cfg_path.parent}/tasks.db", "jobs") as backend:
        leased = backend.lease(3, 30)
        backend.dead_letter([t.receipt for t in leased], "boom")
    assert stats(capsys, cfg_path)["dead"] == 3
    code, out, _ = run(capsys, "queue", "requeue", str(cfg_path), leased[0].task_id)
    assert (code, out) == (EXIT_OK, "requeued 1 dead task\n")
    code, out, _ = run(capsys, "queue", "requeue", str(cfg_path), "--dead")
    assert (code, out) == (EXIT_OK, "requeued 2 dead tasks\n")
    assert stats(capsys, cfg_path)["ready"] == 3
    for argv in (["--dead", "1"], []):
        code, _, err = run(capsys, "queue", "requeue", str(cfg_path), *argv)
        assert code == EXIT_USAGE and "give either --dead" in one_error_line(err)


def test_queue_purge_needs_yes(capsys: pytest.CaptureFixture[str], cfg_path: Path) -> None:
    run(capsys, "enqueue", str(cfg_path), "a", "b")
    code, out, err = run(capsys, "queue", "purge", str(cfg_path))
    assert code == EXIT_USAGE and out == "" and "add --yes" in one_error_line(err)
    assert stats(capsys, cfg_path)["ready"] == 2
    code, out, _ = run(capsys, "queue", "purge", str(cfg_path), "--yes")
    assert (code, out) == (EXIT_OK, "purged 2 tasks from queue 'jobs'\n")
    assert stats(capsys, cfg_path)["ready"] == 0


# -- the core commands on the servers ----------------------------------------------------------

@pytest.fixture(params=["redis", "postgresql", "nats"])
def server_cfg(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Path]:
    """A config on a queue of its own on one server (FAILS under CI=true when the server is not
    there, skips otherwise); the queue is dropped afterwards."""
    kind = request.param
    ok, why = available(kind)
    if not ok:
        require_server(kind, why)
    # what these commands do is what the conformance suite's admin case does: the same limitations
    if expected := limitation(kind, "test_admin_calls_list_get_delete_purge_and_count"):
        request.applymarker(pytest.mark.xfail(**expected))
    url, name = SERVER_URLS[kind], unique_queue("cli")
    path = tmp_path / "tree.toml"
    path.write_text(f'[queue]\nurl = "{url}"\nname = "{name}"\n')
    yield path
    if kind == "nats":
        from tests.integration.nats_js import drop_queue

        with contextlib.suppress(Exception):
            drop_queue(url, name)
    else:
        with contextlib.suppress(Exception), open_backend(url, name, tmp_path) as backend:
            backend.purge()


def test_enqueue_stats_list_get_delete_and_requeue_on_a_server(
        capsys: pytest.CaptureFixture[str], server_cfg: Path) -> None:
    path = str(server_cfg)
    cfg = config.load(server_cfg)
    assert run(capsys, "enqueue", path, "a", "b", "c") == (
        EXIT_OK, f"enqueued 3 tasks to queue {cfg.queue.name!r}\n", "")
    assert run(capsys, "enqueue", path, "--delay", "600", "later")[0] == EXIT_OK
    counts = stats(capsys, server_cfg)
    assert [counts[k] for k in ("ready", "leased", "delayed", "dead")] == [3, 0, 1, 0]
    code, out, _ = run(capsys, "queue", "stats", path)
    assert code == EXIT_OK
    assert out.splitlines()[:2] == [f"queue    {cfg.queue.name} at {cfg.queue.url}", "ready    3"]

    listed = tasks(capsys, server_cfg)
    assert [(t["payload"], t["state"]) for t in listed] == [
        ("a", "ready"), ("b", "ready"), ("c", "ready"), ("later", "delayed")]
    code, out, _ = run(capsys, "queue", "get", path, listed[3]["id"], "--json")
    assert code == EXIT_OK and (json.loads(out)["payload"], json.loads(out)["state"]) == ("later", "delayed")
    code, _, err = run(capsys, "queue", "get", path, "999999999")
    assert code == EXIT_GAVE_UP
    assert one_error_line(err) == f"supervise: no task '999999999' in queue {cfg.queue.name!r}"
    code, out, _ = run(capsys, "queue", "delete", path, listed[2]["id"], "999999999")
    assert (code, out) == (EXIT_OK, "deleted 1 task (1 not found)\n")

    code, out, _ = run(capsys, "queue", "lease", path, "--count", "2", "--lease-secs", "60", "--json")
    leased = json.loads(out)
    assert code == EXIT_OK and [t["payload"] for t in leased] == ["a", "b"]
    with open_backend(cfg.queue.url, cfg.queue.name, cfg.base_dir) as backend:
        backend.dead_letter([t["receipt"] for t in leased], "boom")
    assert [t["payload"] for t in tasks(capsys, server_cfg, "--state", "dead")] == ["a", "b"]
    assert run(capsys, "queue", "requeue", path, "--dead") == (EXIT_OK, "requeued 2 dead tasks\n", "")
    counts = stats(capsys, server_cfg)
    assert [counts[k] for k in ("ready", "leased", "delayed", "dead")] == [2, 0, 1, 0]


# -- errors ------------------------------------------------------------------------------------

def test_a_file_that_is_not_a_database(capsys: pytest.CaptureFixture[str], cfg_path: Path) -> None:
    db = cfg_path.parent / "tasks.db"
    db.write_bytes(b"this is not sqlite\n" * 10)
    code, out, err = run(capsys, "enqueue", str(cfg_path), "a")
    assert code == EXIT_USAGE and out == ""
    assert "not an SQLite database" in one_error_line(err)
    assert db.read_bytes() == b"this is not sqlite\n" * 10


def test_backend_unavailable_exits_1(capsys: pytest.CaptureFixture[str], cfg_path: Path,
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    # A transient fault cannot be produced on demand from a real server in a fast test.
    class Down(MemoryBackend):
        def stats(self):  # noqa: ANN202
            raise BackendUnavailable("connection refused (127.0.0.1:6379)")

    monkeypatch.setattr(cli, "open_backend", lambda url, name, base_dir: Down())
    code, out, err = run(capsys, "queue", "stats", str(cfg_path))
    assert code == EXIT_GAVE_UP and out == ""
    assert one_error_line(err) == "supervise: queue unavailable: connection refused (127.0.0.1:6379)"


def test_an_argument_the_backend_refuses_is_one_line_exit_2(
        capsys: pytest.CaptureFixture[str], cfg_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # as SQS refuses a delay over 900 s (a ValueError from enqueue), without a server to refuse it
    class Refuses(MemoryBackend):
        def enqueue(self, payloads, delay_secs=0.0, tag=""):  # noqa: ANN001, ANN202
            raise ValueError(f"delay of {delay_secs:g} s is over the 900 s that SQS allows")

    monkeypatch.setattr(cli, "open_backend", lambda url, name, base_dir: Refuses())
    code, out, err = run(capsys, "enqueue", str(cfg_path), "--delay", "1000", "a")
    assert code == EXIT_USAGE and out == ""
    assert one_error_line(err) == ("supervise: delay of 1000 s is over the 900 s that SQS allows; "
                                   "nothing enqueued")


@pytest.mark.parametrize("argv", [
    [], ["queue"], ["check"], ["queue", "list", "c.toml", "--limit", "0"],
    ["queue", "list", "c.toml", "--bogus"],
    ["enqueue", "c.toml", "--delay", "soon"], ["queue", "list", "c.toml", "--state", "gone"],
])
def test_bad_arguments_are_one_line_exit_2(capsys: pytest.CaptureFixture[str], argv: list[str]) -> None:
    code, out, err = run(capsys, *argv)
    assert code == EXIT_USAGE and out == ""
    assert one_error_line(err).endswith("--help')")


@pytest.mark.parametrize("argv", [["--help"], ["queue", "--help"], ["queue", "lease", "--help"],
                                  ["queue", "list", "--help"], ["enqueue", "--help"], ["run", "--help"]])
def test_help(capsys: pytest.CaptureFixture[str], argv: list[str]) -> None:
    code, out, err = run(capsys, *argv)
    assert code == EXIT_OK and err == "" and out.startswith("usage: supervise")
    if argv[0] == "queue":
        assert "(was " in out or "leasetask -> queue lease" in out  # the seed's verb it succeeds
    if argv[0] in ("queue", "enqueue"):  # what NATS and SQS cannot do, said where it matters
        text = " ".join(out.split())
        for limit in ("leased either by tag", "see dead tasks only", "at most 900 s",
                      "cannot take back a delivery", "approximate"):
            assert limit in text, limit


def test_version_is_looked_up_only_when_asked(capsys: pytest.CaptureFixture[str],
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    looked_up: list[str] = []
    monkeypatch.setattr(cli, "_version", lambda: looked_up.append("v") or "1.2.3")
    cli.build_parser().parse_args(["check", "c.toml"])
    assert looked_up == []
    assert run(capsys, "--version") == (EXIT_OK, "supervise 1.2.3\n", "")
    assert looked_up == ["v"]


# -- run / status / stop hand over to supervisor.app -------------------------------------------

@pytest.fixture()
def fake_app(monkeypatch: pytest.MonkeyPatch) -> list[tuple]:
    # supervisor.app runs the real tree (tested with it); here only the hand-over is checked.
    import supervisor

    calls: list[tuple] = []
    app = types.ModuleType("supervisor.app")
    app.run = lambda cfg, burst=False: calls.append(("run", cfg, burst)) or 0  # type: ignore[attr-defined]
    app.status = lambda cfg, as_json: calls.append(("status", cfg, as_json)) or 0  # type: ignore[attr-defined]
    app.stop = lambda cfg, cold: calls.append(("stop", cfg, cold)) or 1  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "supervisor.app", app)
    monkeypatch.setattr(supervisor, "app", app, raising=False)
    return calls


def test_bare_config_means_run(capsys: pytest.CaptureFixture[str], cfg_path: Path, fake_app: list) -> None:
    assert run(capsys, str(cfg_path))[0] == 0
    assert run(capsys, "run", str(cfg_path), "--burst")[0] == 0
    assert run(capsys, str(cfg_path), "--burst")[0] == 0
    assert [(c[0], c[2]) for c in fake_app] == [("run", False), ("run", True), ("run", True)]
    assert fake_app[0][1] == config.load(cfg_path)


def test_status_and_stop(capsys: pytest.CaptureFixture[str], cfg_path: Path, fake_app: list) -> None:
    assert run(capsys, "status", str(cfg_path), "--json")[0] == 0
    assert run(capsys, "stop", str(cfg_path), "--cold")[0] == 1  # app's code is passed through
    assert [(c[0], c[2]) for c in fake_app] == [("status", True), ("stop", True)]


def test_run_with_a_bad_config_never_reaches_the_app(capsys: pytest.CaptureFixture[str], tmp_path: Path,
                                                     fake_app: list) -> None:
    code, _, err = run(capsys, str(tmp_path / "missing.toml"))
    assert code == EXIT_USAGE and fake_app == []
    assert one_error_line(err) == f"supervise: {tmp_path / 'missing.toml'}: no such file"
