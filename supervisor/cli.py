"""`supervise`: the command line. ``main(argv) -> int`` parses, dispatches, and turns every error an
operator can cause into one line on stderr and a named exit code (``supervisor/exits.py``).

- ``supervise CONFIG`` is ``supervise run CONFIG``; ``run``, ``status`` and ``stop`` hand the
  loaded config to ``supervisor.app`` (imported only when used, so the admin commands stay light).
- ``check``, ``enqueue`` and ``queue …`` talk to the backend directly; ``queue …`` are the successors
  of the seed's gtaskqueue verbs (leasetask, gettask, listtasks, deletetask, getqueue).

Errors: bad arguments, ConfigError, BackendConfigError and RuntimeDirError → exit 2;
BackendUnavailable (and any other backend error) → exit 1. Each line starts with ``supervise: ``.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import datetime
import json
import os
import sys
import time
from collections.abc import Sequence
from typing import Any, NoReturn

import config
from children.backends import (
    Backend,
    BackendConfigError,
    BackendError,
    BackendUnavailable,
    TaskInfo,
    TaskState,
    open_backend,
    redact_url,
)
from config.render import effective_toml
from supervisor.exits import EXIT_GAVE_UP, EXIT_OK, EXIT_USAGE
from supervisor.rundir import RuntimeDirError

PROG = "supervise"
COMMANDS = ("run", "status", "top", "reload", "stop", "check", "enqueue", "queue")


class UsageError(Exception):
    """A bad argument or a refused request; one line, exit 2."""


class _Parser(argparse.ArgumentParser):
    """argparse that raises instead of printing usage and exiting, so main() owns every message."""

    _intermixing = False

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{message} (see '{self.prog} --help')")

    def parse_known_args(self, args: Any = None, namespace: Any = None) -> Any:
        # Plain argparse stops filling `PAYLOAD ...` at the first option, so `enqueue C --tag x a b`
        # would reject a and b; a leaf command (no subcommands) parses options and positionals
        # intermixed. parse_known_intermixed_args calls back here, hence the flag.
        if self._intermixing or self._subparsers is not None:
            return super().parse_known_args(args, namespace)
        self._intermixing = True
        try:
            return self.parse_known_intermixed_args(args, namespace)
        finally:
            self._intermixing = False


def main(argv: Sequence[str] | None = None) -> int:
    """Run the `supervise` command line with ``argv`` (default ``sys.argv[1:]``); returns the exit code."""
    args_list = list(sys.argv[1:] if argv is None else argv)
    # `supervise CONFIG` means `supervise run CONFIG`.
    if args_list and args_list[0] not in COMMANDS and not args_list[0].startswith("-"):
        args_list.insert(0, "run")
    try:
        args = build_parser().parse_args(args_list)
        return args.handler(args)
    except SystemExit as exc:  # --help and --version end here
        return exc.code if isinstance(exc.code, int) else EXIT_OK
    except config.ConfigError as exc:
        for line in exc.lines():
            _say(line)
        return EXIT_USAGE
    except (UsageError, BackendConfigError, RuntimeDirError) as exc:
        _say(str(exc))
        return EXIT_USAGE
    except BackendUnavailable as exc:
        _say(f"queue unavailable: {exc}")
        return EXIT_GAVE_UP
    except BackendError as exc:
        _say(str(exc))
        return EXIT_GAVE_UP
    except KeyboardInterrupt:
        _say("interrupted")
        return 130
    except BrokenPipeError:
        # The reader went away (`| head`): stop quietly, and keep Python from complaining at exit.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_GAVE_UP


def _say(line: str) -> None:
    print(f"{PROG}: {line}", file=sys.stderr)


# -- the parser --------------------------------------------------------------------------------

_SEED_EPILOG = ("The queue commands succeed the seed's gtaskqueue verbs:\n"
                "  getqueue -> queue stats, listtasks -> queue list, gettask -> queue get,\n"
                "  deletetask -> queue delete, leasetask -> queue lease.")

# What each backend cannot do, in the words of docs/backends.md ("What a backend cannot do"); keep
# the two in step. Memory, SQLite, Redis and PostgreSQL do everything these commands offer.
_LIMITS_EPILOG = (
    "What some backends cannot do (docs/backends.md, \"What a backend cannot do\"):\n"
    "  NATS: a queue is leased either by tag (leaser.tag, queue lease --tag) or without a\n"
    "        tag filter, not both: once one kind has leased, the other fails in one line.\n"
    "        A release cannot take back a delivery (a task handed back unstarted still uses\n"
    "        an attempt); a released or expired task shows as leased until redelivered.\n"
    "  SQS:  queue list, get and delete see dead tasks only (reading a live task would\n"
    "        lease it); no lease by tag (queue lease --tag and leaser.tag are refused; a\n"
    "        tag given to enqueue is kept, but use one queue per tag); enqueue --delay is at\n"
    "        most 900 s; stats counts are approximate, with no oldest age; a release cannot\n"
    "        take back a delivery; a stale receipt is not detected.")


def _epilog(*parts: str) -> str:
    return "\n\n".join(part for part in parts if part)


class _VersionAction(argparse.Action):
    """``--version``: the version is looked up only when asked for (importlib.metadata reads the
    installed distributions: ~15 ms that every ``supervise run`` would pay at parser build time)."""

    def __init__(self, option_strings: Sequence[str], dest: str = argparse.SUPPRESS,
                 default: Any = argparse.SUPPRESS, help: str = "show the version and exit") -> None:
        super().__init__(option_strings, dest=dest, default=default, nargs=0, help=help)

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> NoReturn:
        print(f"{parser.prog} {_version()}")
        parser.exit()


def build_parser() -> argparse.ArgumentParser:
    """The full argparse tree; each subcommand sets ``handler``."""
    formatter = argparse.RawDescriptionHelpFormatter
    parser = _Parser(
        prog=PROG, formatter_class=formatter,
        description="Run a task puller as an OTP-style supervision tree of OS processes, and manage "
                    "its queue.\n\n`supervise CONFIG` is `supervise run CONFIG`.",
        epilog="Exit codes: 0 ok, 1 gave up or runtime failure, 2 usage or config error.\n"
               + _SEED_EPILOG)
    parser.add_argument("--version", action=_VersionAction)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, help: str, handler: Any, epilog: str = "",
                parent: Any = sub) -> argparse.ArgumentParser:
        p = parent.add_parser(name, help=help, description=help, epilog=epilog or None,
                              formatter_class=formatter)
        p.add_argument("config", metavar="CONFIG", help="the tree's TOML config file")
        p.set_defaults(handler=handler)
        return p

    p = command("run", "run the tree in the foreground, logging to stderr", _run,
                "SIGTERM or SIGINT drains (warm stop); a second one stops at once (cold).")
    p.add_argument("--burst", action="store_true",
                   help="exit 0 once the queue is empty and all work is settled (as RQ's --burst)")
    p = command("status", "show the running tree: children, pids, restarts, task counters", _status)
    p.add_argument("--json", action="store_true", help="print JSON")
    p = command("top", "a live view of the running tree: children (pid, state, restarts, uptime, CPU, "
                       "RSS) and the pipeline (counters, tasks/s, queue depth)", _top,
                "Refreshes in place until Ctrl-C; --once prints one frame and exits.")
    p.add_argument("--once", action="store_true", help="print one frame and exit")
    p.add_argument("--interval", type=_interval, default=1.0, metavar="SECS",
                   help="seconds between frames (default 1)")
    command("reload", "re-read CONFIG in the running tree and apply it by rolling restarts (as SIGHUP)",
            _reload, "A bad or unappliable config is refused (exit 2) and the running one stays.")
    p = command("stop", "stop the running tree: drain (warm) or at once (--cold)", _stop)
    p.add_argument("--cold", action="store_true", help="stop at once; leased tasks return to the queue")
    command("check", "validate CONFIG and print the effective config (defaults filled in, "
                     "passwords hidden)", _check, "Exit 0 if valid; else every error, one per line, exit 2.")

    p = command("enqueue", "add tasks: one per PAYLOAD argument, or one per line of stdin", _enqueue,
                _epilog("Blank stdin lines are skipped. Nothing is enqueued if any payload is bad.",
                        _LIMITS_EPILOG))
    p.add_argument("payloads", nargs="*", metavar="PAYLOAD", help="task payloads (default: stdin lines)")
    p.add_argument("--tag", default="", help="tag the tasks (leaser.tag selects by tag)")
    p.add_argument("--delay", type=_seconds, default=0.0, metavar="SECS",
                   help="make the tasks ready only after SECS")
    p.add_argument("--base64", action="store_true", help="each payload is base64; enqueue its decoded bytes")

    queue = sub.add_parser("queue", help="inspect and manage the queue (the seed's gtaskqueue verbs)",
                           description="Inspect and manage the queue named by CONFIG.",
                           epilog=_epilog(_SEED_EPILOG, _LIMITS_EPILOG), formatter_class=formatter)
    qsub = queue.add_subparsers(dest="queue_command", required=True, metavar="VERB")

    def verb(name: str, help: str, handler: Any, epilog: str = "") -> argparse.ArgumentParser:
        return command(name, help, handler, _epilog(epilog, _LIMITS_EPILOG), parent=qsub)

    p = verb("stats", "counts of ready, leased, delayed and dead tasks; the oldest task's age "
                      "(was getqueue)", _queue_stats)
    p.add_argument("--json", action="store_true", help="print JSON")
    p = verb("list", "list tasks, oldest first (was listtasks)", _queue_list)
    p.add_argument("--state", choices=[s.value for s in TaskState], help="only tasks in this state")
    p.add_argument("--limit", type=_positive_int, default=100, metavar="N", help="at most N (default 100)")
    p.add_argument("--json", action="store_true", help="print JSON (payloads as text or base64)")
    p = verb("get", "show one task; the payload as text if UTF-8, else base64 (was gettask)", _queue_get)
    p.add_argument("task_id", metavar="ID")
    p.add_argument("--json", action="store_true", help="print JSON")
    p = verb("delete", "delete tasks by id, whatever their state (was deletetask)", _queue_delete)
    p.add_argument("task_ids", nargs="+", metavar="ID")
    p = verb("lease", "lease tasks to inspect them and print their receipts (was leasetask)",
             _queue_lease, "The tasks return to the queue when the lease expires; the delivery "
                           "counts as an attempt.")
    p.add_argument("--count", type=_positive_int, default=1, metavar="N", help="lease up to N (default 1)")
    p.add_argument("--lease-secs", type=_seconds, default=None, metavar="S",
                   help="lease length (default: leaser.lease_secs)")
    p.add_argument("--tag", default=None, help="only tasks with this tag (default: any)")
    p.add_argument("--json", action="store_true", help="print JSON")
    p = verb("requeue", "make dead-lettered tasks ready again, attempts reset", _queue_requeue)
    p.add_argument("task_ids", nargs="*", metavar="ID", help="these dead tasks")
    p.add_argument("--dead", action="store_true", help="every dead task")
    p = verb("purge", "delete every task in the queue, dead ones included", _queue_purge)
    p.add_argument("--yes", action="store_true", help="really do it (required)")
    return parser


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("leasetree")
    except PackageNotFoundError:
        return "unknown"


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not 0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r}: must be a number of seconds >= 0")
    return value


def _interval(text: str) -> float:
    value = _seconds(text)
    if value < 0.1:
        raise argparse.ArgumentTypeError(f"{text!r}: must be at least 0.1 seconds")
    return value


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: must be an integer >= 1")
    return value


# -- tree commands (supervisor.app) ------------------------------------------------------------

def _run(args: argparse.Namespace) -> int:
    cfg = config.load(args.config)
    from supervisor import app

    return app.run(cfg, burst=args.burst)


def _status(args: argparse.Namespace) -> int:
    cfg = config.load(args.config)
    from supervisor import app

    return app.status(cfg, args.json)


def _top(args: argparse.Namespace) -> int:
    cfg = config.load(args.config)
    from supervisor import top

    return top.main(cfg, once=args.once, interval=args.interval)


def _reload(args: argparse.Namespace) -> int:
    cfg = config.load(args.config)  # a config that does not even validate is refused right here
    from supervisor import app

    return app.reload(cfg)


def _stop(args: argparse.Namespace) -> int:
    from supervisor import app

    try:
        cfg = config.load(args.config)
    except config.ConfigError as exc:
        # The tree runs with the config it read at start: a broken file must not keep it running.
        print(f"supervise: {args.config}: the config has errors ({len(exc.errors) or 1}); "
              "stopping the tree started from this path anyway", file=sys.stderr)
        return app.stop_at(args.config, args.cold)
    return app.stop(cfg, args.cold)


def _check(args: argparse.Namespace) -> int:
    cfg = config.load(args.config)
    sys.stdout.write(effective_toml(cfg, redact=redact_url))
    return EXIT_OK


# -- enqueue -----------------------------------------------------------------------------------

def _enqueue(args: argparse.Namespace) -> int:
    cfg = config.load(args.config)
    if args.payloads:
        # os.fsencode gives back the exact bytes the shell passed, even if they are not UTF-8.
        numbered = [(f"payload {i}", os.fsencode(p)) for i, p in enumerate(args.payloads, 1)]
    else:
        numbered = [(f"stdin line {i}", line)
                    for i, line in enumerate(sys.stdin.buffer.read().splitlines(), 1) if line.strip()]
    payloads = [_decode(where, raw) if args.base64 else raw for where, raw in numbered]
    with _open(cfg) as backend:
        limits = backend.limits
        for (where, _raw), payload in zip(numbered, payloads, strict=True):
            if len(payload) > limits.max_payload_bytes:
                raise UsageError(f"{where} is {len(payload)} bytes; this backend takes at most "
                                 f"{limits.max_payload_bytes}; nothing enqueued")
        # Limits has no enqueue cap of its own; the ack cap is the batch size every backend accepts.
        batch = max(1, limits.max_ack_batch)
        done = 0
        try:
            for start in range(0, len(payloads), batch):
                done += len(backend.enqueue(payloads[start:start + batch], args.delay, args.tag))
        except BackendError:
            if done:
                _say(f"enqueued {done} of {len(payloads)} tasks before the error below")
            raise
        except ValueError as exc:  # an argument this backend refuses (SQS: --delay over 900 s)
            raise UsageError(f"{exc}; " + (f"enqueued {done} of {len(payloads)} tasks before it"
                                           if done else "nothing enqueued")) from None
    print(f"enqueued {done} task{'s' * (done != 1)} to queue {cfg.queue.name!r}")
    return EXIT_OK


def _decode(where: str, raw: bytes) -> bytes:
    try:
        return base64.b64decode(raw.strip(), validate=True)
    except (binascii.Error, ValueError):
        raise UsageError(f"{where} is not valid base64; nothing enqueued") from None


# -- queue VERB --------------------------------------------------------------------------------

def _open(cfg: config.Config) -> Backend:
    return open_backend(cfg.queue.url, cfg.queue.name, cfg.base_dir)


def _queue_stats(args: argparse.Namespace) -> int:
    cfg = config.load(args.config)
    with _open(cfg) as backend:
        stats = backend.stats()
    fields = {"ready": stats.ready, "leased": stats.leased, "delayed": stats.delayed,
              "dead": stats.dead, "oldest_age_secs": stats.oldest_age_secs}
    if args.json:
        _print_json({"queue": cfg.queue.name, "url": redact_url(cfg.queue.url), **fields})
        return EXIT_OK
    print(f"queue    {cfg.queue.name} at {redact_url(cfg.queue.url)}")
    for name in ("ready", "leased", "delayed", "dead"):
        print(f"{name:<8} {fields[name]}")
    print(f"oldest   {_age(stats.oldest_age_secs)}")
    return EXIT_OK


def _queue_list(args: argparse.Namespace) -> int:
    cfg = config.load(args.config)
    state = TaskState(args.state) if args.state else None
    with _open(cfg) as backend:
        tasks = backend.list_tasks(state, args.limit)
    if args.json:
        _print_json([_task_json(t) for t in tasks])
        return EXIT_OK
    now = time.time()
    rows = [("ID", "STATE", "ATTEMPT", "TAG", "AGE", "PAYLOAD")]
    rows += [(t.task_id, t.state.value, str(t.attempt), t.tag, _age(now - t.enqueued_at),
              _preview(t.payload)) for t in tasks]
    _print_table(rows)
    return EXIT_OK


def _queue_get(args: argparse.Namespace) -> int:
    cfg = config.load(args.config)
    with _open(cfg) as backend:
        info = backend.get(args.task_id)
    if info is None:
        _say(f"no task {args.task_id!r} in queue {cfg.queue.name!r}")
        return EXIT_GAVE_UP
    if args.json:
        _print_json(_task_json(info))
        return EXIT_OK
    payload, encoding = _payload_text(info.payload)
    rows = [("id", info.task_id), ("state", info.state.value), ("attempt", str(info.attempt)),
            ("tag", info.tag), ("enqueued", _when(info.enqueued_at)),
            ("visible at", _when(info.visible_at)), ("last error", info.last_error),
            ("dead reason", info.dead_reason), (f"payload ({encoding})", payload)]
    for name, value in rows:
        print(f"{name + ':':<18} {value}".rstrip())
    return EXIT_OK


def _queue_delete(args: argparse.Namespace) -> int:
    cfg = config.load(args.config)
    with _open(cfg) as backend:
        deleted = backend.delete(args.task_ids)
    missing = len(set(args.task_ids)) - deleted
    note = f" ({missing} not found)" if missing > 0 else ""
    print(f"deleted {deleted} task{'s' * (deleted != 1)}{note}")
    return EXIT_OK


def _queue_lease(args: argparse.Namespace) -> int:
    cfg = config.load(args.config)
    with _open(cfg) as backend:
        limits = backend.limits
        lease_secs = cfg.leaser.lease_secs if args.lease_secs is None else args.lease_secs
        if not limits.min_lease_secs <= lease_secs <= limits.max_lease_secs:
            raise UsageError(f"--lease-secs {lease_secs:g}: this backend takes "
                             f"{limits.min_lease_secs:g} to {limits.max_lease_secs:g} seconds")
        leased = backend.lease(args.count, lease_secs, 0.0, args.tag)
    if args.json:
        _print_json([{"id": t.task_id, "receipt": t.receipt, "attempt": t.attempt, "tag": t.tag,
                      "lease_secs": lease_secs, **_payload_json(t.payload)} for t in leased])
        return EXIT_OK
    if not leased:
        print("no task ready")
        return EXIT_OK
    rows = [("ID", "ATTEMPT", "TAG", "RECEIPT", "PAYLOAD")]
    rows += [(t.task_id, str(t.attempt), t.tag, str(t.receipt), _preview(t.payload)) for t in leased]
    _print_table(rows)
    print(f"leased {len(leased)} for {lease_secs:g}s; they return to the queue when the lease expires")
    return EXIT_OK


def _queue_requeue(args: argparse.Namespace) -> int:
    if args.dead == bool(args.task_ids):
        raise UsageError("queue requeue: give either --dead (every dead task) or task IDs, not both "
                         "(see 'supervise queue requeue --help')")
    cfg = config.load(args.config)
    with _open(cfg) as backend:
        moved = backend.requeue_dead(None if args.dead else args.task_ids)
    print(f"requeued {moved} dead task{'s' * (moved != 1)}")
    return EXIT_OK


def _queue_purge(args: argparse.Namespace) -> int:
    cfg = config.load(args.config)
    if not args.yes:
        raise UsageError(f"queue purge deletes every task in queue {cfg.queue.name!r}, dead ones "
                         "included; add --yes to do it")
    with _open(cfg) as backend:
        purged = backend.purge()
    print(f"purged {purged} task{'s' * (purged != 1)} from queue {cfg.queue.name!r}")
    return EXIT_OK


# -- output helpers ----------------------------------------------------------------------------

def _payload_text(payload: bytes) -> tuple[str, str]:
    """(text, "utf-8") when the payload is UTF-8, else (base64, "base64")."""
    try:
        return payload.decode("utf-8"), "utf-8"
    except UnicodeDecodeError:
        return base64.b64encode(payload).decode("ascii"), "base64"


def _payload_json(payload: bytes) -> dict[str, str]:
    text, encoding = _payload_text(payload)
    return {"payload": text, "payload_encoding": encoding}


def _task_json(info: TaskInfo) -> dict[str, Any]:
    return {"id": info.task_id, "state": info.state.value, "attempt": info.attempt, "tag": info.tag,
            "enqueued_at": info.enqueued_at, "visible_at": info.visible_at,
            "last_error": info.last_error, "dead_reason": info.dead_reason,
            **_payload_json(info.payload)}


def _preview(payload: bytes, width: int = 40) -> str:
    text, encoding = _payload_text(payload)
    if encoding == "base64" or not text.isprintable():
        text = repr(text) if encoding == "utf-8" else f"<{len(payload)} bytes>"
    return text if len(text) <= width else text[: width - 3] + "..."


def _age(secs: float | None) -> str:
    if secs is None:
        return "-"
    secs = max(0.0, secs)
    if secs < 120:
        return f"{secs:.1f}s"
    if secs < 7200:
        return f"{secs / 60:.1f}m"
    return f"{secs / 3600:.1f}h"


def _when(ts: float | None) -> str:
    if ts is None:
        return "-"
    moment = datetime.datetime.fromtimestamp(ts, datetime.UTC).isoformat(timespec="seconds")
    delta = ts - time.time()
    return f"{moment} ({_age(-delta)} ago)" if delta <= 0 else f"{moment} (in {_age(delta)})"


def _print_table(rows: list[tuple[str, ...]]) -> None:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())


def _print_json(value: Any) -> None:
    print(json.dumps(value, indent=2, ensure_ascii=False))
