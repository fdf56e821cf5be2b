"""One leader among a server's worker processes: an ``flock`` the kernel hands on.

The leader is the one process that delivers events and runs periodic maintenance. Every
worker opens the supervisor's lock file and tries ``flock(LOCK_EX | LOCK_NB)``; the one that
gets it leads until it exits. The kernel drops the lock with its holder however it dies
(``kill -9`` included), and the next try of another worker gets it: that bounds a takeover
at :data:`TAKEOVER_POLL` plus the time to open the sinks.

Why polling and not a blocking ``flock`` on a worker thread: a blocked ``flock`` cannot be
cancelled, and closing its descriptor under it (to cancel) races with the thread entering
the call on a number another ``open`` may already reuse. A non-blocking try every 0.1 s
costs nothing measurable and is cancelled like any sleep.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from pathlib import Path

import trio

from ..events.status import Deliverer

__all__ = ["TAKEOVER_POLL", "Leadership"]

# How often a worker that does not lead tries the lock.
TAKEOVER_POLL = 0.1


class Leadership:
    """The lock at ``path``, contended by the workers of one supervisor."""

    def __init__(self, path: Path, worker: int) -> None:
        self.path = path
        self._worker = worker
        self._fd: int | None = None

    @property
    def leading(self) -> bool:
        return self._fd is not None

    async def acquire(self) -> None:
        """Return once this process leads; it then leads until it exits."""
        fd = await trio.to_thread.run_sync(os.open, self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    await trio.sleep(TAKEOVER_POLL)
            # Read by every worker's admin API (current): who delivers. The lock is the flock.
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()} {self._worker}\n".encode(), 0)
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd

    def current(self) -> Deliverer | None:
        """The leader as it wrote itself down; None when none has yet, or it has died and no
        other has taken over yet. (A 64-byte read of a file in the supervisor's private
        directory: too small to be worth a thread.)"""
        with contextlib.suppress(OSError, ValueError), open(self.path, "rb") as file:
            pid, worker = file.read(64).split()
            os.kill(int(pid), 0)  # ProcessLookupError (an OSError) once it has exited
            return Deliverer(int(pid), int(worker))
        return None
