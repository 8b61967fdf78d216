"""Every message that crosses a socket in the tree, and the only code that knows the frame layout.

A message is one ZeroMQ frame: a msgpack array ``[VERSION, CODE, field, ...]``. ``encode`` packs a
message; ``decode`` returns the message or raises ``ProtocolError`` naming what was wrong, so a
malformed frame is logged and dropped by the receiver and never crashes it. Nothing here unpickles.

Channels (see DESIGN §4):
- supervision: each child's DEALER -> the root's ROUTER (``sup.ipc``): Ready, Heartbeat.
- control: ``supervise status/stop`` DEALER -> the root's ROUTER (``control.ipc``): Request, Reply.
- pipeline: executors' and the reaper's DEALERs -> the leaser's ROUTER (``leaser.ipc``): Hello, Ping,
  Tasks, Done, Settle, Settled, Forget, Abort, Sync, Return.

Task and completion items travel as plain tuples inside batch messages, because per-item objects
cost more than the rest of a hop (batching is the main lever for speed).
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from operator import itemgetter
from typing import Any, ClassVar

import msgpack

VERSION = 1


class ProtocolError(ValueError):
    """A frame that is not a valid message of this protocol version."""


# -- item shapes (plain tuples on the wire) ------------------------------------------------------
# TaskItem:  (task_id: str, receipt: str, payload: bytes, attempt: int, tag: str)
# DoneItem:  (task_id: str, receipt: str, ok: bool, error: str, attempt: int, seconds: float)
# RunItem:   (task_id: str, receipt: str, attempt: int, running_secs: float) -- a task an executor holds
# SettleItem:(task_id: str, receipt: str, ok: bool, error: str, attempt: int)
TASK_ITEM = (str, str, bytes, int, str)
DONE_ITEM = (str, str, bool, str, int, (int, float))
RUN_ITEM = (str, str, int, (int, float))
SETTLE_ITEM = (str, str, bool, str, int)

# Settled outcomes reported by the reaper.
ACKED, RELEASED, DEAD, LOST = "acked", "released", "dead", "lost"


@dataclass(frozen=True, slots=True)
class Message:
    CODE: ClassVar[int] = 0
    # per field: the type, or ("list", ITEM_SHAPE) for a list of tuples of that shape
    SHAPE: ClassVar[tuple[Any, ...]] = ()


# -- supervision ---------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Ready(Message):
    """A child finished its set-up and counts as started."""

    CODE: ClassVar[int] = 1
    SHAPE: ClassVar[tuple[Any, ...]] = (str, int)
    child_id: str
    pid: int


@dataclass(frozen=True, slots=True)
class Heartbeat(Message):
    """A child is alive; ``stats`` are its counters and gauges since it started."""

    CODE: ClassVar[int] = 2
    SHAPE: ClassVar[tuple[Any, ...]] = (str, int, dict)
    child_id: str
    pid: int
    stats: dict


# -- control -------------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Request(Message):
    """A command to the root: which_children, count_children, terminate_child, restart_child,
    status, stop, ..."""

    CODE: ClassVar[int] = 10
    SHAPE: ClassVar[tuple[Any, ...]] = (str, dict)
    command: str
    args: dict


@dataclass(frozen=True, slots=True)
class Reply(Message):
    CODE: ClassVar[int] = 11
    SHAPE: ClassVar[tuple[Any, ...]] = (bool, object, str)
    ok: bool
    result: Any
    error: str


# -- pipeline ------------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Hello(Message):
    """A peer (re)introduces itself to the leaser with everything it holds.

    Sent on start and whenever the leaser asks (Sync). ``running`` lists tasks it is running,
    ``finished`` completions the leaser has not yet confirmed settled (Forget). A new incarnation
    of an executor says ``running=[]``: whatever the leaser had dispatched to the old one died with it.
    """

    CODE: ClassVar[int] = 20
    SHAPE: ClassVar[tuple[Any, ...]] = (str, str, int, int, ("list", RUN_ITEM), ("list", DONE_ITEM))
    peer: str
    kind: str  # "executor" or "reaper"
    incarnation: int  # pid of the peer process
    slots: int
    running: list
    finished: list


@dataclass(frozen=True, slots=True)
class Ping(Message):
    """Peer -> leaser while idle, so a restarted leaser learns its peers within a heartbeat."""

    CODE: ClassVar[int] = 21
    SHAPE: ClassVar[tuple[Any, ...]] = (str, int)
    peer: str
    incarnation: int


@dataclass(frozen=True, slots=True)
class Sync(Message):
    """Leaser -> peer: I do not know you (I restarted, or you did): send a Hello."""

    CODE: ClassVar[int] = 22
    SHAPE: ClassVar[tuple[Any, ...]] = (int,)
    leaser_incarnation: int


@dataclass(frozen=True, slots=True)
class Tasks(Message):
    """Leaser -> executor: run these (never more than the executor's free slots)."""

    CODE: ClassVar[int] = 23
    SHAPE: ClassVar[tuple[Any, ...]] = (("list", TASK_ITEM),)
    items: list


@dataclass(frozen=True, slots=True)
class Done(Message):
    """Executor -> leaser: these finished; each frees one slot."""

    CODE: ClassVar[int] = 24
    SHAPE: ClassVar[tuple[Any, ...]] = (("list", DONE_ITEM),)
    items: list


@dataclass(frozen=True, slots=True)
class Settle(Message):
    """Leaser -> reaper: ack the ok ones; release or dead-letter the failed ones."""

    CODE: ClassVar[int] = 25
    SHAPE: ClassVar[tuple[Any, ...]] = (("list", SETTLE_ITEM),)
    items: list


@dataclass(frozen=True, slots=True)
class Settled(Message):
    """Reaper -> leaser: these receipts are settled in the backend (outcomes: acked, released,
    dead, lost), so their leases stop being extended."""

    CODE: ClassVar[int] = 26
    SHAPE: ClassVar[tuple[Any, ...]] = (list, list)
    receipts: list
    outcomes: list


@dataclass(frozen=True, slots=True)
class Forget(Message):
    """Leaser -> executor: these completions are settled; stop remembering them."""

    CODE: ClassVar[int] = 27
    SHAPE: ClassVar[tuple[Any, ...]] = (list,)
    receipts: list


@dataclass(frozen=True, slots=True)
class Abort(Message):
    """Leaser -> executor: kill these running tasks (their lease is lost, or a cold shutdown;
    an empty list means all) and report them as failed with ``reason``."""

    CODE: ClassVar[int] = 28
    SHAPE: ClassVar[tuple[Any, ...]] = (list, str)
    receipts: list
    reason: str


@dataclass(frozen=True, slots=True)
class Return(Message):
    """Executor -> leaser: these were never started and will not be (the executor retires); release
    them now without blame."""

    CODE: ClassVar[int] = 29
    SHAPE: ClassVar[tuple[Any, ...]] = (list,)
    receipts: list


MESSAGES: dict[int, type[Message]] = {
    cls.CODE: cls
    for cls in (Ready, Heartbeat, Request, Reply, Hello, Ping, Sync, Tasks, Done, Settle, Settled,
                Forget, Abort, Return)
}
_FIELDS: dict[type[Message], tuple[str, ...]] = {
    cls: tuple(f.name for f in fields(cls)) for cls in MESSAGES.values()
}


def encode(message: Message) -> bytes:
    """One frame for ``message``."""
    cls = type(message)
    return msgpack.packb([VERSION, cls.CODE, *(getattr(message, name) for name in _FIELDS[cls])],
                         use_bin_type=True)


def decode(frame: bytes) -> Message:
    """The message in ``frame``; raises ProtocolError when it is not a valid one."""
    try:
        raw = msgpack.unpackb(frame, raw=False, use_list=True, strict_map_key=False)
    except Exception as exc:  # msgpack raises several unrelated types for bad input
        raise ProtocolError(f"not msgpack: {exc.__class__.__name__}: {exc}") from None
    if not isinstance(raw, list) or len(raw) < 2:
        raise ProtocolError(f"not a message array: {type(raw).__name__}")
    version, code, *values = raw
    if version != VERSION:
        raise ProtocolError(f"protocol version {version!r}, expected {VERSION}")
    cls = MESSAGES.get(code) if isinstance(code, int) and not isinstance(code, bool) else None
    if cls is None:
        raise ProtocolError(f"unknown message code {code!r}")
    if len(values) != len(cls.SHAPE):
        raise ProtocolError(f"{cls.__name__}: {len(values)} fields, expected {len(cls.SHAPE)}")
    for name, value, check in zip(_FIELDS[cls], values, _CHECKS[cls], strict=True):
        _check_compiled(cls, name, value, check)
    return cls(*values)


def _allowed(kind: Any) -> frozenset[type] | None:
    """The exact types a field may have (None: anything). ``type(x) in allowed`` is the fast test;
    bool is never taken for an int, since ``type(True) is bool``."""
    if kind is object:
        return None
    if isinstance(kind, tuple):
        return frozenset().union(*(_allowed(k) or frozenset() for k in kind))
    if kind is float:
        return frozenset({int, float})
    return frozenset({kind})


def _compile(cls: type[Message]) -> tuple[Any, ...]:
    checks = []
    for kind in cls.SHAPE:
        if isinstance(kind, tuple) and kind and kind[0] == "list":
            checks.append(("list", tuple(_allowed(k) for k in kind[1])))
        else:
            checks.append(("one", _allowed(kind)))
    return tuple(checks)


_CHECKS: dict[type[Message], tuple[Any, ...]] = {cls: _compile(cls) for cls in MESSAGES.values()}
_LIST = frozenset({list})


def _check_compiled(cls: type[Message], name: str, value: Any, check: tuple[str, Any]) -> None:
    mode, allowed = check
    if mode == "one":
        if allowed is not None and type(value) not in allowed:
            raise ProtocolError(f"{cls.__name__}.{name}: {type(value).__name__} is not "
                                f"{' or '.join(sorted(t.__name__ for t in allowed))}")
        return
    if type(value) is not list:
        raise ProtocolError(f"{cls.__name__}.{name}: not a list")
    width = len(allowed)
    # The common case, a well-formed batch, is checked a column at a time in C (map and set);
    # only a batch that fails it is walked item by item, to name the culprit.
    if set(map(type, value)) <= _LIST and set(map(len, value)) <= {width} and all(
            types is None or set(map(type, map(itemgetter(position), value))) <= types
            for position, types in enumerate(allowed)):
        return
    for index, item in enumerate(value):
        if type(item) is not list or len(item) != width:
            raise ProtocolError(f"{cls.__name__}.{name}[{index}]: not a {width}-item array")
        for position in range(width):
            types = allowed[position]
            if types is not None and type(item[position]) not in types:
                raise ProtocolError(f"{cls.__name__}.{name}[{index}][{position}]: "
                                    f"{type(item[position]).__name__} is not "
                                    f"{' or '.join(sorted(t.__name__ for t in types))}")
