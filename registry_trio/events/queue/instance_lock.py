"""One serving instance per queue directory: an advisory lock the kernel drops with its holder.

Two servers on one SQLite outbox would both deliver every event, under one instance id. So
the serving process holds ``flock(LOCK_EX | LOCK_NB)`` on ``serving.lock`` in the queue
directory for as long as it serves, and a second one refuses to start. The kernel releases
the lock when its holder dies, however it dies (``kill -9`` included), so a crash never
blocks the next start. Offline commands (``events status|dead|replay``, ``gc``) open the
queue without it and keep working beside a server.

The lock belongs to the open file description, not to the process: processes forked from
its holder share it, so a supervisor can take it once for the workers it forks.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from pathlib import Path

from .base import QueueError

__all__ = ["LOCK_NAME", "InstanceLock", "InstanceLocked"]

LOCK_NAME = "serving.lock"


class InstanceLocked(Exception):
    """Another process serves this queue directory."""


class InstanceLock:
    """The serving lock of one queue directory; :meth:`acquire` blocks on file I/O."""

    def __init__(self, directory: str | os.PathLike[str]) -> None:
        self.directory = Path(directory).resolve()
        self.path = self.directory / LOCK_NAME
        self._fd: int | None = None

    def acquire(self) -> None:
        """Take the lock without waiting; :class:`InstanceLocked` when another process has it."""
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise QueueError(
                f"cannot use extensions.events.queue.directory {self.directory}: {exc.strerror}"
            ) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(fd)
            os.close(fd)
            raise InstanceLocked(
                f"another registry-trio process{holder} is serving the event queue in "
                f"{self.directory}; stop it, or give this instance its own "
                "extensions.events.queue.directory"
            ) from None
        except BaseException:
            os.close(fd)
            raise
        # Only for the message a second instance prints: the lock itself is the flock.
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd

    @property
    def fd(self) -> int:
        """The locked descriptor: a process given a copy holds the lock too (a worker)."""
        assert self._fd is not None, "the lock is not held"
        return self._fd

    def release(self) -> None:
        # The file stays: unlinking it would let a third process lock a new file while a
        # second one still holds the old, unlinked one.
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def _holder(fd: int) -> str:
    """`` (pid N)`` as the holder wrote it, or nothing when it cannot be read."""
    with contextlib.suppress(OSError, ValueError):
        return f" (pid {int(os.pread(fd, 32, 0))})"
    return ""
