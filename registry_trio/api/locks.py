"""One lock per repository, so that its changes and their events happen in one order."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import trio

__all__ = ["RepositoryLocks"]


@dataclass
class _Entry:
    lock: trio.Lock = field(default_factory=trio.Lock)
    users: int = 0  # holding or waiting


class RepositoryLocks:
    """``async with locks.hold(name)``: one holder per repository name at a time.

    In-process: every worker of one storage is a task of this process today. Several
    processes on one storage root will need a lock all of them see (and one held until the
    shared queue committed, since their appends are not ordered by one writer); this is the
    one place to put it. A lock exists only while someone holds or waits for it, so memory
    stays bounded by the requests in flight, not by the number of repositories.
    """

    def __init__(self) -> None:
        self._entries: dict[str, _Entry] = {}

    @contextlib.asynccontextmanager
    async def hold(self, name: str) -> AsyncIterator[None]:
        entry = self._entries.setdefault(name, _Entry())
        entry.users += 1
        try:
            # A free lock is taken without a schedule point: on a busy event loop each one
            # costs a turn behind every runnable task (bench/push.py: manifest PUT p50 +3 ms).
            try:
                entry.lock.acquire_nowait()
            except trio.WouldBlock:
                await entry.lock.acquire()
            try:
                yield
            finally:
                entry.lock.release()
        finally:
            entry.users -= 1
            if entry.users == 0:
                del self._entries[name]
