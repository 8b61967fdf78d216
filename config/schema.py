"""The config schema: ONE table of every key, and the frozen dataclasses built from it.

Each row of ``TABLE`` is a ``Key``: its section, name, kind (how a raw TOML value is checked and
converted, see ``config/validate.py``), default, allowed values or range, the seed's
(``gtaskqueue_puller``) flag name where there is one, and a one-line help. Everything else — the
section dataclasses, the validation messages, ``supervise check`` and ``docs/configuration.md`` —
is derived from this table, so a key is added in exactly one place.

After validation every value is concrete: ints for "int" keys, floats for "number" keys, tuples
for arrays, and each child's ``shutdown_secs`` filled in from ``[supervisor] shutdown_secs`` when it
was not given. ``Config.to_dict()`` is plain data (str, int, float, list, dict), fit for msgpack and
for ``multiprocess`` arguments; ``Config.from_dict()`` rebuilds the same frozen object.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SECTIONS: tuple[str, ...] = (
    "queue", "leaser", "executors", "reaper", "retry", "supervisor", "metrics", "log",
)
#: the sections that name a child of the root supervisor and so take ``restart``/``shutdown_secs``
CHILD_SECTIONS: tuple[str, ...] = ("leaser", "executors", "reaper")

RESTART_TYPES: tuple[str, ...] = ("permanent", "transient", "temporary")
STRATEGIES: tuple[str, ...] = ("one_for_one", "one_for_all", "rest_for_one")
SHUTDOWN_WORDS: tuple[str, ...] = ("brutal_kill", "infinity")
LOG_LEVELS: tuple[str, ...] = ("debug", "info", "warning", "error")
LOG_FORMATS: tuple[str, ...] = ("text", "json")

# kind -> the Python type of the converted value (used for the dataclass fields).
KIND_TYPES: dict[str, Any] = {
    "int": int,
    "number": float,
    "str": str,
    "name": str,  # a non-empty string
    "choice": str,
    "strings": tuple[str, ...],
    "command": tuple[str, ...],
    "callable": str,
    "queue_url": str,
    "http_url": str,
    "listen": str,
    "shutdown": float | str,
}


@dataclass(frozen=True, slots=True)
class Key:
    """One config key. ``minimum`` is inclusive, ``above`` exclusive; ``maximum`` inclusive."""

    section: str
    name: str
    kind: str
    default: Any
    help: str
    seed: str = ""
    choices: tuple[str, ...] = ()
    minimum: float | None = None
    above: float | None = None
    maximum: float | None = None

    @property
    def path(self) -> str:
        return f"{self.section}.{self.name}"

    def allowed(self) -> str:
        """What a valid value looks like, as the tail of "must be ..." in an error and in the docs."""
        if self.kind in ("int", "number"):
            noun = "an integer" if self.kind == "int" else "a number"
            bounds = []
            if self.above is not None:
                bounds.append(f"> {_num(self.above)}")
            if self.minimum is not None:
                bounds.append(f">= {_num(self.minimum)}")
            if self.maximum is not None:
                bounds.append(f"<= {_num(self.maximum)}")
            return " ".join([noun, " and ".join(bounds)]).strip()
        return _ALLOWED_BY_KIND[self.kind](self)


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else str(x)


def _one_of(key: Key) -> str:
    return "one of " + ", ".join(f'"{c}"' for c in key.choices)


_ALLOWED_BY_KIND = {
    "str": lambda k: "a string",
    "name": lambda k: "a non-empty string",
    "choice": _one_of,
    "strings": lambda k: "an array of non-empty strings",
    "command": lambda k: 'a non-empty string (split like a shell does, no shell runs) or a non-empty '
                         'array of strings, e.g. ["/usr/bin/convert", "-quiet"]',
    "callable": lambda k: 'a "package.module:function" string, or "" to use command',
    "queue_url": lambda k: 'a URL whose scheme names a backend, e.g. "sqlite:///tasks.db"',
    "http_url": lambda k: 'an http:// or https:// URL, or ""',
    "listen": lambda k: 'a "host:port" string (port 1-65535), or "" for off',
    "shutdown": lambda k: 'a number of seconds >= 0, "brutal_kill" or "infinity"',
}


def _child_keys(section: str) -> tuple[Key, ...]:
    return (
        Key(section, "restart", "choice", "permanent",
            "when the supervisor restarts this child: always, only after an abnormal exit, or never",
            choices=RESTART_TYPES),
        # None here means "inherit"; validation replaces it with [supervisor] shutdown_secs.
        Key(section, "shutdown_secs", "shutdown", None,
            "how long this child may take to stop after SIGTERM before SIGKILL "
            "(default: [supervisor] shutdown_secs)"),
    )


TABLE: tuple[Key, ...] = (
    # -- [queue] ---------------------------------------------------------------------------------
    Key("queue", "url", "queue_url", "sqlite:///tasks.db",
        "where the tasks live; the scheme picks the backend; a relative sqlite path is relative "
        "to the config file"),
    Key("queue", "name", "name", "default", "the queue's name within the backend",
        seed="taskqueue_name"),
    # -- [leaser] --------------------------------------------------------------------------------
    Key("leaser", "lease_secs", "number", 30.0,
        "how long one lease lasts; leases of running tasks are extended before they expire",
        seed="lease_secs", above=0),
    Key("leaser", "max_in_flight", "int", 0,
        "most tasks leased on this host at once; 0 = enough to keep every executor slot busy",
        seed="num_tasks", minimum=0),
    Key("leaser", "min_running_tasks", "int", 0,
        "lease more only when this few tasks are running (or batch_wait_secs passed), to batch leases",
        seed="min_running_tasks", minimum=0),
    Key("leaser", "batch_wait_secs", "number", 600.0,
        "lease again this long after a task finished even if min_running_tasks is not reached",
        seed="timeout_secs_for_next_lease_request", minimum=0),
    Key("leaser", "idle_poll_secs", "number", 2.0,
        "cap of the backoff between lease attempts while the queue is empty",
        seed="sleep_interval_secs", above=0),
    Key("leaser", "requests_per_sec", "number", 0.0,
        "cap on backend calls per second from this host (lease, extend and settle calls; the "
        "leaser and the reaper get half each); 0 = unlimited",
        seed="taskapi_requests_per_sec", minimum=0),
    Key("leaser", "tag", "str", "", 'lease only tasks with this tag; "" = any task'),
    Key("leaser", "max_lease_secs", "number", 7200.0,
        "stop extending a task's lease after this long, so a stuck host lets others retry it",
        above=0),
    *_child_keys("leaser"),
    # -- [executors] -----------------------------------------------------------------------------
    Key("executors", "count", "int", 0, "executor processes; 0 = one per CPU", minimum=0),
    Key("executors", "slots", "int", 1, "tasks one executor runs at once", minimum=1),
    Key("executors", "command", "command", ("/bin/cat",),
        "program run per task with the input-file and output-file paths appended (no shell)",
        seed="executable_binary"),
    Key("executors", "callable", "callable", "",
        'Python function called per task instead of command, "package.module:function"'),
    Key("executors", "python_path", "strings", (),
        "folders prepended to sys.path before importing callable (relative to the config file)"),
    Key("executors", "timeout_secs", "number", 3600.0,
        "a task running longer is killed (SIGTERM, then SIGKILL of its process group) and fails",
        seed="task_timeout_secs", above=0),
    Key("executors", "output_url", "http_url", "",
        'POST each output to this URL + task id, and ack only after a 2xx; "" = no upload',
        seed="output_url"),
    Key("executors", "max_tasks_per_child", "int", 0,
        "replace an executor after it ran this many tasks; 0 = never", minimum=0),
    Key("executors", "max_memory_mb", "int", 0,
        "replace an executor once its resident memory passes this; 0 = never", minimum=0),
    *_child_keys("executors"),
    # -- [reaper] --------------------------------------------------------------------------------
    Key("reaper", "batch_size", "int", 100, "send acks once this many are waiting", minimum=1),
    Key("reaper", "max_latency_ms", "number", 20.0,
        "send acks at most this long after the first one waiting", minimum=0),
    *_child_keys("reaper"),
    # -- [retry] ---------------------------------------------------------------------------------
    Key("retry", "max_attempts", "int", 5,
        "deliveries before a failing task goes to the dead letter", minimum=1),
    Key("retry", "backoff_secs", "number", 1.0,
        "delay before the 2nd attempt; doubles per attempt, times a random 1-2", minimum=0),
    Key("retry", "backoff_max_secs", "number", 300.0, "cap of the retry delay", minimum=0),
    # -- [supervisor] ----------------------------------------------------------------------------
    Key("supervisor", "strategy", "choice", "one_for_one",
        "which children restart when one exits: that one, all, or it and those started after it",
        choices=STRATEGIES),
    Key("supervisor", "intensity", "int", 10,
        "most restarts allowed within period_secs before the tree gives up (exit 1)", minimum=0),
    Key("supervisor", "period_secs", "number", 60.0, "the sliding window for intensity", above=0),
    Key("supervisor", "shutdown_secs", "shutdown", 30.0,
        "default time a child may take to stop after SIGTERM before SIGKILL"),
    Key("supervisor", "heartbeat_secs", "number", 1.0, "how often each child says it is alive",
        above=0),
    Key("supervisor", "heartbeat_timeout_secs", "number", 10.0,
        "a child silent this long is killed and counts as a crash", above=0),
    Key("supervisor", "user", "str", "", 'when started as root, run as this user; "" = stay'),
    Key("supervisor", "group", "str", "",
        'when started as root, run as this group; "" = the user\'s primary group'),
    # -- [metrics] -------------------------------------------------------------------------------
    Key("metrics", "listen", "listen", "",
        'serve Prometheus text on this "host:port", e.g. "127.0.0.1:9464"; "" = off'),
    # -- [log] -----------------------------------------------------------------------------------
    Key("log", "level", "choice", "info", "least severe level logged", choices=LOG_LEVELS),
    Key("log", "format", "choice", "text", "one line per record, as text or JSON",
        choices=LOG_FORMATS),
)

#: section -> key name -> Key, in table order
KEYS: dict[str, dict[str, Key]] = {s: {k.name: k for k in TABLE if k.section == s} for s in SECTIONS}


def _section_class(section: str) -> type:
    fields = []
    for key in KEYS[section].values():
        default = key.default
        if key.kind == "shutdown" and default is None:
            # The dataclass needs a concrete default; validation always sets the inherited value.
            default = KEYS["supervisor"]["shutdown_secs"].default
        fields.append((key.name, KIND_TYPES[key.kind], dataclasses.field(default=default)))
    cls = dataclasses.make_dataclass(f"{section.capitalize()}Config", fields, frozen=True, slots=True)
    cls.__module__ = __name__  # so repr, pickling and docs name this module (3.11 has no module=)
    cls.__doc__ = f"The [{section}] section: " + ", ".join(KEYS[section]) + "."
    return cls


QueueConfig = _section_class("queue")
LeaserConfig = _section_class("leaser")
ExecutorsConfig = _section_class("executors")
ReaperConfig = _section_class("reaper")
RetryConfig = _section_class("retry")
SupervisorConfig = _section_class("supervisor")
MetricsConfig = _section_class("metrics")
LogConfig = _section_class("log")

SECTION_CLASSES: dict[str, type] = {
    "queue": QueueConfig, "leaser": LeaserConfig, "executors": ExecutorsConfig,
    "reaper": ReaperConfig, "retry": RetryConfig, "supervisor": SupervisorConfig,
    "metrics": MetricsConfig, "log": LogConfig,
}


@dataclass(frozen=True, slots=True)
class Config:
    """The validated config of one tree. Build it with ``config.load(path)`` or ``validate()``.

    ``path`` is the config file's absolute path (it also names the runtime dir); ``base_dir`` its
    folder, against which relative paths were resolved.
    """

    path: Path
    base_dir: Path
    queue: QueueConfig  # type: ignore[valid-type]
    leaser: LeaserConfig  # type: ignore[valid-type]
    executors: ExecutorsConfig  # type: ignore[valid-type]
    reaper: ReaperConfig  # type: ignore[valid-type]
    retry: RetryConfig  # type: ignore[valid-type]
    supervisor: SupervisorConfig  # type: ignore[valid-type]
    metrics: MetricsConfig  # type: ignore[valid-type]
    log: LogConfig  # type: ignore[valid-type]

    def to_dict(self) -> dict[str, Any]:
        """Plain data (str, int, float, list, dict) that ``from_dict`` turns back into an equal Config."""
        out: dict[str, Any] = {"path": str(self.path), "base_dir": str(self.base_dir)}
        for section in SECTIONS:
            values = getattr(self, section)
            out[section] = {
                name: list(v) if isinstance(v, tuple) else v
                for name in KEYS[section]
                for v in [getattr(values, name)]
            }
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Config:
        """Rebuild a Config from ``to_dict()`` output. It trusts its input (already validated)."""
        sections = {}
        for section in SECTIONS:
            given = data[section]
            values = {}
            for name, key in KEYS[section].items():
                v = given[name]
                values[name] = tuple(v) if KIND_TYPES[key.kind] == tuple[str, ...] else v
            sections[section] = SECTION_CLASSES[section](**values)
        return cls(path=Path(data["path"]), base_dir=Path(data["base_dir"]), **sections)
