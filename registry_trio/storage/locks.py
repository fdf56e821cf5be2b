"""Locks every process on one storage root sees: ``flock``s, which die with their holder.

Several processes may serve one storage root (worker processes of one server, or servers
sharing it), and ``registry-trio gc`` runs beside them. Two things must happen one at a time
across all of them:

- **An upload session's writes.** A request appending to, finishing or cancelling a session,
  and the purger removing it, each first claims the session (:class:`SessionClaim`): a lock on
  the session's data file, ``uploads/<id>``, itself. A second claimant is refused, never made
  to wait (the API answers 409). No lock file of its own: the lock is born and dies with the
  session, so none can be left behind, and none has to be created or removed in step with it.
- **A repository's manifest and tag changes**, each held until its events are durable, so the
  event queue has them in the order the storage had them. Their locks are spread over
  :data:`~.layout.REPOSITORY_LOCK_STRIPES` files under ``locks/``, one per stripe of
  repository names (:func:`open_repository_lock`): files and memory stay few whatever the
  number of repositories. :mod:`registry_trio.api.locks` takes them.

What both rest on: a ``flock`` belongs to an open file description, so a holder that opened the
file itself excludes every other holder, in its own process as well as in others; the kernel
drops it when that description is closed, so a process that dies (``kill -9`` included) holds
nothing any more, and nothing on disk says a lock is held: none is ever left stale.

Every function here may block on the disk; callers on the event loop use a worker thread.
"""

from __future__ import annotations

import fcntl
import os
import stat
from pathlib import Path
from types import TracebackType

from .errors import BlobUploadUnknown, UploadBusy
from .layout import Layout

__all__ = ["SessionClaim", "open_repository_lock"]


class SessionClaim:
    """Exclusive use of the upload session whose data file is ``path``, until released.

    Taken without waiting: :class:`UploadBusy` when someone holds the session,
    :class:`BlobUploadUnknown` when there is no such session (any more).
    """

    def __init__(self, path: Path, upload_id: str) -> None:
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            raise BlobUploadUnknown(upload_id) from None
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise UploadBusy from None
            # The holder before us may have finished the session (its file became a blob),
            # cancelled or purged it between our open and our lock: what we locked is then no
            # longer the session, and writing to it would write into nothing.
            if not _still_at(fd, path):
                raise BlobUploadUnknown(upload_id)
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd

    def release(self) -> None:
        """Let the session go (idempotent).

        Closing a descriptor nothing was written through does no disk I/O, so this may run
        on the event loop, and does where a release must not wait for a worker thread.
        """
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> SessionClaim:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.release()


def _still_at(fd: int, path: Path) -> bool:
    """Whether the regular file open as ``fd`` is still the one named ``path``."""
    held = os.fstat(fd)
    try:
        named = os.stat(path)
    except FileNotFoundError:
        return False
    same = (held.st_dev, held.st_ino) == (named.st_dev, named.st_ino)
    return same and stat.S_ISREG(held.st_mode)


def open_repository_lock(layout: Layout, stripe: int) -> int:
    """A new descriptor on the lock file of repository-lock stripe ``stripe`` (created when
    missing; ``locks/`` exists once the store is open). The caller ``flock``s and closes it.

    The file stays for good: removing it would let one process lock a new file while
    another still holds the removed one.
    """
    return os.open(layout.repository_lock(stripe), os.O_RDONLY | os.O_CREAT, 0o644)
