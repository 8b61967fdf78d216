"""Queue backends, chosen by the scheme of ``[queue] url``.

``open_backend(url, name, base_dir)`` imports the backend's module only when asked, so that a host
without, say, redis-py can still run on SQLite; a missing driver is a one-line ``BackendConfigError``
naming the extra to install.

``faulty+URL?plan`` (e.g. ``faulty+sqlite:///tasks.db?fail=ack:0.3&seed=1``) opens URL wrapped in
``children/backends/faulty.py``'s fault injector, for tests and drills.
"""

from __future__ import annotations

import importlib
from pathlib import Path

from children.backends.base import (
    Backend,
    BackendConfigError,
    BackendError,
    BackendUnavailable,
    Leased,
    Limits,
    Outcome,
    QueueStats,
    TaskInfo,
    TaskState,
)

__all__ = [
    "Backend", "BackendConfigError", "BackendError", "BackendUnavailable", "Leased", "Limits",
    "Outcome", "QueueStats", "TaskInfo", "TaskState", "SCHEMES", "open_backend",
]

# scheme -> (module, class name, the extra that brings its driver)
SCHEMES: dict[str, tuple[str, str, str]] = {
    "memory": ("children.backends.memory", "MemoryBackend", ""),
    "sqlite": ("children.backends.sqlite", "SqliteBackend", ""),
    "redis": ("children.backends.redis", "RedisBackend", "redis"),
    "rediss": ("children.backends.redis", "RedisBackend", "redis"),
    "postgresql": ("children.backends.postgresql", "PostgresBackend", "postgresql"),
    "postgres": ("children.backends.postgresql", "PostgresBackend", "postgresql"),
    "nats": ("children.backends.nats", "NatsBackend", "nats"),
    "sqs": ("children.backends.sqs", "SqsBackend", "sqs"),
}
# faulty+SCHEME wraps SCHEME's backend in the fault injector (listed so config validation accepts it)
FAULTY_PREFIX = "faulty+"
SCHEMES.update({FAULTY_PREFIX + s: ("children.backends.faulty", "FaultyBackend", e)
                for s, (_, _, e) in list(SCHEMES.items())})


def scheme_of(url: str) -> str:
    return url.split("://", 1)[0].lower() if "://" in url else ""


def open_backend(url: str, name: str = "default", base_dir: Path | None = None) -> Backend:
    """Open the backend for ``url`` and queue ``name``.

    ``base_dir`` resolves relative paths (the config file's folder). Each backend class takes
    ``(url, name, base_dir)``. Raises BackendConfigError for an unknown scheme or a missing driver.
    """
    if url[:len(FAULTY_PREFIX)].lower() == FAULTY_PREFIX:
        from children.backends.faulty import open_faulty

        return open_faulty(url, name, base_dir)
    scheme = scheme_of(url)
    if scheme not in SCHEMES:
        allowed = ", ".join(sorted({s + "://" for s in SCHEMES if not s.startswith(FAULTY_PREFIX)}))
        raise BackendConfigError(f"queue.url = {redact_url(url)!r}: unknown scheme; allowed: {allowed}")
    module_name, class_name, extra = SCHEMES[scheme]
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        # Not only ModuleNotFoundError: a driver that is there but cannot load says so with a plain
        # ImportError (psycopg without a libpq: "no pq wrapper available", over several lines).
        if not extra or (exc.name or "").startswith("children"):
            raise
        if isinstance(exc, ModuleNotFoundError) and exc.name:
            driver = f"the {exc.name!r} driver"
        else:
            why = (str(exc).strip().splitlines() or ["ImportError"])[0]
            driver = f"a driver that does not import ({why})"
        raise BackendConfigError(
            f"queue.url = {redact_url(url)!r} needs {driver}: pip install 'leasetree[{extra}]'") from None
    cls = getattr(module, class_name)
    return cls(url, name, base_dir or Path.cwd())


def redact_url(url: str) -> str:
    """The URL with any password replaced by '***', for logs, errors and status."""
    if "://" not in url or "@" not in url.split("://", 1)[1].split("/", 1)[0]:
        return url
    scheme, rest = url.split("://", 1)
    netloc, sep, path = rest.partition("/")
    userinfo, _, host = netloc.rpartition("@")
    user, colon, _password = userinfo.partition(":")
    return f"{scheme}://{user}{':***' if colon else ''}@{host}{sep}{path}"
