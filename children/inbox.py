"""Reading a DEALER socket without blocking: every waiting message, decoded; a malformed frame is
logged and dropped (it never reaches the caller, and never crashes it)."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import zmq

from children import protocol as p


def waiting_messages(sock: zmq.Socket, log: logging.Logger, source: str) -> Iterator[p.Message]:
    """Yield each message waiting on ``sock`` until none is left."""
    while True:
        try:
            frame = sock.recv(zmq.NOBLOCK)
        except zmq.Again:
            return
        try:
            yield p.decode(frame)
        except p.ProtocolError as exc:
            log.warning("dropped a malformed frame from %s: %s", source, exc)
