"""Security: private sockets, no unpickling, no shell, no secrets in output, dropping root.

The permission tests need two users (marked ``needs_root``): they run as root and fork a child that
drops to ``nobody`` (``supervisor.privileges.drop_privileges``), so every check is the kernel's real
one. Each negative check has a positive control (the same probe succeeds where the modes allow
it), so a probe that could never succeed proves nothing and would fail the control.
"""

from __future__ import annotations

import ast
import errno
import grp
import json
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import traceback
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import zmq  # imported here: a child dropped to nobody cannot read the stdlib under /root

from children import protocol
from supervisor.privileges import PrivilegeError, chown_for, drop_privileges, resolve_ids
from supervisor.rundir import RuntimeDirError, runtime_dir
from tests.integration.harness import RunningTree, enqueue, supervise, wait_until, write_config

pytestmark = pytest.mark.timeout(90)

#: on each test that forks a child dropped to a second uid, or chowns to one; the rest run as anyone
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to switch to a second uid")

ROOT = Path(__file__).resolve().parents[2]
NOBODY = pwd.getpwnam("nobody")
NOGROUP = grp.getgrgid(NOBODY.pw_gid)


# -- helpers -----------------------------------------------------------------------------------

def in_child(fn: Callable[[], Any], user: str = "", group: str = "") -> Any:
    """Fork; in the child drop to ``user``:``group`` and run ``fn``; return its JSON-able result,
    or raise AssertionError with the child's error. The child never returns into pytest."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: always leaves through os._exit
        code = 0
        try:
            os.close(read_end)
            drop_privileges(user, group)
            reply = {"ok": fn()}
        except BaseException as exc:  # noqa: BLE001 - report anything to the parent
            reply = {"error": f"{exc.__class__.__name__}: {exc}", "tb": traceback.format_exc()}
            code = 1
        try:
            os.write(write_end, json.dumps(reply).encode())
        finally:
            os._exit(code)
    os.close(write_end)
    chunks = []
    with os.fdopen(read_end, "rb") as pipe:
        while chunk := pipe.read(65536):
            chunks.append(chunk)
    os.waitpid(pid, 0)
    reply = json.loads(b"".join(chunks) or b'{"error": "child died without a word"}')
    if "error" in reply:
        raise AssertionError(f"{reply['error']}\n{reply['tb']}")
    return reply["ok"]


def unix_connect(path: str) -> str:
    """'connected', or the errno name the kernel answered."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        try:
            sock.connect(path)
        except OSError as exc:
            return errno.errorcode.get(exc.errno or 0, str(exc))
    return "connected"


def zmq_echo_reply(path: str, wait_ms: int, frame: bytes = b"hello") -> bool:
    """Connect a DEALER to ``ipc://path``, send ``frame``, and say whether any reply came back."""
    ctx = zmq.Context()  # a fresh context in this (forked) process, never the parent's
    try:
        sock = ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(f"ipc://{path}")
        sock.send(frame)
        return bool(sock.poll(wait_ms))
    finally:
        ctx.destroy(linger=0)


ECHO_SERVER = textwrap.dedent("""
    import os, sys, zmq
    path, mode = sys.argv[1], int(sys.argv[2], 8)
    ctx = zmq.Context()
    sock = ctx.socket(zmq.ROUTER)
    sock.bind("ipc://" + path)
    os.chmod(path, mode)
    print("ready", flush=True)
    while True:
        sock.send_multipart(sock.recv_multipart())
""")


@pytest.fixture
def open_tmp() -> Iterator[Path]:
    """A folder in /tmp that ``nobody`` may walk into (pytest's own tmp_path sits in a 0700 one)."""
    folder = Path(tempfile.mkdtemp(prefix="leasetree-sec-", dir="/tmp"))
    folder.chmod(0o755)
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture
def echo_server(open_tmp: Path) -> Iterator[Callable[[int, int], str]]:
    """``start(dir_mode, socket_mode)`` -> the path of a root-owned zmq ROUTER that echoes."""
    processes: list[subprocess.Popen[str]] = []

    def start(dir_mode: int, socket_mode: int) -> str:
        folder = open_tmp / f"run-{len(processes)}"
        folder.mkdir()
        path = folder / "echo.ipc"
        process = subprocess.Popen([sys.executable, "-c", ECHO_SERVER, str(path), oct(socket_mode)],
                                   stdout=subprocess.PIPE, text=True)
        processes.append(process)
        assert process.stdout is not None and process.stdout.readline().strip() == "ready"
        folder.chmod(dir_mode)
        return str(path)

    yield start
    for process in processes:
        process.kill()
        process.wait()


# -- the runtime dir and its sockets -------------------------------------------------------------

@needs_root
@pytest.mark.parametrize("dir_mode, socket_mode, reachable", [
    (0o700, 0o777, False),  # the private dir alone keeps nobody out
    (0o755, 0o600, False),  # the 0600 socket alone keeps nobody out
    (0o755, 0o777, True),  # the control: with both open, the same probe gets through
])
def test_second_uid_cannot_connect_to_a_private_socket(echo_server, dir_mode: int, socket_mode: int,
                                                       reachable: bool) -> None:
    path = echo_server(dir_mode, socket_mode)
    assert in_child(lambda: zmq_echo_reply(path, 3000), "root") is True
    assert in_child(lambda: zmq_echo_reply(path, 3000 if reachable else 300), "nobody") is reachable
    raw = in_child(lambda: unix_connect(path), "nobody")
    assert raw == ("connected" if reachable else "EACCES")


@needs_root
def test_runtime_dir_is_0700_and_owned_by_the_user(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
    folder = runtime_dir(tmp_path / "tree.toml")
    for path in (folder, folder.parent):
        info = path.stat()
        assert (info.st_mode & 0o777, info.st_uid) == (0o700, os.getuid())
    folder.chmod(0o755)  # loosened behind our back: tightened again on the next start
    runtime_dir(tmp_path / "tree.toml")
    assert folder.stat().st_mode & 0o777 == 0o700
    os.chown(folder, NOBODY.pw_uid, NOBODY.pw_gid)  # someone else's: refused, not used
    with pytest.raises(RuntimeDirError, match=f"belongs to uid {NOBODY.pw_uid}"):
        runtime_dir(tmp_path / "tree.toml")


@needs_root
def test_running_trees_sockets_are_private(tmp_path: Path) -> None:
    config = write_config(tmp_path)
    with RunningTree(config) as tree:
        tree.wait_ready()
        folder = runtime_dir(config, create=False)
        info = folder.stat()
        assert (info.st_mode & 0o777, info.st_uid) == (0o700, os.getuid())
        sockets = sorted(folder.glob("*.ipc"))
        assert {p.name for p in sockets} >= {"leaser.ipc"}, sockets
        for path in sockets:
            info = path.stat()
            assert (oct(info.st_mode & 0o777), info.st_uid) == (oct(0o600), os.getuid()), path
            assert in_child(lambda p=str(path): unix_connect(p), "nobody") == "EACCES", path
            assert in_child(lambda p=str(path): unix_connect(p), "root") == "connected", path
        # a valid status request over the control socket: answered for us, never for nobody
        control = str(folder / "control.ipc")
        request = protocol.encode(protocol.Request("status", {}))
        assert in_child(lambda: zmq_echo_reply(control, 5000, request), "root") is True
        assert in_child(lambda: zmq_echo_reply(control, 500, request), "nobody") is False


# -- nothing on a socket is unpickled ---------------------------------------------------------

UNPICKLERS = {"pickle", "_pickle", "cPickle", "dill", "cloudpickle", "marshal", "shelve", "jsonpickle"}
PICKLING_CALLS = {"recv_pyobj", "send_pyobj", "recv_serialized", "send_serialized"}


def _imports(tree: ast.AST) -> Iterator[tuple[int, str]]:
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name.split(".")[0]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            yield node.lineno, node.module.split(".")[0]


def test_no_unpickling_anywhere_in_the_tree() -> None:
    sources = sorted((ROOT / "children").rglob("*.py")) + sorted((ROOT / "supervisor").rglob("*.py"))
    assert len(sources) > 20
    found = []
    for path in sources:
        tree = ast.parse(path.read_text(), str(path))
        where = path.relative_to(ROOT).as_posix()
        for line, module in _imports(tree):
            if module in UNPICKLERS:
                found.append(f"{where}:{line}: imports {module}")
            if module in ("multiprocess", "multiprocessing") and where != "supervisor/runner.py":
                found.append(f"{where}:{line}: imports {module} (only supervisor/runner.py may)")
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and node.attr in PICKLING_CALLS:
                found.append(f"{where}:{node.lineno}: calls {node.attr} (pickles)")
    assert found == []


# -- no payload reaches a shell ---------------------------------------------------------------

def test_no_payload_or_tag_reaches_a_shell(tmp_path: Path) -> None:
    marker = Path(f"/tmp/pwned-{uuid.uuid4().hex[:8]}")
    attacks = [f"$(touch {marker}-1)", f"; touch {marker}-2", f"`touch {marker}-3`", f"| touch {marker}-4",
               f"&& touch {marker}-5", f"\ntouch {marker}-6\n", f"' ; touch {marker}-7 ; '"]
    # a script that uses its file arguments correctly: quoting is the script's job, and the
    # executor gives it file names, never the payload
    script = tmp_path / "copy.sh"
    script.write_text('#!/bin/sh\ncp "$1" "$2"\necho "tag=$SUPERVISE_TASK_TAG" >> "$2"\n')
    script.chmod(0o755)
    config = write_config(tmp_path, executors={"command": [str(script)]})
    lines = [a.replace("\n", " ") for a in attacks]
    enqueue(config, lines)
    enqueue(config, ["plain"], tag=f"$(touch {marker}-tag)")
    with RunningTree(config, burst=True) as tree:
        assert tree.wait_exit(timeout=60) == 0, tree.output()
    from tests.integration.harness import queue_stats

    stats = queue_stats(config)
    assert (stats.ready, stats.leased, stats.delayed, stats.dead) == (0, 0, 0, 0)
    assert sorted(Path("/tmp").glob(marker.name + "*")) == []


# -- secrets in queue URLs --------------------------------------------------------------------

SECRET = "S3cret-" + uuid.uuid4().hex[:10]


def _proc_cmdlines(pids: list[int]) -> str:
    text = []
    for pid in pids:
        try:
            text.append(Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode())
        except OSError:
            pass
    return "\n".join(text)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _metrics_body(port: int) -> str:
    import urllib.request

    try:
        return urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    except OSError:
        return ""


@pytest.mark.parametrize("log_format", ["text", "json"])
def test_queue_url_password_never_printed(tmp_path: Path, log_format: str) -> None:
    """check, queue stats, status, top --once, the metrics body, every command line and the tree's
    debug log in both formats show the URL as ``postgres:***@``, never the password."""
    from tests.backends import SERVER_URLS, available, require_server

    up, why = available("postgresql")
    if not up:
        require_server("postgresql", why)  # fails under CI=true, skips otherwise
    queue = f"sec-{uuid.uuid4().hex[:8]}"
    user, _, server = SERVER_URLS["postgresql"].split("://", 1)[1].rpartition("@")
    user = user.split(":", 1)[0] or "postgres"
    url = f"postgresql://{user}:{SECRET}@{server}"  # trust auth here: the password is unused
    port = _free_port()
    config = write_config(tmp_path, queue={"url": url, "name": queue},
                          log={"level": "debug", "format": log_format},
                          metrics={"listen": f"127.0.0.1:{port}"})
    seen = []
    for args in (["check", str(config)], ["queue", "stats", str(config)],
                 ["queue", "stats", str(config), "--json"]):
        result = supervise(*args)
        assert result.returncode == 0, result.stderr.decode()
        seen.append(result.stdout.decode() + result.stderr.decode())
    assert f"{user}:***@" in seen[0]
    enqueue(config, ["ok"] * 20)
    try:
        with RunningTree(config) as tree:
            tree.wait_ready()
            for args in (["status", str(config)], ["status", str(config), "--json"],
                         ["top", str(config), "--once"]):
                result = supervise(*args, env=tree.env)
                assert result.returncode == 0, result.stderr.decode()
                seen.append(result.stdout.decode() + result.stderr.decode())
            assert "leaser" in seen[-1]  # top did print the tree
            body = wait_until(lambda: (b := _metrics_body(port)) and "leasetree_" in b and b, 30,
                              "the metrics body")
            seen.append(body)
            seen.append(_proc_cmdlines([tree.process.pid, *tree.leftovers()]))
            tree.signal(signal.SIGTERM)
            assert tree.wait_exit(timeout=30) == 0, tree.output()
            seen.append(tree.log_path.read_text(errors="replace"))
    finally:
        from children.backends import open_backend

        with open_backend(url, queue) as backend:
            backend.purge()
    log = seen[-1]
    assert "starting" in log and f"{user}:***@" in log  # the log did get written, URL and all
    if log_format == "json":
        assert all(json.loads(line)["message"] is not None for line in log.splitlines()), log
    for text in seen:
        assert SECRET not in text, text


def test_queue_url_password_not_printed_when_the_server_is_down(tmp_path: Path) -> None:
    url = f"redis://default:{SECRET}@127.0.0.1:1/0"  # nothing listens on port 1
    config = write_config(tmp_path, queue={"url": url})
    for args in (["queue", "stats", str(config)], ["enqueue", str(config), "x"]):
        result = supervise(*args, timeout=30)
        output = result.stdout.decode() + result.stderr.decode()
        assert result.returncode in (1, 2), output
        assert SECRET not in output and "Traceback" not in output and "***" in output, output
    # a tree waits for its server (a transient fault), saying why in its log
    with RunningTree(config) as tree:
        wait_until(lambda: "failed" in tree.output(), 30, "a backend failure in the log")
        tree.signal(signal.SIGTERM)
        tree.wait_exit(timeout=30)
        log = tree.log_path.read_text(errors="replace")
    assert SECRET not in log and "default:***@127.0.0.1:1" in log, log


def test_queue_url_password_not_printed_in_a_config_error(tmp_path: Path) -> None:
    config = write_config(tmp_path, queue={"url": f"mysql://user:{SECRET}@127.0.0.1/db"})
    result = supervise("check", str(config))
    output = result.stdout.decode() + result.stderr.decode()
    assert result.returncode == 2 and "unknown scheme" in output, output
    assert SECRET not in output, output


# -- dropping root ---------------------------------------------------------------------------

def _ids() -> dict[str, Any]:
    return {"uid": os.getuid(), "euid": os.geteuid(), "gid": os.getgid(), "egid": os.getegid(),
            "groups": sorted(os.getgroups()), "home": os.environ.get("HOME"),
            "xdg": os.environ.get("XDG_RUNTIME_DIR")}


def _regain_root() -> str:
    try:
        os.setuid(0)
    except PermissionError:
        return "refused"
    return "regained"


@needs_root
def test_drop_to_nobody_sets_every_id_for_good(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_RUNTIME_DIR", "/run/user/0")
    ids = in_child(_ids, "nobody")
    assert ids == {"uid": NOBODY.pw_uid, "euid": NOBODY.pw_uid, "gid": NOBODY.pw_gid,
                   "egid": NOBODY.pw_gid, "groups": sorted(set(os.getgrouplist("nobody", NOBODY.pw_gid))),
                   "home": NOBODY.pw_dir, "xdg": None}
    assert in_child(_regain_root, "nobody") == "refused"


@needs_root
def test_drop_by_numeric_ids_and_to_another_group() -> None:
    ids = in_child(_ids, str(NOBODY.pw_uid), "root")
    assert (ids["uid"], ids["gid"], ids["egid"]) == (NOBODY.pw_uid, 0, 0)
    group_only = in_child(_ids, "", NOGROUP.gr_name)
    assert (group_only["uid"], group_only["gid"], group_only["groups"]) == (0, NOBODY.pw_gid, [NOBODY.pw_gid])


@needs_root
def test_drop_is_a_no_op_when_empty_or_already_there() -> None:
    assert in_child(_ids)["uid"] == 0  # "" and "": stays root
    # already nobody: asking for nobody again is fine even without root
    assert in_child(lambda: (drop_privileges("nobody", ""), os.getuid())[1], "nobody") == NOBODY.pw_uid


@needs_root
def test_drop_refuses_without_root_and_unknown_names() -> None:
    with pytest.raises(AssertionError, match=r"PrivilegeError: supervisor.user = 'root': switching user or "
                                             r"group needs root, and this runs as uid 65534"):
        in_child(lambda: drop_privileges("root", ""), "nobody")
    with pytest.raises(PrivilegeError, match=r"^supervisor.user = 'no-such-user-x': no such user on this "):
        drop_privileges("no-such-user-x", "")
    with pytest.raises(PrivilegeError, match=r"^supervisor.group = 'no-such-group-x': no such group"):
        resolve_ids("nobody", "no-such-group-x")
    assert os.getuid() == 0  # a refused drop changed nothing here


@needs_root
def test_chown_for_hands_a_folder_to_the_user(open_tmp: Path) -> None:
    folder = open_tmp / "rundir"
    (folder / "work").mkdir(parents=True)
    (folder / "work" / "file").write_text("x")
    (folder / "link").symlink_to("/etc/passwd")
    folder.chmod(0o700)
    assert in_child(lambda: os.access(folder / "work", os.W_OK), "nobody") is False
    chown_for(folder, "nobody", "")
    for path in (folder, folder / "work", folder / "work" / "file", folder / "link"):
        info = os.lstat(path)
        assert (info.st_uid, info.st_gid) == (NOBODY.pw_uid, NOBODY.pw_gid), path
    assert os.stat("/etc/passwd").st_uid == 0  # the link was not followed
    written = in_child(lambda: ((folder / "work" / "new").write_text("ok"), "written")[1], "nobody")
    assert written == "written"
    chown_for(folder, "", "")  # no-op
    with pytest.raises(AssertionError, match="needs root"):
        in_child(lambda: chown_for(folder, "nobody", ""), "nobody")


@needs_root
def test_tree_started_as_root_with_a_user_runs_every_task_unprivileged() -> None:
    import pwd
    import shutil
    import tempfile

    from tests.integration.harness import RunningTree, enqueue

    if os.getuid() != 0:
        pytest.skip("needs root to drop privileges")
    nobody = pwd.getpwnam("nobody")
    folder = Path(tempfile.mkdtemp(prefix="leasetree-priv-", dir="/tmp"))
    try:
        folder.chmod(0o777)
        uids = folder / "uids"
        config = folder / "tree.toml"
        config.write_text(
            '[queue]\nurl = "sqlite:///tasks.db"\n'
            f'[executors]\ncount = 1\ncommand = ["/bin/sh", "-c", "id -u >> {uids}", "task"]\n'
            '[supervisor]\nuser = "nobody"\n')
        config.chmod(0o644)
        enqueue(config, ["a", "b"])  # as root: the database file is root's until handed over
        os.chown(folder / "tasks.db", nobody.pw_uid, nobody.pw_gid)
        for suffix in ("-wal", "-shm"):
            if (folder / f"tasks.db{suffix}").exists():
                os.chown(folder / f"tasks.db{suffix}", nobody.pw_uid, nobody.pw_gid)
        with RunningTree(config, burst=True) as tree:
            assert tree.wait_exit(timeout=60) == 0, tree.output()
        assert uids.read_text().split() == [str(nobody.pw_uid)] * 2
    finally:
        shutil.rmtree(folder, ignore_errors=True)
