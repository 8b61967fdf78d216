"""Raw TOML data -> ``Config``, or ``ConfigError`` listing every problem. Pure: no I/O.

Each error is one line that names the key path, shows the value as TOML would, and says what is
allowed: ``executors.count = -1: must be an integer >= 0``. Unknown keys get a did-you-mean over
the keys of their section (and over section names, and over every key for a key put in the wrong
place). All errors are collected, so an operator fixes a file in one round.
"""

from __future__ import annotations

import difflib
import shlex
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from children.backends import SCHEMES, redact_url
from config.errors import ConfigError
from config.render import toml_key, toml_value
from config.schema import CHILD_SECTIONS, KEYS, SECTION_CLASSES, SECTIONS, SHUTDOWN_WORDS, Config, Key


class _Bad(Exception):
    """A value failed its check; the message (if any) replaces the generic "must be ..." text."""


def validate(raw: Mapping[str, Any], path: Path) -> Config:
    """Check ``raw`` (as ``tomllib`` returns it) against the schema and build the Config.

    ``path`` is the config file's absolute path; its folder is the base for relative paths
    (``sqlite:///tasks.db`` becomes ``sqlite:////<folder>/tasks.db``). Missing keys take their
    defaults. Raises ConfigError with every problem found.
    """
    path = Path(path)
    base_dir = path.parent
    errors: list[str] = []
    given: dict[str, Mapping[str, Any]] = {}
    invalid: set[str] = set()  # key paths already reported, left out of the rules across keys

    for name, value in raw.items():
        if name in KEYS:
            if isinstance(value, Mapping):
                given[name] = value
            else:
                errors.append(f"{name} = {toml_value(value)}: must be a table ([{name}] with keys under it)")
        else:
            errors.append(_unknown_section(name, value))

    values: dict[str, dict[str, Any]] = {}
    for section in SECTIONS:
        table = given.get(section, {})
        for name in table:
            if name not in KEYS[section]:
                errors.append(_unknown_key(section, name))
        values[section] = {}
        for name, key in KEYS[section].items():
            if name not in table:
                values[section][name] = key.default
                continue
            try:
                values[section][name] = _CHECKS[key.kind](key, table[name])
            except _Bad as bad:
                reason = str(bad) or f"must be {key.allowed()}"
                shown = table[name]
                if key.kind == "queue_url" and isinstance(shown, str):
                    shown = redact_url(shown)  # a password never reaches a terminal or a log
                errors.append(f"{key.path} = {toml_value(shown)}: {reason}")
                values[section][name] = key.default
                invalid.add(key.path)

    _check_executor_choice(given.get("executors", {}), values["executors"], errors)
    _check_relations(values, invalid, errors)
    _inherit_shutdown(values)
    values["queue"]["url"] = resolve_sqlite_url(values["queue"]["url"], base_dir)
    values["executors"]["python_path"] = tuple(
        str(base_dir / p) for p in values["executors"]["python_path"])

    if errors:
        raise ConfigError(errors, path)
    sections = {s: SECTION_CLASSES[s](**values[s]) for s in SECTIONS}
    return Config(path=path, base_dir=base_dir, **sections)


# -- unknown names -----------------------------------------------------------------------------

def _unknown_section(name: str, value: Any) -> str:
    if not isinstance(value, Mapping):
        # A key written above every [section] header: point at the section that has it (or a
        # close match of it).
        homes = ([(s, name) for s in SECTIONS if name in KEYS[s]]
                 or [(s, k) for s in SECTIONS for k in _close(name, KEYS[s])])
        hint = f"; did you mean {homes[0][0]}.{homes[0][1]} (under [{homes[0][0]}])?" if homes else ""
        return f"{toml_key(name)} = {toml_value(value)}: unknown key outside any section{hint}"
    hint = _did_you_mean(name, SECTIONS, lambda s: f"[{s}]")
    return f"[{toml_key(name)}]: unknown section{hint or '; allowed: ' + ', '.join(SECTIONS)}"


def _unknown_key(section: str, name: str) -> str:
    hint = _did_you_mean(name, KEYS[section], lambda k: f"{section}.{k}")
    if not hint:
        elsewhere = [s for s in SECTIONS if name in KEYS[s]]
        if elsewhere:
            hint = f"; it belongs in [{elsewhere[0]}]"
        else:
            hint = "; allowed: " + ", ".join(KEYS[section])
    return f"{section}.{toml_key(name)}: unknown key{hint}"


def _close(name: str, candidates: Any) -> list[str]:
    return difflib.get_close_matches(name, list(candidates), n=1, cutoff=0.6)


def _did_you_mean(name: str, candidates: Any, show: Callable[[str], str]) -> str:
    close = _close(name, candidates)
    return f"; did you mean {show(close[0])}?" if close else ""


# -- one check per kind: raw value -> converted value, or _Bad ----------------------------------

def _int(key: Key, v: Any) -> int:
    # bool is an int in Python but `count = true` is a mistake, not 1.
    if isinstance(v, bool) or not isinstance(v, int):
        raise _Bad()
    _check_range(key, v)
    return v


def _number(key: Key, v: Any) -> float:
    if isinstance(v, bool) or not isinstance(v, int | float):
        raise _Bad()
    if v != v or v in (float("inf"), float("-inf")):  # TOML allows nan and inf
        raise _Bad()
    _check_range(key, v)
    return float(v)


def _check_range(key: Key, v: float) -> None:
    if key.above is not None and not v > key.above:
        raise _Bad()
    if key.minimum is not None and v < key.minimum:
        raise _Bad()
    if key.maximum is not None and v > key.maximum:
        raise _Bad()


def _str(key: Key, v: Any) -> str:
    if not isinstance(v, str):
        raise _Bad()
    return v


def _name(key: Key, v: Any) -> str:
    if not isinstance(v, str) or not v.strip():
        raise _Bad()
    return v


def _choice(key: Key, v: Any) -> str:
    if not isinstance(v, str) or v not in key.choices:
        raise _Bad()
    return v


def _strings(key: Key, v: Any) -> tuple[str, ...]:
    if not isinstance(v, list) or not all(isinstance(s, str) and s for s in v):
        raise _Bad()
    return tuple(v)


def _command(key: Key, v: Any) -> tuple[str, ...]:
    if isinstance(v, str):
        try:
            argv = shlex.split(v)
        except ValueError as exc:  # an unclosed quote
            raise _Bad(f"cannot be split into arguments ({exc}); write it as an array of strings") from None
    elif isinstance(v, list) and all(isinstance(s, str) for s in v):
        argv = list(v)
    else:
        raise _Bad()
    if not argv or not argv[0]:
        raise _Bad()
    return tuple(argv)


def _callable(key: Key, v: Any) -> str:
    if not isinstance(v, str):
        raise _Bad()
    if v == "":
        return v
    module, colon, function = v.partition(":")
    if not colon or not _dotted(module) or not _dotted(function):
        raise _Bad()
    return v


def _dotted(name: str) -> bool:
    return bool(name) and all(part.isidentifier() for part in name.split("."))


def _queue_url(key: Key, v: Any) -> str:
    if not isinstance(v, str):
        raise _Bad()
    scheme = v.split("://", 1)[0].lower() if "://" in v else ""
    if scheme not in SCHEMES:
        allowed = ", ".join(sorted({s + "://" for s in SCHEMES if "+" not in s}))
        raise _Bad(f"unknown scheme; allowed: {allowed}")
    if scheme == "sqlite":
        # The same shapes children/backends/sqlite.py accepts, so `check` catches what it would refuse.
        rest = v.split("://", 1)[1]
        if not rest.startswith("/") or "?" in rest or "#" in rest or rest.endswith("/"):
            raise _Bad('must be "sqlite:///relative/path.db" or "sqlite:////absolute/path.db"')
    return v


def _http_url(key: Key, v: Any) -> str:
    if not isinstance(v, str):
        raise _Bad()
    if v and not (v.startswith(("http://", "https://")) and v.split("://", 1)[1].split("/", 1)[0]):
        raise _Bad()
    return v


def _listen(key: Key, v: Any) -> str:
    if not isinstance(v, str):
        raise _Bad()
    if v == "":
        return v
    host, colon, port = v.rpartition(":")
    if not colon or not host or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise _Bad()
    return v


def _shutdown(key: Key, v: Any) -> float | str:
    if isinstance(v, str):
        if v not in SHUTDOWN_WORDS:
            raise _Bad()
        return v
    if isinstance(v, bool) or not isinstance(v, int | float) or not 0 <= v < float("inf"):
        raise _Bad()
    return float(v)


_CHECKS: dict[str, Callable[[Key, Any], Any]] = {
    "int": _int, "number": _number, "str": _str, "name": _name, "choice": _choice,
    "strings": _strings, "command": _command, "callable": _callable, "queue_url": _queue_url,
    "http_url": _http_url, "listen": _listen, "shutdown": _shutdown,
}


# -- rules across keys -------------------------------------------------------------------------

def _check_executor_choice(table: Mapping[str, Any], values: dict[str, Any], errors: list[str]) -> None:
    """Exactly one of command / callable says what a task runs; the default command yields to callable."""
    if not values["callable"]:
        return
    if "command" in table:
        errors.append(f"executors.command = {toml_value(table['command'])}: cannot be set together with "
                      f"executors.callable = {toml_value(values['callable'])}; keep one of them")
    values["command"] = ()


# (key, operator, other key): key must compare so with other key
_RELATIONS: tuple[tuple[str, str, str], ...] = (
    ("leaser.max_lease_secs", ">=", "leaser.lease_secs"),
    ("retry.backoff_max_secs", ">=", "retry.backoff_secs"),
    ("supervisor.heartbeat_timeout_secs", ">", "supervisor.heartbeat_secs"),
)


def _check_relations(values: dict[str, dict[str, Any]], invalid: set[str], errors: list[str]) -> None:
    for left, op, right in _RELATIONS:
        if left in invalid or right in invalid:
            continue  # one of them is reported already; comparing with its default would mislead
        a, b = _at(values, left), _at(values, right)
        if not (a >= b if op == ">=" else a > b):
            errors.append(f"{left} = {toml_value(a)}: must be {op} {right} ({toml_value(b)})")


def _at(values: dict[str, dict[str, Any]], key_path: str) -> Any:
    section, name = key_path.split(".")
    return values[section][name]


def _inherit_shutdown(values: dict[str, dict[str, Any]]) -> None:
    for section in CHILD_SECTIONS:
        if values[section]["shutdown_secs"] is None:
            values[section]["shutdown_secs"] = values["supervisor"]["shutdown_secs"]


def resolve_sqlite_url(url: str, base_dir: Path) -> str:
    """``sqlite:///rel.db`` -> ``sqlite:////<base_dir>/rel.db``; other URLs are returned unchanged.

    The SQLAlchemy convention: three slashes then a relative path, four for an absolute one.
    """
    if not url.lower().startswith("sqlite:///"):
        return url
    file = url[len("sqlite:///"):]
    if file.startswith("/") or not file:
        return url
    return f"sqlite:///{(base_dir / file).as_posix()}"
