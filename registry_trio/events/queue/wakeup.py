"""Waking the delivering process when another process commits events to the outbox.

Inside one process the outbox wakes a sink's consumer the moment its commit lands. With
several worker processes, the one that commits is usually not the one that delivers: without
a word from the committer, the consumer would see the new rows only at its next idle poll
(seconds). So every worker that does not deliver sends one datagram per commit, naming the
sinks with new work, to a Unix socket the delivering process listens on.

A datagram can be lost (nobody listening yet, the listener's buffer full while it is busy
reading the queue anyway); that costs latency, never an event: the consumer's idle poll
still finds every committed row.
"""

from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import Callable, Sequence
from pathlib import Path

import trio

__all__ = ["WakeListener", "WakeSender"]

# Sink names are config strings without NUL (the separator); one datagram holds them all.
_SEPARATOR = b"\0"
_MAX_DATAGRAM = 65536


class WakeSender:
    """Sends "new work for these sinks"; called from the outbox's writer thread.

    Never blocks and never fails: a wake that cannot be sent is dropped (see the module).
    """

    def __init__(self, path: Path) -> None:
        self._path = str(path)
        self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._socket.setblocking(False)
        # Set while this process delivers itself: its commits wake its consumers directly.
        self.muted = False

    def send(self, sinks: Sequence[str]) -> None:
        if self.muted or not sinks:
            return
        with contextlib.suppress(OSError):
            self._socket.sendto(_SEPARATOR.join(s.encode() for s in sinks), self._path)

    def close(self) -> None:
        self._socket.close()


class WakeListener:
    """Receives wakes at ``path`` and hands each named sink to ``wake`` (the queue's)."""

    def __init__(self, path: Path, wake: Callable[[str], None]) -> None:
        self._path = path
        self._wake = wake

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Listen until cancelled; started once bound."""
        sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        with sock:
            # A listener that died (kill -9) left its socket file: binding needs it gone.
            # Only the leader binds, so no live listener's socket is ever removed here.
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self._path)
            await sock.bind(str(self._path))
            task_status.started()
            while True:
                data = await sock.recv(_MAX_DATAGRAM)
                for name in data.split(_SEPARATOR):
                    self._wake(name.decode(errors="replace"))
