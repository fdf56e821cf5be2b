"""The supervisor: ``http.workers`` processes serving one port, kept alive.

Task tree::

    supervise
    └── one keeper per worker   (starts its process, restarts it when it dies)

Start-up: the supervisor takes the queue directory's serving lock (events on), creates the
store and the queue file, binds the listening sockets, writes the parsed config into a
private directory, and starts the workers. It reports the URL once every worker serves; a
worker that exits before it first serves fails the start-up (its own message says why),
since its siblings would fail alike.

Each worker accepts on a socket of its own, all bound to the one port with SO_REUSEPORT,
so that the kernel spreads connections over the workers by a hash of their addresses.
One socket shared by every worker spread new short connections as evenly, but a burst of
connections opened at once (a client's pool) went mostly to whichever worker woke first,
since it accepts all that are waiting before it serves any: 8 keep-alive connections
landed 62/38, 100/0, 100/0 in three tries, against 62/38, 88/12, 62/38 with SO_REUSEPORT
(400 one-request connections: 50-55% either way). The supervisor binds every socket and
keeps them open: a port 0 bind is one port for all, and connections hashed to a worker that
died wait in its socket's backlog for the worker started in its place.

Workers inherit the serving lock's descriptor: the lock is held while any process of this
server lives, so a new server on the same queue cannot start beside a worker still draining.

A worker that dies is started again, after 0.1 s doubling up to :data:`RESTART_BACKOFF_MAX`
while it keeps dying young. On shutdown every worker gets SIGTERM and drains on its own
(``http.gracefulTimeout``, then ``extensions.events.shutdownTimeout``); one still running
:data:`KILL_MARGIN` after both is killed.
"""

from __future__ import annotations

import contextlib
import logging
import os
import pickle
import shutil
import signal
import socket
import sys
import tempfile
from pathlib import Path

import trio

from ..config import Config
from ..events.queue import Outbox
from ..events.queue.instance_lock import InstanceLock
from ..server import listening_sockets, open_storage
from ..startup import summary
from .worker import CONFIG_FILE, EXPLAINED, FAILED, READY

__all__ = ["WorkerFailedToStart", "supervise"]

log = logging.getLogger("registry_trio.workers")

RESTART_BACKOFF_MAX = 10.0
# A worker that ran this long before dying died of something new: restart it at once.
HEALTHY_RUN = 60.0
KILL_MARGIN = 5.0


class WorkerFailedToStart(Exception):
    """A worker exited before it first served: why, as it said, or how it ended."""


class _Keeper:
    """Keeps worker ``number`` running until :meth:`stop`."""

    def __init__(self, number: int, listen_fd: int, runtime: Path, lock_fd: int | None) -> None:
        self.number = number
        self._listen_fd = listen_fd
        self._runtime = runtime
        self._lock_fd = lock_fd
        self.ready = trio.Event()
        self.process: trio.Process | None = None
        self._stopping = False
        # Why the last process could not start, as it said on the control socket.
        self._failure = ""

    async def run(self) -> None:
        restarts = 0
        while not self._stopping:
            started = trio.current_time()
            served = await self._run_once()
            if self._stopping:
                return
            assert self.process is not None
            status = _describe_exit(self.process.returncode)
            if not self.ready.is_set():
                if self.process.returncode == EXPLAINED and self._failure:
                    raise WorkerFailedToStart(self._failure)
                raise WorkerFailedToStart(f"worker {self.number} {status} before serving")
            if not served or trio.current_time() - started < HEALTHY_RUN:
                restarts += 1
            else:
                restarts = 0
            delay = 0.0 if restarts == 0 else min(0.1 * 2 ** (restarts - 1), RESTART_BACKOFF_MAX)
            log.warning(
                "worker %d (pid %d) %s; starting it again in %.1fs",
                self.number,
                self.process.pid,
                status,
                delay,
            )
            await trio.sleep(delay)

    async def _run_once(self) -> bool:
        """Run one process of this worker until it exits; whether it served."""
        ours, theirs = socket.socketpair()
        served = False
        with ours:
            with theirs:
                passed = [self._listen_fd, theirs.fileno()]
                if self._lock_fd is not None:
                    passed.append(self._lock_fd)
                self.process = await trio.lowlevel.open_process(
                    [
                        sys.executable,
                        "-m",
                        "registry_trio.workers.worker",
                        f"--number={self.number}",
                        f"--listen-fd={self._listen_fd}",
                        f"--control-fd={theirs.fileno()}",
                        f"--runtime={self._runtime}",
                    ],
                    pass_fds=passed,
                    env={**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(self._runtime / "metrics")},
                )
            control = trio.socket.from_stdlib_socket(ours)
            async with trio.open_nursery() as nursery:

                async def until_ready() -> None:
                    nonlocal served
                    said = b""
                    while not said.endswith(b"\n") and (chunk := await control.recv(4096)):
                        said += chunk
                    if said == READY:
                        served = True
                        self.ready.set()
                    elif said.startswith(FAILED):
                        self._failure = said[len(FAILED) :].decode(errors="replace").strip()

                nursery.start_soon(until_ready)
                try:
                    await self.process.wait()
                finally:
                    # Cancelled (a sibling failed to start): no worker outlives the supervisor,
                    # nor the private directory it reads.
                    with trio.CancelScope(shield=True):
                        await self._end(self.process)
                nursery.cancel_scope.cancel()
        return served

    @staticmethod
    async def _end(process: trio.Process) -> None:
        if process.returncode is None:
            process.terminate()
            with trio.move_on_after(KILL_MARGIN):
                await process.wait()
            if process.returncode is None:
                process.kill()
                await process.wait()

    def stop(self) -> None:
        """SIGTERM the process; it is not started again."""
        self._stopping = True
        if self.process is not None and self.process.returncode is None:
            self.process.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        if self.process is not None and self.process.returncode is None:
            self.process.kill()


def _describe_exit(returncode: int | None) -> str:
    if returncode is not None and returncode < 0:
        return f"was killed by {signal.Signals(-returncode).name}"
    return f"exited with status {returncode}"


async def supervise(
    config: Config,
    *,
    shutdown: trio.Event,
    task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve with ``config.http.workers`` worker processes until ``shutdown`` is set."""
    events = config.extensions.events
    lock = None
    if events.enable:
        lock = InstanceLock(events.queue.directory)
        await trio.to_thread.run_sync(lock.acquire)
        if events.queue.type == "sqlite":
            await trio.to_thread.run_sync(Outbox(events.queue.directory).prepare)
    # The store is created, and what the last run left staged in tmp/ is removed, once
    # here: a worker started again later must not remove what its siblings are staging.
    await trio.to_thread.run_sync(open_storage, config)
    runtime = Path(tempfile.mkdtemp(prefix="registry-trio-"))
    try:
        (runtime / "metrics").mkdir()
        (runtime / CONFIG_FILE).write_bytes(pickle.dumps(config))
        listeners, url = listening_sockets(config, config.http.workers)
        with contextlib.ExitStack() as open_sockets:
            for listener in listeners:
                open_sockets.enter_context(listener)
            await _run_workers(config, listeners, runtime, lock, url, shutdown, task_status)
    finally:
        shutil.rmtree(runtime, ignore_errors=True)
        if lock is not None:
            lock.release()


async def _run_workers(
    config: Config,
    listeners: list[socket.socket],
    runtime: Path,
    lock: InstanceLock | None,
    url: str,
    shutdown: trio.Event,
    task_status: trio.TaskStatus[str],
) -> None:
    keepers = [
        _Keeper(n, listener.fileno(), runtime, None if lock is None else lock.fd)
        for n, listener in enumerate(listeners, start=1)
    ]
    async with trio.open_nursery() as nursery:
        for keeper in keepers:
            nursery.start_soon(keeper.run)
        for keeper in keepers:
            await keeper.ready.wait()
        log.info("%s", summary(config, url))
        task_status.started(url)
        await shutdown.wait()
        for keeper in keepers:
            keeper.stop()
        drain = float(config.http.graceful_timeout) + float(
            config.extensions.events.shutdown_timeout
        )
        with trio.move_on_after(drain + KILL_MARGIN) as waited:
            for keeper in keepers:
                if keeper.process is not None:
                    await keeper.process.wait()
        if waited.cancelled_caught:
            log.warning("workers still running %.0fs after SIGTERM: killing them", drain)
            for keeper in keepers:
                with contextlib.suppress(OSError):
                    keeper.kill()
