"""The real `supervise` command as a subprocess: exit codes, one-line errors, no traceback, nothing
written on bad input; and the shipped example config working end to end on SQLite."""

from __future__ import annotations

import json
import os
import pwd
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from supervisor.exits import EXIT_OK, EXIT_USAGE
from supervisor.privileges import chown_for

pytestmark = pytest.mark.timeout(60)

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "config" / "example.toml"


def supervise(*argv: str, stdin: bytes = b"", cwd: Path | None = None,
              prefix: tuple[str, ...] = ()) -> subprocess.CompletedProcess[str]:
    done = subprocess.run([*prefix, sys.executable, "-m", "supervisor", *argv], input=stdin.decode(),
                          cwd=cwd, capture_output=True, text=True, timeout=30)
    assert "Traceback" not in done.stderr, done.stderr
    return done


def one_line(done: subprocess.CompletedProcess[str]) -> str:
    lines = done.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("supervise: "), done.stderr
    return lines[0]


@pytest.fixture()
def example(tmp_path: Path) -> Path:
    """A copy of the shipped example, so its database lands in tmp_path."""
    path = tmp_path / "example.toml"
    shutil.copy(EXAMPLE, path)
    return path


def test_missing_config(tmp_path: Path) -> None:
    done = supervise("check", str(tmp_path / "nope.toml"))
    assert done.returncode == EXIT_USAGE and done.stdout == ""
    assert one_line(done) == f"supervise: {tmp_path / 'nope.toml'}: no such file"


def test_bare_config_that_is_missing_is_a_usage_error(tmp_path: Path) -> None:
    done = supervise(str(tmp_path / "nope.toml"))
    assert done.returncode == EXIT_USAGE and "no such file" in one_line(done)


def test_toml_syntax_error_names_the_line(tmp_path: Path) -> None:
    path = tmp_path / "broken.toml"
    path.write_text('[queue]\nurl = "sqlite:///t.db"\n\n[executors\ncount = 2\n')
    for command in (["check"], ["enqueue"], ["queue", "stats"]):
        done = supervise(*command, str(path))
        assert done.returncode == EXIT_USAGE
        assert one_line(done).startswith(f"supervise: {path}: line 4, column 11: TOML syntax error")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken.toml"]  # no database created


def test_bad_argument() -> None:
    done = supervise("queue", "lease", str(EXAMPLE), "--count", "many")
    assert done.returncode == EXIT_USAGE
    assert one_line(done) == ("supervise: argument --count: 'many' is not an integer "
                              "(see 'supervise queue lease --help')")


def test_no_arguments() -> None:
    done = supervise()
    assert done.returncode == EXIT_USAGE and "required: COMMAND" in one_line(done)


def test_bad_base64_on_stdin_enqueues_nothing(example: Path) -> None:
    done = supervise("enqueue", str(example), "--base64", stdin=b"aGVsbG8=\n*not base64*\n")
    assert done.returncode == EXIT_USAGE and done.stdout == ""
    assert one_line(done) == "supervise: stdin line 2 is not valid base64; nothing enqueued"
    stats = supervise("queue", "stats", str(example), "--json")
    assert json.loads(stats.stdout)["ready"] == 0


def test_corrupt_database_is_left_alone(example: Path) -> None:
    db = example.parent / "example-tasks.db"
    db.write_bytes(b"\x00garbage" * 100)
    before = db.read_bytes()
    done = supervise("enqueue", str(example), "hello")
    assert done.returncode == EXIT_USAGE and done.stdout == ""
    assert str(db) in one_line(done)
    assert db.read_bytes() == before
    assert sorted(p.name for p in example.parent.iterdir()) == ["example-tasks.db", "example.toml"]


# Root ignores file modes, so to see a read-only file or folder the way an operator's user does,
# the CLI runs as "nobody": through setpriv(1) where it is installed, else dropped by the project's
# own privilege code before it execs (which needs the interpreter's path to be open to nobody).
DROP_THEN_EXEC = ("import os, sys\n"
                  "from supervisor.privileges import drop_privileges\n"
                  "drop_privileges(sys.argv[1], '')\n"
                  "os.execv(sys.argv[2], sys.argv[2:])\n")
UNPRIVILEGED = "nobody"


def unprivileged_prefix() -> tuple[str, ...]:
    """The argv prefix that runs a command as a user file modes apply to (none when not root)."""
    if os.geteuid() != 0:
        return ()
    try:
        entry = pwd.getpwnam(UNPRIVILEGED)
    except KeyError:
        pytest.skip(f"running as root with no user {UNPRIVILEGED!r} to drop to: root ignores file modes")
    setpriv = shutil.which("setpriv")
    if setpriv:
        return (setpriv, f"--reuid={entry.pw_uid}", f"--regid={entry.pw_gid}", "--clear-groups")
    # os.access answers for root here: read the "others may search" bit of each folder instead
    if not all(p.stat().st_mode & 0o001 for p in Path(os.path.realpath(sys.executable)).parents):
        pytest.skip(f"no setpriv, and {UNPRIVILEGED} cannot reach {os.path.realpath(sys.executable)}")
    return (sys.executable, "-c", DROP_THEN_EXEC, UNPRIVILEGED)


@pytest.fixture()
def shared_example() -> Iterator[Path]:
    """The example config with a one-task database, in a folder of /tmp the dropped user can enter
    (pytest's tmp_path is 0700 root's) and owns, like the database: only the modes the test sets
    stand in its way."""
    folder = Path(tempfile.mkdtemp(prefix="lt-cli-"))
    try:
        path = folder / "example.toml"
        shutil.copy(EXAMPLE, path)
        assert supervise("enqueue", str(path), "kept").returncode == EXIT_OK
        folder.chmod(0o755)
        path.chmod(0o644)
        if os.geteuid() == 0:
            chown_for(folder, UNPRIVILEGED, "")
        yield path
    finally:
        folder.chmod(0o755)
        shutil.rmtree(folder, ignore_errors=True)


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def expect_left_alone(config: Path, prefix: tuple[str, ...], *words: str) -> None:
    """`supervise enqueue` exits 2 with one line naming the database and ``words``, no traceback,
    and every byte of the folder as it was."""
    db = config.parent / "example-tasks.db"
    before = snapshot(config.parent)
    done = supervise("enqueue", str(config), "more", prefix=prefix)
    assert done.returncode == EXIT_USAGE and done.stdout == ""
    line = one_line(done)
    assert str(db) in line and all(word in line for word in words), line
    assert snapshot(config.parent) == before


@pytest.mark.parametrize("who", ["this user", "unprivileged"])
def test_read_only_database_file_is_left_alone(shared_example: Path, who: str) -> None:
    # as root the backend reads the mode bits (root passes os.access), as test_sqlite_backend does
    prefix = () if who == "this user" else unprivileged_prefix()
    if who == "unprivileged" and not prefix:
        pytest.skip("this user is unprivileged already: the first case covers it")
    db = shared_example.parent / "example-tasks.db"
    db.chmod(0o444)
    expect_left_alone(shared_example, prefix, "read-only")


def test_read_only_database_folder_is_left_alone(shared_example: Path) -> None:
    prefix = unprivileged_prefix()
    shared_example.parent.chmod(0o555)  # the file is writable; WAL's files could not be created
    expect_left_alone(shared_example, prefix, "not writable")


def test_database_folder_missing(tmp_path: Path) -> None:
    path = tmp_path / "tree.toml"
    path.write_text('[queue]\nurl = "sqlite:///no/such/dir/t.db"\n')
    done = supervise("queue", "stats", str(path))
    assert done.returncode == EXIT_USAGE and "does not exist" in one_line(done)
    assert not (tmp_path / "no").exists()


def test_example_enqueue_inspect_from_another_folder(example: Path, tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    done = supervise("enqueue", str(example), stdin=b"hello\nworld\n", cwd=elsewhere)
    assert (done.returncode, done.stdout) == (EXIT_OK, "enqueued 2 tasks to queue 'example'\n")
    assert (example.parent / "example-tasks.db").exists() and not list(elsewhere.iterdir())
    stats = json.loads(supervise("queue", "stats", str(example), "--json").stdout)
    assert (stats["ready"], stats["queue"]) == (2, "example")
    listed = json.loads(supervise("queue", "list", str(example), "--json").stdout)
    got = supervise("queue", "get", str(example), listed[1]["id"])
    assert got.returncode == EXIT_OK and "payload (utf-8):   world" in got.stdout.splitlines()


def test_check_on_the_shipped_example() -> None:
    done = supervise("check", str(EXAMPLE))
    assert done.returncode == EXIT_OK and done.stderr == ""
    assert f'url = "sqlite:///{ROOT}/config/example-tasks.db"' in done.stdout


def test_example_command_upper_cases_the_input_file(tmp_path: Path) -> None:
    # Run the example's command exactly as an executor does: argv + [INPUT_FILE, OUTPUT_FILE].
    import config

    argv = list(config.load(EXAMPLE).executors.command)
    infile, outfile = tmp_path / "in", tmp_path / "out"
    infile.write_bytes(b"hello, World $HOME `x`\n")
    done = subprocess.run([*argv, str(infile), str(outfile)], capture_output=True, timeout=10)
    assert done.returncode == 0, done.stderr
    assert outfile.read_bytes() == b"HELLO, WORLD $HOME `X`\n"


def test_console_script() -> None:
    script = Path(sys.executable).parent / "supervise"
    if not script.exists():
        pytest.skip("the package is not installed with its console script here")
    done = subprocess.run([str(script), "--version"], capture_output=True, text=True, timeout=30)
    assert done.returncode == EXIT_OK and done.stdout.startswith("supervise ")
