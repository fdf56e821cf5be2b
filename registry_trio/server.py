"""Running the registry: build the shared state, serve HTTP, stop cleanly.

Task tree (every task has an owner, and shutdown runs in reverse order of start)::

    serve
    ├── outbox writer          (events on: commits events before requests get their 2xx)
    ├── hypercorn              (HTTP)
    └── leader duties          (at once in a one-process server; in a worker, once it leads)
        ├── wake listener      (a worker, events on: commits of the other workers)
        ├── delivery supervisor (events on: one task per sink)
        └── maintenance
            ├── history pruner     (events on: the delivery history to its limits)
            ├── garbage collector  (storage.gc on: every gcInterval)
            └── upload purger      (storage.uploadPurging on: every interval)

On ``shutdown`` Hypercorn stops accepting and lets in-flight requests finish for
``http.gracefulTimeout``; then delivery stops taking work and gives sends under way
``extensions.events.shutdownTimeout``; then the writer commits what is queued and exits.
What was not delivered stays in the outbox for the next start.

A one-process server holds the queue directory's serving lock
(:mod:`~registry_trio.events.queue.instance_lock`) for its whole run: a second server on it
refuses to start. A worker (:mod:`registry_trio.workers`) is given its place instead: the
socket to accept on, and the supervisor's directory, where the workers contend for the
lead; the supervisor holds the serving lock for all of them.
"""

from __future__ import annotations

import functools
import logging
import socket
import sys
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.trio import serve as hypercorn_serve
from hypercorn.typing import ASGIFramework

from .api import Registry, create_app
from .api.locks import RepositoryLocks
from .auth import Authenticator
from .config import Config
from .events import EventRecorder, NullRecorder, Source
from .events.delivery import DeliverySupervisor
from .events.filters import SinkFilter
from .events.queue import EventQueue, open_queue
from .events.queue.instance_lock import InstanceLock
from .events.queue.wakeup import WakeListener, WakeSender
from .events.recorder import QueueRecorder
from .events.status import Deliverer
from .maintenance import gc_periodically, purge_periodically
from .metrics import Metrics
from .startup import StartupError, summary
from .storage import FilesystemStorage
from .tls import HTTPSConfig
from .workers.leadership import Leadership

__all__ = ["WorkerPlace", "hypercorn_config", "listening_sockets", "open_storage", "serve"]

log = logging.getLogger("registry_trio")

SWITCH_INTERVAL = 0.0005
# An idle keep-alive connection is closed after this long (Hypercorn's default).
KEEP_ALIVE_TIMEOUT = 5.0


def hypercorn_config(config: Config) -> HypercornConfig:
    hc = HypercornConfig() if config.http.tls is None else HTTPSConfig(config.http.tls)
    hc.bind = [f"{config.http.address}:{config.http.port}"]
    hc.accesslog = None  # the dispatcher writes one access line per request itself
    hc.errorlog = logging.getLogger("hypercorn.error")
    hc.graceful_timeout = config.http.graceful_timeout
    hc.include_server_header = False
    # Body messages Hypercorn queues for a request before it stops reading the socket; what
    # follows waits in the kernel's socket buffer, not here. Hypercorn's 10 let each of 200
    # uploads that had sent 1 MiB hold up to 640 KiB in this process.
    hc.max_app_queue_size = 1
    hc.keep_alive_timeout = KEEP_ALIVE_TIMEOUT
    # A connection that never completes its TLS handshake is dropped as soon as an idle one
    # would be; Hypercorn's 60 s let each silent client hold a connection twelve times longer.
    hc.ssl_handshake_timeout = KEEP_ALIVE_TIMEOUT
    return hc


def listening_sockets(config: Config, count: int) -> tuple[list[socket.socket], str]:
    """``count`` listening sockets on ``http.address`` and one port, and the URL they serve.

    Several (one per worker) are bound with SO_REUSEPORT; a port 0 bind picks the port for
    all. Binding fails with a :class:`StartupError` that names the keys and the reason.
    """
    hc = hypercorn_config(config)
    hc.workers = count  # Hypercorn sets SO_REUSEPORT when it is above 1
    sockets: list[socket.socket] = []
    try:
        for _ in range(count):
            created = hc.create_sockets()
            (listener,) = created.secure_sockets + created.insecure_sockets
            sockets.append(listener)
            listener.listen(hc.backlog)
            # A port 0 bind chose the port: the other sockets take the same one.
            hc.bind = [f"{config.http.address}:{listener.getsockname()[1]}"]
    except OSError as exc:
        for listener in sockets:
            listener.close()
        raise StartupError(
            f"cannot listen on {config.http.address}:{config.http.port} "
            f"(http.address, http.port): {exc.strerror or exc}"
        ) from None
    host, port = sockets[0].getsockname()[:2]
    scheme = "https" if hc.ssl_enabled else "http"
    return sockets, f"{scheme}://{f'[{host}]' if ':' in host else host}:{port}"


def open_storage(config: Config, *, clean_tmp: bool = True) -> FilesystemStorage:
    """The store at ``storage.rootDirectory`` (blocking); :class:`StartupError` if unusable."""
    try:
        return FilesystemStorage(config.storage.root_directory, clean_tmp=clean_tmp)
    except OSError as exc:
        raise StartupError(
            f"cannot use storage.rootDirectory {config.storage.root_directory}: "
            f"{exc.strerror or exc}"
        ) from None


@dataclass(frozen=True)
class WorkerPlace:
    """What a worker process is given by its supervisor (see :mod:`registry_trio.workers`)."""

    # 1 to http.workers: names the worker in its log lines and in the admin API.
    number: int
    # The listening socket the supervisor bound, shared by every worker.
    listen_fd: int
    # The supervisor's private directory: the lead's lock, the wake socket, metrics files.
    runtime: Path

    @property
    def leader_lock(self) -> Path:
        return self.runtime / "leader.lock"

    @property
    def wake_socket(self) -> Path:
        return self.runtime / "wake.sock"

    @property
    def metrics(self) -> Path:
        return self.runtime / "metrics"


async def serve(
    config: Config,
    *,
    shutdown: trio.Event | None = None,
    worker: WorkerPlace | None = None,
    task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve until ``shutdown`` is set; ``task_status.started`` gets the bound base URL.

    Raises :class:`~registry_trio.events.queue.instance_lock.InstanceLocked` when another
    process serves the same event queue directory.
    """
    lock = None
    if config.extensions.events.enable and worker is None:
        lock = InstanceLock(config.extensions.events.queue.directory)
        await trio.to_thread.run_sync(lock.acquire)
    try:
        await _serve(
            config, shutdown if shutdown is not None else trio.Event(), worker, task_status
        )
    finally:
        if lock is not None:
            lock.release()


async def _serve(
    config: Config,
    shutdown: trio.Event,
    worker: WorkerPlace | None,
    task_status: trio.TaskStatus[str],
) -> None:
    # Disk work (storage, the outbox's commits) runs on worker threads that need the GIL to
    # finish; while the event loop is busy, CPython makes them wait up to the switch interval
    # (5 ms by default) at every step. Measured: an outbox commit took 8.3 ms instead of
    # 0.3 ms under push load. A shorter interval hands the GIL over sooner.
    sys.setswitchinterval(SWITCH_INTERVAL)
    events = config.extensions.events
    # A worker's siblings are staging files in tmp/ right now: the supervisor cleared the
    # leftovers of the last run before starting any of them.
    storage = await trio.to_thread.run_sync(
        functools.partial(open_storage, config, clean_tmp=worker is None)
    )

    metrics = Metrics(
        storage.layout.uploads,
        [s.name for s in events.sinks],
        multiprocess=None if worker is None else worker.metrics,
    )
    leadership = None if worker is None else Leadership(worker.leader_lock, worker.number)
    wake_sender = None if worker is None else WakeSender(worker.wake_socket)
    async with trio.open_nursery() as nursery:
        queue = None
        recorder: EventRecorder
        if events.enable:
            queue = open_queue(
                events,
                on_commit=metrics.observe_commit,
                announce=None if wake_sender is None else wake_sender.send,
            )
            await nursery.start(queue.run)
            metrics.watch_queue(queue)
            recorder = QueueRecorder(queue, [SinkFilter.for_sink(s) for s in events.sinks])
            instance_id = queue.instance_id
        else:
            recorder, instance_id = NullRecorder(), uuid.uuid4().hex

        registry = Registry(
            config=config,
            storage=storage,
            events=recorder,
            auth=Authenticator(config.http),
            metrics=metrics,
            locks=RepositoryLocks(storage.layout),
            queue=queue,
            deliverer=Deliverer.this_process if leadership is None else leadership.current,
            source=Source(f"{config.http.address}:{config.http.port}", instance_id),
            io_limiter=trio.CapacityLimiter(32),
        )
        app = create_app(registry, nursery)
        http_config = hypercorn_config(config)
        if worker is None:
            # Bound here rather than by Hypercorn, so that a failure is one clear line; the
            # descriptor is Hypercorn's from now on (it closes it).
            (listener,), _ = listening_sockets(config, 1)
            http_config.bind = [f"fd://{listener.detach()}"]
        else:
            http_config.bind = [f"fd://{worker.listen_fd}"]
        lead = _Lead(config, registry, metrics, leadership, worker, wake_sender)

        async def run_http(task_status: trio.TaskStatus[list[str]]) -> None:
            # Hypercorn's TypedDict scopes and events are plain dicts at run time; the app
            # takes them as such (it adds its own keys to the scope, which no TypedDict names).
            try:
                await hypercorn_serve(
                    cast(ASGIFramework, app),
                    http_config,
                    shutdown_trigger=shutdown.wait,
                    task_status=task_status,
                )
            finally:
                # Every request has ended, so none holds or waits for a repository lock.
                registry.locks.close()
            # HTTP is drained: no request of this process can append any more.
            lead.stop()

        binds = await nursery.start(run_http)
        url = binds[0]
        # With port 0 the real port is known only now; events name the address we serve on.
        registry.source = Source(url.split("://", 1)[1], instance_id)
        # Started only now, so that GC events name the address too.
        nursery.start_soon(lead.run)
        if worker is None:
            log.info("%s", summary(config, url))
        task_status.started(url)
        await shutdown.wait()
        lead.stop_waiting()
        if queue is not None:
            # The queue closes only after delivery (if this process delivers) has finished
            # acknowledging.
            nursery.start_soon(_close_after, lead, queue)
    if wake_sender is not None:
        wake_sender.close()


class _Lead:
    """The leader's duties in one process: delivery and periodic maintenance.

    A one-process server leads from the start. A worker first waits for the lead
    (:class:`~registry_trio.workers.leadership.Leadership`); a shutdown ends that wait.
    Once leading, maintenance stops at the shutdown and delivery once HTTP is drained.
    """

    def __init__(
        self,
        config: Config,
        registry: Registry,
        metrics: Metrics,
        leadership: Leadership | None,
        worker: WorkerPlace | None,
        wake_sender: WakeSender | None,
    ) -> None:
        self._config = config
        self._wake_sender = wake_sender
        self._registry = registry
        self._metrics = metrics
        self._leadership = leadership
        self._worker = worker
        self._waiting = trio.CancelScope()
        self._maintenance = trio.CancelScope()
        self._wakes = trio.CancelScope()
        self.delivery: DeliverySupervisor | None = None
        # Set when this process will never deliver (any more): the queue may close.
        self.done = trio.Event()

    async def run(self) -> None:
        try:
            with self._waiting:
                if self._leadership is not None:
                    await self._leadership.acquire()
            # Leading only if no shutdown came first: one that came while the lock was
            # being taken leaves it held, unused, until this process exits.
            if not self._waiting.cancel_called:
                await self._lead()
        finally:
            self.done.set()

    async def _lead(self) -> None:
        config, registry = self._config, self._registry
        events = config.extensions.events
        async with trio.open_nursery() as duties:
            if registry.queue is not None:
                if self._worker is not None:
                    log.info("worker %d leads: it delivers events now", self._worker.number)
                    if self._wake_sender is not None:
                        # Its own commits wake its consumers in-process.
                        self._wake_sender.muted = True
                    listener = WakeListener(self._worker.wake_socket, registry.queue.wake)
                    duties.start_soon(_cancelled_by, self._wakes, listener.run)
                # Known before it starts, so that a stop() from now on reaches it.
                self.delivery = registry.delivery = DeliverySupervisor(
                    events, registry.queue, on_delivered=self._metrics.observe_delivered
                )
                await duties.start(self.delivery.run)
            duties.start_soon(_cancelled_by, self._maintenance, self._maintain)

    async def _maintain(self) -> None:
        config, registry = self._config, self._registry
        purging = config.storage.upload_purging
        async with trio.open_nursery() as tasks:
            if registry.queue is not None:
                tasks.start_soon(registry.queue.keep_history)
            if config.storage.gc:
                tasks.start_soon(
                    functools.partial(
                        gc_periodically,
                        registry.storage,
                        registry.events,
                        registry.source,
                        interval=config.storage.gc_interval,
                        delay=config.storage.gc_delay,
                    )
                )
            if purging.enable:
                tasks.start_soon(
                    functools.partial(
                        purge_periodically,
                        registry.storage,
                        interval=purging.interval,
                        age=purging.age,
                    )
                )

    def stop_waiting(self) -> None:
        """At shutdown: give up waiting for the lead, and stop maintenance."""
        self._waiting.cancel()
        self._maintenance.cancel()

    def stop(self) -> None:
        """Once HTTP is drained: stop delivering (sends under way get their deadline)."""
        self.stop_waiting()
        self._wakes.cancel()
        if self.delivery is not None:
            self.delivery.stop()


async def _cancelled_by(scope: trio.CancelScope, run: Callable[[], Awaitable[object]]) -> None:
    with scope:
        await run()


async def _close_after(lead: _Lead, queue: EventQueue) -> None:
    await lead.done.wait()
    if lead.delivery is not None:
        await lead.delivery.stopped.wait()
    queue.close()
