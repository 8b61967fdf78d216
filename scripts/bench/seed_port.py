"""A Python 3 port of the seed, Google's ``gtaskqueue_puller`` (2010, Apache-2.0), for the benchmark.

The loop and its defaults are the seed's (``/work/shared/seed/``, and ``client_task.py`` of the same
sample): lease ``num_tasks - running`` tasks for ``lease_secs``, start one
``executable_binary INPUT_FILE OUTPUT_FILE`` subprocess per task, re-lease only when running <=
``min_running_tasks`` (or ``timeout_secs_for_next_lease_request`` after the first completion),
otherwise sleep ``sleep_before_next_poll_secs`` between polls; sleep ``sleep_interval_secs`` after an
empty lease; delete each finished task with its own request; kill a task after
``task_timeout_secs``. Its quirks are kept on purpose (a task that exits non-zero stays in the
running map until it times out; the empty-queue sleep is the full interval).

What changed: the App Engine TaskQueue REST client is replaced by a leasetree ``Backend``
(``lease`` for ``tasks.lease``, a one-receipt ``ack`` for ``tasks.delete``); payloads arrive as bytes,
so there is no base64 step; ``output_url`` posting is not ported (its default is off). One addition
for the benchmark: ``--exit-when-empty`` stops the loop when a lease comes back empty and nothing
runs (the seed loops forever).

Usage: ``python seed_port.py --url sqlite:///tasks.db --name default --executable_binary /bin/true``
"""

from __future__ import annotations

import argparse
import logging
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from children.backends import Backend, Leased, open_backend

logger = logging.getLogger("seed_port")


class ClientTask:
    """One leased task running as a subprocess (the seed's ``ClientTask``)."""

    def __init__(self, task: Leased, flags: argparse.Namespace) -> None:
        self._task = task
        self._flags = flags
        self._process: subprocess.Popen[bytes] | None = None
        self._output_file: str | None = None
        self._payload_file = ""
        self.task_id = task.task_id
        self.task_start_time = 0.0

    def init(self) -> bool:
        try:
            self._payload_file = self._dump_payload_to_file()
            self._start_task_execution()
            return True
        except OSError as exc:
            logger.error("Error initializing task %s: %s", self.task_id, exc)
            return False

    def _dump_payload_to_file(self) -> str:
        fd, fname = tempfile.mkstemp()
        with os.fdopen(fd, "wb") as f:
            f.write(self._task.payload)
        return fname

    def _get_output_file(self) -> str:
        if not self._output_file:
            fd, self._output_file = tempfile.mkstemp()
            os.close(fd)
        return self._output_file

    def _start_task_execution(self) -> None:
        cmdline = self._flags.executable_binary.split(" ")
        cmdline += [self._payload_file, self._get_output_file()]
        try:
            self._process = subprocess.Popen(cmdline)
        except OSError:
            self._cleanup()
            raise
        self.task_start_time = time.time()

    def is_completed(self, backend: Backend) -> bool:
        """True when there is nothing more to run: exited 0 (then deleted) or timed out (killed)."""
        assert self._process is not None  # init() succeeded, or the task is not in the map
        status = self._process.poll()
        if status == 0:
            # the seed posts the output here when output_url is set, and deletes only if that worked
            self._delete_task_from_queue(backend)
            self._cleanup()
            return True
        if self._has_timedout():
            self._kill_subprocess()
            return True
        return False

    def _cleanup(self) -> None:
        for name in (self._payload_file, self._output_file):
            if name and os.path.exists(name):
                os.remove(name)

    def _delete_task_from_queue(self, backend: Backend) -> None:
        # one request per task, as the seed did (tasks().delete(task=id)); errors are only logged
        try:
            backend.ack([self._task.receipt])
        except Exception as exc:  # the seed caught HttpError and went on
            logger.error("Error deleting task %s from taskqueue: %s", self.task_id, exc)

    def _has_timedout(self) -> bool:
        return time.time() - self.task_start_time > self._flags.task_timeout_secs

    def _kill_subprocess(self) -> None:
        self._cleanup()
        assert self._process is not None
        self._process.kill()
        self._process.wait()


class TaskQueuePuller:
    """The seed's ``TaskQueuePuller``: state for the lease/poll loop."""

    def __init__(self, backend: Backend, flags: argparse.Namespace) -> None:
        self.backend = backend
        self.flags = flags
        self._last_lease_time: float | None = None
        self._poll_timeout_start: float | None = None
        self._num_last_leased_tasks = 0
        self._taskprocess_map: dict[str, ClientTask] = {}

    def _can_lease(self) -> bool:
        return self._num_tasks_to_lease() > 0 and not self._is_rate_exceeded()

    def _is_rate_exceeded(self) -> bool:
        # N leased tasks cost N+1 API calls (one lease, N deletes): wait (N - running)/K seconds
        if not self.flags.taskapi_requests_per_sec or not self._last_lease_time:
            return False
        elapsed = time.time() - self._last_lease_time
        pending = self._num_last_leased_tasks - len(self._taskprocess_map)
        owed = pending / self.flags.taskapi_requests_per_sec
        return elapsed < owed

    def _num_tasks_to_lease(self) -> int:
        return self.flags.num_tasks - len(self._taskprocess_map)

    def _update_last_lease_info(self, result: list[Leased] | None) -> None:
        self._last_lease_time = time.time()
        self._num_last_leased_tasks = len(result) if result else 0

    def _update_poll_timeout_start(self) -> None:
        if not self._poll_timeout_start:
            self._poll_timeout_start = time.time()

    def _continue_polling(self) -> bool:
        if len(self._taskprocess_map) <= self.flags.min_running_tasks:
            return False
        if self._poll_timeout_start:
            elapsed_time = time.time() - self._poll_timeout_start
            if elapsed_time > self.flags.timeout_secs_for_next_lease_request:
                self._poll_timeout_start = None
                return False
        return True

    def _get_tasks_from_queue(self) -> list[Leased] | None:
        try:
            return self.backend.lease(self._num_tasks_to_lease(), self.flags.lease_secs)
        except Exception as exc:  # the seed caught HttpError, logged it and returned None
            logger.error("Error during lease request: %s", exc)
            return None

    def _create_subprocesses_for_tasks(self, result: list[Leased] | None) -> None:
        for task in result or []:
            # a re-leased task may already be running here: never start it twice
            if task.task_id not in self._taskprocess_map:
                ct = ClientTask(task, self.flags)
                if ct.init():
                    self._taskprocess_map[ct.task_id] = ct

    def _poll_running_tasks(self) -> None:
        for task in list(self._taskprocess_map.values()):
            if task.is_completed(self.backend):
                del self._taskprocess_map[task.task_id]
                self._update_poll_timeout_start()

    def _sleep_before_next_lease(self) -> None:
        if not self._last_lease_time:
            sleep_secs = 0.0
        elif self._num_last_leased_tasks <= 0:
            sleep_secs = self.flags.sleep_interval_secs - (time.time() - self._last_lease_time)
        else:
            sleep_secs = 0.0
        if sleep_secs > 0:
            logger.info("No tasks found and hence sleeping for sometime")
            time.sleep(self.flags.sleep_interval_secs)  # sic: the full interval, as the seed did

    def lease_tasks(self) -> bool:
        self._sleep_before_next_lease()
        if self._can_lease():
            result = self._get_tasks_from_queue()
            self._update_last_lease_info(result)
            self._create_subprocesses_for_tasks(result)
            return True
        return False

    def poll_tasks(self) -> None:
        self._poll_running_tasks()
        while self._continue_polling():
            logger.info("Sleeping before next poll")
            time.sleep(self.flags.sleep_before_next_poll_secs)
            self._poll_running_tasks()

    def idle(self) -> bool:
        """The last lease found nothing and nothing runs (for --exit-when-empty)."""
        return self._last_lease_time is not None and self._num_last_leased_tasks == 0 \
            and not self._taskprocess_map


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--url", required=True, help="leasetree queue URL, e.g. sqlite:///tasks.db")
    p.add_argument("--name", default="default", help="queue name (the seed's taskqueue_name)")
    p.add_argument("--lease_secs", type=int, default=30)
    p.add_argument("--num_tasks", type=int, default=10)
    p.add_argument("--min_running_tasks", type=int, default=0)
    p.add_argument("--sleep_interval_secs", type=float, default=2)
    p.add_argument("--timeout_secs_for_next_lease_request", type=float, default=600)
    p.add_argument("--taskapi_requests_per_sec", type=int, default=None)
    p.add_argument("--sleep_before_next_poll_secs", type=float, default=2)
    p.add_argument("--executable_binary", default="/bin/cat")
    p.add_argument("--task_timeout_secs", type=float, default=3600)
    p.add_argument("--exit-when-empty", action="store_true",
                   help="benchmark addition: stop once a lease is empty and nothing runs")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    flags = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(message)s")
    backend = open_backend(flags.url, flags.name, Path.cwd())
    puller = TaskQueuePuller(backend, flags)
    try:
        while True:
            puller.lease_tasks()
            if flags.exit_when_empty and puller.idle():
                return
            puller.poll_tasks()
    finally:
        backend.close()


if __name__ == "__main__":
    sys.exit(main())
