"""One lock per repository, so that its changes and their events happen in one order, across
every process that serves the storage root."""

from __future__ import annotations

import contextlib
import fcntl
import functools
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import trio

from ..storage.layout import REPOSITORY_LOCK_STRIPES, Layout
from ..storage.locks import open_repository_lock

__all__ = ["RepositoryLocks"]


@dataclass
class _Stripe:
    # Turns within this process: the flock below is this process's, one holder at a time.
    turn: trio.Lock = field(default_factory=trio.Lock)
    # This process's descriptor on the stripe's lock file, opened at first use and kept.
    fd: int | None = None


class RepositoryLocks:
    """``async with locks.hold(name)``: one holder per repository name at a time, among all
    the processes on the storage root.

    Names are spread over :data:`REPOSITORY_LOCK_STRIPES` stripes (a stable hash of the name,
    :meth:`Layout.repository_lock_stripe`); holding a name holds its stripe: its trio lock in
    this process, then an ``flock`` on the stripe's file under ``locks/``, which every other
    process sees and which the kernel drops if this one dies. Two repositories that share a
    stripe take turns, as they would across processes anyway; a stripe is one of 256, and a
    change holds it for milliseconds. Memory and descriptors are bounded by the number of
    stripes (one trio lock and one descriptor each, made at first use), not by the number
    of repositories.

    One descriptor per stripe per process, and so one trio lock per stripe rather than per
    name: a flock belongs to the descriptor, so two holders in this process sharing it would
    both "hold" it; the trio lock makes them take turns before they touch it. For the same
    reason each process needs its own instance: a descriptor inherited through ``fork``
    shares its lock with the parent (none is opened before the first change, though).

    Cost when nothing competes (every push of a new manifest): a trio lock taken without a
    schedule point and one ``flock(LOCK_NB)`` system call, on the event loop. That call never
    waits and touches no disk; a trip to a worker thread would cost a turn behind every
    runnable task (bench/push.py: +3 ms manifest PUT p50 for one schedule point). Only a
    stripe another process holds sends the wait to a thread.

    Cancellation: waiting for this process's turn is cancellable. Waiting for another
    process, on a thread, is not (a blocked ``flock`` cannot be interrupted): a cancelled
    waiter gets the lock once the other process lets go, which it does within its own change,
    and releases it at its next checkpoint. ``registry-trio gc`` takes none of these locks
    (see :func:`registry_trio.maintenance.collect_once`).
    """

    def __init__(self, layout: Layout) -> None:
        self._layout = layout
        self._stripes: dict[int, _Stripe] = {}
        # At most one thread per stripe waits on another process.
        self._waiters = trio.CapacityLimiter(REPOSITORY_LOCK_STRIPES)

    @contextlib.asynccontextmanager
    async def hold(self, name: str) -> AsyncIterator[None]:
        index = self._layout.repository_lock_stripe(name)
        stripe = self._stripes.get(index)
        if stripe is None:
            stripe = self._stripes[index] = _Stripe()
        # A free lock is taken without a schedule point: on a busy event loop each one
        # costs a turn behind every runnable task (bench/push.py: manifest PUT p50 +3 ms).
        try:
            stripe.turn.acquire_nowait()
        except trio.WouldBlock:
            await stripe.turn.acquire()
        try:
            fd = stripe.fd
            if fd is None:
                open_lock = functools.partial(open_repository_lock, self._layout, index)
                fd = stripe.fd = await trio.to_thread.run_sync(open_lock)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                # Another process holds the stripe.
                await trio.to_thread.run_sync(fcntl.flock, fd, fcntl.LOCK_EX, limiter=self._waiters)
            try:
                yield
            finally:
                fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            stripe.turn.release()

    def close(self) -> None:
        """Close this process's descriptors, once nothing holds or waits for a lock."""
        for stripe in self._stripes.values():
            if stripe.fd is not None:
                os.close(stripe.fd)
                stripe.fd = None
