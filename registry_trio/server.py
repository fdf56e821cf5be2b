"""Running the registry: build the shared state, serve HTTP, stop cleanly.

Task tree (every task has an owner, and shutdown runs in reverse order of start)::

    serve
    ├── outbox writer          (events on: commits events before requests get their 2xx)
    ├── delivery supervisor    (events on: one task per sink)
    ├── garbage collector      (storage.gc on: every gcInterval)
    └── hypercorn              (HTTP)

On ``shutdown`` Hypercorn stops accepting and lets in-flight requests finish for
``http.gracefulTimeout``; then delivery stops taking work and gives sends under way
``extensions.events.shutdownTimeout``; then the writer commits what is queued and exits.
What was not delivered stays in the outbox for the next start.
"""

from __future__ import annotations

import logging
import sys
import uuid

import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.trio import serve as hypercorn_serve

from .api import Registry, create_app
from .auth import Authenticator
from .config import Config
from .events import NullRecorder, Source
from .events.delivery import Delivery
from .events.filters import SinkFilter
from .events.queue import EventQueue, open_queue
from .events.recorder import QueueRecorder
from .maintenance import gc_periodically
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
    """Serve until ``shutdown`` is set; ``task_status.started`` gets the bound base URL."""
    shutdown = shutdown if shutdown is not None else trio.Event()
    # Disk work (storage, the outbox's commits) runs on worker threads that need the GIL to
    # finish; while the event loop is busy, CPython makes them wait up to the switch interval
    # (5 ms by default) at every step. Measured: an outbox commit took 8.3 ms instead of
    # 0.3 ms under push load. A shorter interval hands the GIL over sooner.
    sys.setswitchinterval(SWITCH_INTERVAL)
    events = config.extensions.events
    storage = await trio.to_thread.run_sync(FilesystemStorage, config.storage.root_directory)

    metrics = Metrics(storage.root / "uploads", [str(s.name) for s in events.sinks])
    async with trio.open_nursery() as nursery:
        queue = delivery = None
        if events.enable:
            queue = open_queue(events, on_commit=metrics.observe_commit)
            await nursery.start(queue.run)
            metrics.watch_queue(queue)
            delivery = Delivery(events, queue, on_delivered=metrics.observe_delivered)
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
            queue=queue,
            delivery=delivery,
            source=Source(f"{config.http.address}:{config.http.port}", instance_id),
            io_limiter=trio.CapacityLimiter(32),
        )
        app = create_app(registry, nursery)
        hypercorn_config = _hypercorn_config(config)

        async def run_http(task_status: trio.TaskStatus[list[str]]) -> None:
            await hypercorn_serve(
                app, hypercorn_config, shutdown_trigger=shutdown.wait, task_status=task_status
            )
            # HTTP is drained: no request can append any more. Stop delivery, then the writer.
            if delivery is not None:
                delivery.stop()

        gc_scope = trio.CancelScope()
        if config.storage.gc:

            async def collect_garbage() -> None:
                with gc_scope:
                    await gc_periodically(
                        storage,
                        recorder,
                        registry.source,
                        interval=config.storage.gc_interval,
                        delay=config.storage.gc_delay,
                    )

            nursery.start_soon(collect_garbage)

        binds = await nursery.start(run_http)
        url = binds[0]
        # With port 0 the real port is known only now; events name the address we serve on.
        registry.source = Source(url.split("://", 1)[1], instance_id)
        log.info("listening on %s", url)
        task_status.started(url)
        await shutdown.wait()
        gc_scope.cancel()
        if queue is not None:
            # The queue closes only after delivery has finished acknowledging.
            nursery.start_soon(_close_after, delivery, queue)


async def _close_after(delivery: Delivery | None, queue: EventQueue) -> None:
    if delivery is not None:
        await delivery.stopped.wait()
    queue.close()
