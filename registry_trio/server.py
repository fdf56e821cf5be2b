"""Running the registry: build the shared state, serve HTTP, stop cleanly.

Everything the process runs lives in the nursery opened by :func:`serve`; the caller owns it
through ``shutdown`` (an event) or by cancelling. On shutdown Hypercorn stops accepting,
lets in-flight requests finish for ``http.gracefulTimeout``, then ``serve`` returns.
"""

from __future__ import annotations

import logging
import uuid

import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.trio import serve as hypercorn_serve

from .api import Registry, create_app
from .config import Config
from .events import NullRecorder, Source
from .storage import FilesystemStorage

__all__ = ["serve"]

log = logging.getLogger("registry_trio")


def _hypercorn_config(config: Config) -> HypercornConfig:
    hc = HypercornConfig()
    hc.bind = [f"{config.http.address}:{config.http.port}"]
    hc.accesslog = None  # the dispatcher writes one access line per request itself
    hc.errorlog = logging.getLogger("hypercorn.error")
    hc.graceful_timeout = config.http.graceful_timeout
    hc.include_server_header = False
    return hc


async def serve(
    config: Config,
    *,
    shutdown: trio.Event | None = None,
    task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve until ``shutdown`` is set; ``task_status.started`` gets the bound base URL."""
    shutdown = shutdown if shutdown is not None else trio.Event()
    storage = await trio.to_thread.run_sync(FilesystemStorage, config.storage.root_directory)
    registry = Registry(
        config=config,
        storage=storage,
        events=NullRecorder(),
        source=Source(
            addr=f"{config.http.address}:{config.http.port}", instance_id=uuid.uuid4().hex
        ),
        io_limiter=trio.CapacityLimiter(32),
    )
    app = create_app(registry)
    hypercorn_config = _hypercorn_config(config)

    async def run_http(task_status: trio.TaskStatus[list[str]]) -> None:
        await hypercorn_serve(
            app, hypercorn_config, shutdown_trigger=shutdown.wait, task_status=task_status
        )

    async with trio.open_nursery() as nursery:
        binds = await nursery.start(run_http)
        url = binds[0]
        # With port 0 the real port is known only now; events name the address we serve on.
        registry.source = Source(
            addr=url.split("://", 1)[1], instance_id=registry.source.instance_id
        )
        log.info("listening on %s", url)
        task_status.started(url)
