"""A TCP proxy that a test can cut and restore: a network partition between two processes.

Why: killing a server (``NATSServer.kill``) takes it away from *every* client at once. A
partition is different: one client loses the server while the server, and every other
client, go on as before. Pointing that one client at this proxy instead of the server lets
a test cut exactly its connections, and later let it reconnect on the same address.

Usage::

    async with tcp_proxy(server.port) as proxy:   # listens on 127.0.0.1, a random port
        ... proxy.port, proxy.url ...              # give the client this address
        await proxy.cut()       # every proxied connection closed, new ones refused
        await proxy.restore()   # listening again, on the same port

Each accepted connection is forwarded to ``127.0.0.1:<target port>`` in both directions,
byte for byte; when either side closes, both are closed. With ``delay``, what the client sends
is held back that long on its way (a slow link to the server, one direction).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import trio

__all__ = ["TCPProxy", "tcp_proxy"]

HOST = "127.0.0.1"


class TCPProxy:
    """Forwards connections from a port of its own to ``target_port``; see the module doc.

    Its tasks run in ``nursery``; a listening period (from :meth:`start` or
    :meth:`restore` to :meth:`cut`) is one task whose nursery holds the accept loop and
    every connection accepted meanwhile, so cutting it ends all of them together.
    """

    def __init__(self, target_port: int, nursery: trio.Nursery, delay: float = 0.0) -> None:
        self.target_port = target_port
        self.delay = delay
        self.port = 0  # random at the first start, then kept
        self._nursery = nursery
        self._period: trio.CancelScope | None = None
        self._period_over = trio.Event()

    @property
    def url(self) -> str:
        return f"nats://{HOST}:{self.port}"

    @property
    def listening(self) -> bool:
        return self._period is not None

    async def start(self) -> None:
        """Listen (on the port of the previous period, if there was one)."""
        assert not self.listening, "the proxy is already listening"
        self._period = await self._nursery.start(self._serve)

    async def restore(self) -> None:
        """Listen again on the same port, after :meth:`cut`."""
        await self.start()

    async def cut(self) -> None:
        """Stop accepting (connections are refused) and close every proxied connection,
        both sides; return once all of that is done."""
        if self._period is None:
            return
        self._period.cancel()
        await self._period_over.wait()
        self._period = None

    async def _serve(self, task_status: trio.TaskStatus[trio.CancelScope]) -> None:
        over = self._period_over = trio.Event()
        try:
            # SO_REUSEADDR (set by trio): the port is free again although the connections
            # of the previous period may still be in TIME_WAIT.
            listeners = await trio.open_tcp_listeners(self.port, host=HOST)
            self.port = listeners[0].socket.getsockname()[1]
            async with trio.open_nursery() as nursery:
                task_status.started(nursery.cancel_scope)
                await trio.serve_listeners(self._forward, listeners, handler_nursery=nursery)
        finally:
            over.set()

    async def _forward(self, client: trio.SocketStream) -> None:
        try:
            upstream = await trio.open_tcp_stream(HOST, self.target_port)
        except OSError:
            return  # the target is down: the client sees its connection closed
        async with upstream, trio.open_nursery() as nursery:
            nursery.start_soon(_pump, client, upstream, nursery.cancel_scope, self.delay)
            nursery.start_soon(_pump, upstream, client, nursery.cancel_scope)


async def _pump(
    source: trio.SocketStream, sink: trio.SocketStream, both: trio.CancelScope, delay: float = 0.0
) -> None:
    """Copy ``source`` to ``sink``, each chunk ``delay`` seconds late, until either ends; then
    end the other direction too."""
    try:
        async for chunk in source:
            if delay:
                await trio.sleep(delay)  # ok-sleep: the slow link's latency, not a wait
            await sink.send_all(chunk)
    except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
        pass  # a reset or a close: the connection is over either way
    finally:
        both.cancel()


@asynccontextmanager
async def tcp_proxy(target_port: int, delay: float = 0.0) -> AsyncIterator[TCPProxy]:
    """A listening :class:`TCPProxy` to ``127.0.0.1:<target_port>``; cut at exit."""
    async with trio.open_nursery() as nursery:
        proxy = TCPProxy(target_port, nursery, delay)
        await proxy.start()
        try:
            yield proxy
        finally:
            with trio.CancelScope(shield=True):
                await proxy.cut()
            nursery.cancel_scope.cancel()
