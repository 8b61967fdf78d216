"""systemd's notify protocol (``Type=notify``), spoken by the root: one datagram per state change
to the AF_UNIX SOCK_DGRAM socket named by ``$NOTIFY_SOCKET`` (a path, or an abstract name when it
starts with ``@``). See sd_notify(3).

The root sends ``READY=1`` once every child is up, ``STOPPING=1`` when a stop begins, ``RELOADING=1``
/ ``READY=1`` around a reload, ``WATCHDOG=1`` every ``WATCHDOG_USEC/2`` from its loop (so a hung
loop is what systemd sees), and ``STATUS=...`` lines for ``systemctl status``. ``from_env()`` removes
the variables from the environment, as ``sd_notify(unset_environment=1)`` does: children and tasks
must not talk to systemd on the root's behalf.
"""

from __future__ import annotations

import logging
import os
import socket
import time

log = logging.getLogger("root")  # the root process: its place in the tree


class Notifier:
    """Sends notify datagrams to ``address``; does nothing when ``address`` is empty. Send errors
    are logged once and otherwise ignored: systemd going away must not take the tree down."""

    def __init__(self, address: str = "", watchdog_usec: int = 0) -> None:
        self.address = address
        self.watchdog_secs = watchdog_usec / 1e6 / 2 if watchdog_usec > 0 else 0.0
        self._sock: socket.socket | None = None
        self._warned = False
        self.next_watchdog: float | None = None

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None) -> Notifier:
        """Read (and remove) NOTIFY_SOCKET, WATCHDOG_USEC, WATCHDOG_PID from ``environ`` (default
        ``os.environ``). The watchdog is on only when WATCHDOG_PID is unset or names this process."""
        env = os.environ if environ is None else environ
        address = env.pop("NOTIFY_SOCKET", "")
        usec_text = env.pop("WATCHDOG_USEC", "")
        pid_text = env.pop("WATCHDOG_PID", "")
        usec = int(usec_text) if usec_text.isdigit() else 0
        if pid_text and pid_text != str(os.getpid()):
            usec = 0
        return cls(address, usec)

    @property
    def enabled(self) -> bool:
        return bool(self.address)

    def send(self, *fields: str) -> bool:
        """Send ``fields`` ("READY=1", "STATUS=...") as one datagram; True if it was sent."""
        if not self.address:
            return False
        target = "\0" + self.address[1:] if self.address.startswith("@") else self.address
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            self._sock.sendto("\n".join(fields).encode(), target)
            return True
        except OSError as exc:
            if not self._warned:
                log.warning("systemd notify to %s failed: %s", self.address, exc)
                self._warned = True
            return False

    def ready(self, status: str = "") -> None:
        self.send("READY=1", *([f"STATUS={status}"] if status else []), f"MAINPID={os.getpid()}")

    def stopping(self, status: str = "") -> None:
        self.send("STOPPING=1", *([f"STATUS={status}"] if status else []))

    def reloading(self, status: str = "") -> None:
        # RELOADING=1 wants MONOTONIC_USEC since systemd 253 (Type=notify-reload); older ignore it
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        self.send("RELOADING=1", f"MONOTONIC_USEC={usec}", *([f"STATUS={status}"] if status else []))

    def status(self, text: str) -> None:
        self.send(f"STATUS={text}")

    # -- the watchdog: driven by the root's loop, time an argument ------------------------------------
    def watchdog_deadline(self, now: float) -> float | None:
        """When the loop must wake to send the next WATCHDOG=1 (None when the watchdog is off)."""
        if not self.address or not self.watchdog_secs:
            return None
        if self.next_watchdog is None:
            self.next_watchdog = now
        return self.next_watchdog

    def on_timer(self, now: float) -> None:
        """Send WATCHDOG=1 if it is due."""
        deadline = self.watchdog_deadline(now)
        if deadline is not None and now >= deadline:
            self.send("WATCHDOG=1")
            self.next_watchdog = now + self.watchdog_secs

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
