"""Running the registry: build the shared state, serve HTTP, stop cleanly.

Task tree (every task has an owner, and shutdown runs in reverse order of start)::

    serve
    ├── outbox writer          (events on: commits events before requests get their 2xx)
    ├── delivery supervisor    (events on: one task per sink)
    ├── maintenance
    │   ├── garbage collector  (storage.gc on: every gcInterval)
    │   └── upload purger      (storage.uploadPurging on: every interval)
    └── hypercorn              (HTTP)

On ``shutdown`` Hypercorn stops accepting and lets in-flight requests finish for
``http.gracefulTimeout``; then delivery stops taking work and gives sends under way
``extensions.events.shutdownTimeout``; then the writer commits what is queued and exits.
What was not delivered stays in the outbox for the next start.

With events on, the whole run holds the queue directory's serving lock
(:mod:`~registry_trio.events.queue.instance_lock`): a second server on it refuses to start.
"""

from __future__ import annotations

import functools
import logging
import sys
import uuid
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
from .events.recorder import QueueRecorder
from .maintenance import gc_periodically, purge_periodically
from .metrics import Metrics
from .storage import FilesystemStorage

__all__ = ["serve"]

log = logging.getLogger("registry_trio")

SWITCH_INTERVAL = 0.0005
# An idle keep-alive connection is closed after this long (Hypercorn's default).
KEEP_ALIVE_TIMEOUT = 5.0


def _hypercorn_config(config: Config) -> HypercornConfig:
    hc = HypercornConfig()
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
    return hc


async def serve(
    config: Config,
    *,
    shutdown: trio.Event | None = None,
    task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve until ``shutdown`` is set; ``task_status.started`` gets the bound base URL.

    Raises :class:`~registry_trio.events.queue.instance_lock.InstanceLocked` when another
    process serves the same event queue directory.
    """
    lock = None
    if config.extensions.events.enable:
        lock = InstanceLock(config.extensions.events.queue.directory)
        await trio.to_thread.run_sync(lock.acquire)
    try:
        await _serve(config, shutdown if shutdown is not None else trio.Event(), task_status)
    finally:
        if lock is not None:
            lock.release()


async def _serve(config: Config, shutdown: trio.Event, task_status: trio.TaskStatus[str]) -> None:
    # Disk work (storage, the outbox's commits) runs on worker threads that need the GIL to
    # finish; while the event loop is busy, CPython makes them wait up to the switch interval
    # (5 ms by default) at every step. Measured: an outbox commit took 8.3 ms instead of
    # 0.3 ms under push load. A shorter interval hands the GIL over sooner.
    sys.setswitchinterval(SWITCH_INTERVAL)
    events = config.extensions.events
    storage = await trio.to_thread.run_sync(FilesystemStorage, config.storage.root_directory)

    metrics = Metrics(storage.layout.uploads, [s.name for s in events.sinks])
    async with trio.open_nursery() as nursery:
        queue = delivery = None
        recorder: EventRecorder
        if events.enable:
            queue = open_queue(events, on_commit=metrics.observe_commit)
            await nursery.start(queue.run)
            metrics.watch_queue(queue)
            delivery = DeliverySupervisor(events, queue, on_delivered=metrics.observe_delivered)
            await nursery.start(delivery.run)
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
            delivery=delivery,
            source=Source(f"{config.http.address}:{config.http.port}", instance_id),
            io_limiter=trio.CapacityLimiter(32),
        )
        app = create_app(registry, nursery)
        hypercorn_config = _hypercorn_config(config)

        async def run_http(task_status: trio.TaskStatus[list[str]]) -> None:
            # Hypercorn's TypedDict scopes and events are plain dicts at run time; the app
            # takes them as such (it adds its own keys to the scope, which no TypedDict names).
            try:
                await hypercorn_serve(
                    cast(ASGIFramework, app),
                    hypercorn_config,
                    shutdown_trigger=shutdown.wait,
                    task_status=task_status,
                )
            finally:
                # Every request has ended, so none holds or waits for a repository lock.
                registry.locks.close()
            # HTTP is drained: no request can append any more. Stop delivery, then the writer.
            if delivery is not None:
                delivery.stop()

        maintenance_scope = trio.CancelScope()

        async def maintain() -> None:
            purging = config.storage.upload_purging
            with maintenance_scope:
                async with trio.open_nursery() as tasks:
                    if config.storage.gc:
                        tasks.start_soon(
                            functools.partial(
                                gc_periodically,
                                storage,
                                recorder,
                                registry.source,
                                interval=config.storage.gc_interval,
                                delay=config.storage.gc_delay,
                            )
                        )
                    if purging.enable:
                        tasks.start_soon(
                            functools.partial(
                                purge_periodically,
                                storage,
                                interval=purging.interval,
                                age=purging.age,
                            )
                        )

        binds = await nursery.start(run_http)
        url = binds[0]
        # With port 0 the real port is known only now; events name the address we serve on.
        registry.source = Source(url.split("://", 1)[1], instance_id)
        # Started only now, so that GC events name the address too.
        nursery.start_soon(maintain)
        log.info("listening on %s", url)
        task_status.started(url)
        await shutdown.wait()
        maintenance_scope.cancel()
        if queue is not None:
            # The queue closes only after delivery has finished acknowledging.
            nursery.start_soon(_close_after, delivery, queue)


async def _close_after(delivery: DeliverySupervisor | None, queue: EventQueue) -> None:
    if delivery is not None:
        await delivery.stopped.wait()
    queue.close()
