"""Logging for the whole tree: ``[log] level`` and ``format`` ("text" for a person, "json" for a
collector: one object per line with time, level, component and, where there is one, task id).

Set up once in the root before any child is forked; children inherit the handlers, and each names
its logger by its place in the tree (``root/executors/executor.3``), which becomes ``component``.
``component_of`` makes that hold for every record: a supervisor's dotted logger name
(``root.executors``) becomes its path, and a module's logger (``supervisor.runner``,
``children.tasks``, a task's own) gets the place of the process that logged it -- ``root`` in the
root, the worker's path in a worker (``multiprocess`` names each worker process by its path).
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time

ROOT = "root"


def process_path() -> str:
    """This process's place in the tree: the worker's path, or ``root`` in the root."""
    mp = sys.modules.get("multiprocess")
    if mp is not None:
        name = mp.current_process().name
        if name.startswith(ROOT + "/"):
            return name
    return ROOT


def component_of(logger_name: str) -> str:
    """The tree path a record from ``logger_name`` belongs to."""
    logger_name = logger_name or ""
    if logger_name == ROOT or logger_name.startswith(ROOT + "/"):
        return logger_name
    here = process_path()
    if logger_name.startswith(ROOT + ".") and here == ROOT:
        # a supervisor inside the root ("root.executors"); supervisor ids never hold dots
        return logger_name.replace(".", "/")
    return here

TEXT_FORMAT = "%(asctime)s %(levelname)-7s %(name)s[%(process)d]: %(message)s"


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "component": component_of(record.name),
            "pid": record.process,
            "message": record.getMessage(),
        }
        if entry["component"] != record.name:
            entry["logger"] = record.name
        task_id = getattr(record, "task_id", None)
        if task_id is not None:
            entry["task_id"] = task_id
        if record.exc_info:
            entry["traceback"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


def setup_logging(level: str = "info", fmt: str = "text", stream=None) -> None:
    """Replace the root logger's handlers with one that writes to stderr in ``fmt``."""
    handler = logging.StreamHandler(stream or sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter(TEXT_FORMAT, datefmt="%Y-%m-%d %H:%M:%S"))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(getattr(logging, level.upper(), logging.INFO))
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
