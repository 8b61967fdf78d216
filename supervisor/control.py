"""The control socket: a ROUTER at ``<runtime dir>/control.ipc`` (file mode 0600) and its client.

Commands (``Request(command, args)`` -> ``Reply(ok, result, error)``):

    which_children  {supervisor?}             -> [{id, pid, state, type}, ...] newest first
    count_children  {supervisor?}             -> {specs, active, supervisors, workers}
    start_child     {supervisor?, spec | args} -> pid            | error: already_present, ...
    terminate_child {supervisor?, id | pid}   -> "ok"            | error: not_found, simple_one_for_one
    restart_child   {supervisor?, id}         -> pid             | error: running, restarting, not_found
    delete_child    {supervisor?, id}         -> "ok"            | error: running, restarting, not_found
    status          {}                        -> {children: [...], stats: {child id: {...}}, rates: {...},
                                                  reload: {generation, running, last}, pid}
    reload          {}                        -> {generation, changed, restarting, executors}
                                                 | error: the reason the new config was refused
    stop            {cold?: bool}             -> {"stopping": true, "pid": root pid}

``supervisor`` is a path such as "executors" (default: the root). The tree answers while it is busy
restarting or stopping; child-API calls that change the tree wait for the job in progress, as OTP's
calls do, and fail with ``shutting_down`` once a stop began.
"""

from __future__ import annotations

import logging
import os
import socket
from pathlib import Path
from typing import Any

import zmq

from children.protocol import ProtocolError, Reply, Request, decode, encode

log = logging.getLogger("root")  # runs in the root: its place in the tree

SOCKET_NAME = "control.ipc"


class ControlError(Exception):
    """The tree answered with an error; ``str`` is its message."""


class NoTreeRunning(ControlError):
    """Nothing answers at this runtime directory's control socket."""


def socket_path(runtime_dir: Path | str) -> Path:
    return Path(runtime_dir) / SOCKET_NAME


def is_listening(runtime_dir: Path | str) -> bool:
    """True when some process accepts connections on the control socket (a stale socket file
    left by a killed tree refuses them)."""
    path = socket_path(runtime_dir)
    if not path.exists():
        return False
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(str(path))
        return True
    except OSError:
        return False
    finally:
        probe.close()


def reply_for(result: Any) -> Reply:
    """An OTP-style result as a wire reply: ``("ok", x)`` -> ok x; ``("error", e)`` -> error e."""
    if isinstance(result, tuple) and len(result) == 2 and result[0] in ("ok", "error"):
        if result[0] == "ok":
            return Reply(True, result[1], "")
        detail = result[1]
        text = detail if isinstance(detail, str) else " ".join(str(d) for d in detail)
        return Reply(False, detail if isinstance(detail, (str, list)) else str(detail), text)
    return Reply(True, result, "")


def bind_private(sock: zmq.Socket, path: Path) -> None:
    """Bind ``sock`` to ``ipc://path`` with the socket file 0600 (the runtime dir is 0700 already:
    this is belt and braces)."""
    old_umask = os.umask(0o177)
    try:
        sock.bind(f"ipc://{path}")
    finally:
        os.umask(old_umask)
    os.chmod(path, 0o600)


class ControlServer:
    """The root's end. ``receive()`` yields ``(identity, Request)``; malformed frames are logged
    and dropped."""

    def __init__(self, zctx: zmq.Context, runtime_dir: Path | str) -> None:
        self.path = socket_path(runtime_dir)
        if self.path.exists():
            self.path.unlink()  # a stale file from a tree that was killed (is_listening said so)
        self.socket = zctx.socket(zmq.ROUTER)
        self.socket.linger = 0
        bind_private(self.socket, self.path)

    def receive(self) -> list[tuple[bytes, Request]]:
        out = []
        while True:
            try:
                frames = self.socket.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return out
            if len(frames) != 2:
                log.warning("control: dropped a message of %d frames", len(frames))
                continue
            try:
                message = decode(frames[1])
            except ProtocolError as exc:
                log.warning("control: dropped a malformed request: %s", exc)
                continue
            if not isinstance(message, Request):
                log.warning("control: dropped a %s (not a Request)", type(message).__name__)
                continue
            out.append((frames[0], message))

    def reply(self, identity: bytes, reply: Reply) -> None:
        try:
            self.socket.send_multipart([identity, encode(reply)], zmq.NOBLOCK)
        except zmq.ZMQError as exc:  # the client went away: nothing to do
            log.info("control: could not reply: %s", exc)

    def close(self) -> None:
        self.socket.close()
        try:
            self.path.unlink()
        except FileNotFoundError:
            pass


def call(runtime_dir: Path | str, command: str, args: dict[str, Any] | None = None,
         timeout: float = 5.0) -> Any:
    """Send one command to the tree running at ``runtime_dir`` and return its result.

    Raises NoTreeRunning when no tree listens there (or it does not answer within ``timeout``
    seconds), ControlError when the tree answered with an error.
    """
    if not is_listening(runtime_dir):
        raise NoTreeRunning(f"no tree is running (nothing listens at {socket_path(runtime_dir)})")
    zctx = zmq.Context()
    sock = zctx.socket(zmq.DEALER)
    sock.linger = 0
    try:
        sock.connect(f"ipc://{socket_path(runtime_dir)}")
        sock.send(encode(Request(command, dict(args or {}))))
        if not sock.poll(int(timeout * 1000)):
            raise NoTreeRunning(f"the tree at {runtime_dir} did not answer {command!r} within {timeout:g}s")
        reply = decode(sock.recv())
    finally:
        sock.close()
        zctx.term()
    if not isinstance(reply, Reply):
        raise ControlError(f"unexpected answer {type(reply).__name__}")
    if not reply.ok:
        raise ControlError(reply.error or str(reply.result))
    return reply.result
