"""What every handler needs: the registry's shared state and the facts of one request."""

from __future__ import annotations

import contextlib
import functools
from collections.abc import AsyncIterator, Callable, Mapping, MutableMapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar, cast

import trio
from quart import current_app

from ..auth import ANONYMOUS, Authenticator, Identity
from ..auth.client_address import sane_host
from ..config import Config
from ..events import Action, Actor, Event, EventRecorder, RequestInfo, Source, Target
from ..events.delivery import DeliverySupervisor
from ..events.queue import APPENDED, EventQueue, PendingAppend
from ..events.status import Deliverer
from ..metrics import Metrics
from ..storage import FilesystemStorage, StorageFull
from ..storage.errors import DISK_FULL_ERRNOS
from .locks import RepositoryLocks

__all__ = [
    "REQUEST_ID_KEY",
    "Registry",
    "current_registry",
    "header",
    "identity",
    "request_id",
    "request_info",
]

T = TypeVar("T")

# Keys under which the dispatcher stores per-request facts in the ASGI scope.
REQUEST_ID_KEY = "registry_trio.request_id"
IDENTITY_KEY = "registry_trio.identity"
CLIENT_ADDR_KEY = "registry_trio.client_addr"
# The name the connection's verified client certificate gives (mutual TLS), or None.
CERTIFICATE_NAME_KEY = "registry_trio.certificate_name"
# Where the Quart app keeps the Registry (see current_registry).
REGISTRY_EXTENSION = "registry_trio"
# The template of the route that served the request: its metrics label.
ROUTE_KEY = "registry_trio.route"


def current_registry() -> Registry:
    """The registry, inside a Quart view."""
    return cast(Registry, current_app.extensions[REGISTRY_EXTENSION])


def request_id(scope: MutableMapping[str, Any]) -> str:
    return cast(str, scope[REQUEST_ID_KEY])  # the dispatcher's uuid hex


def identity(scope: Mapping[str, Any]) -> Identity:
    return cast(Identity, scope.get(IDENTITY_KEY, ANONYMOUS))  # stored by access.authorize


def header(scope: MutableMapping[str, Any], name: bytes) -> str:
    """The request header ``name`` (lower-case), or ``""`` when the request has none.

    Repeated lines are joined with commas, which HTTP defines as the same field (RFC 9110
    5.3): a proxy that adds its own ``X-Forwarded-For`` line after the client's is read whole.
    """
    values = [v.decode("latin-1") for k, v in scope.get("headers", ()) if k.lower() == name]
    return ", ".join(values)


def request_info(scope: MutableMapping[str, Any]) -> RequestInfo:
    """The request as events report it.

    ``addr`` was resolved by the dispatcher: the TCP peer, or the forwarded address only when
    the peer is a trusted proxy.
    """
    return RequestInfo(
        id=request_id(scope),
        addr=scope.get(CLIENT_ADDR_KEY, ""),
        host=header(scope, b"host"),
        method=scope["method"],
        useragent=header(scope, b"user-agent"),
    )


@dataclass
class Registry:
    """Application-wide state, built once at start-up and shared by both API halves."""

    config: Config
    storage: FilesystemStorage
    events: EventRecorder
    auth: Authenticator
    source: Source
    # Bounds the threads doing disk I/O so a burst of requests cannot spawn hundreds.
    io_limiter: trio.CapacityLimiter
    metrics: Metrics
    # Held across a manifest or tag change and the commit of its events.
    locks: RepositoryLocks
    # The event pipeline, when the events extension is on (the admin API reads them).
    queue: EventQueue | None = None
    # Set in the process that delivers (in a worker: once it leads).
    delivery: DeliverySupervisor | None = None
    # Which process delivers: this one, or (in a worker) the leader as it wrote itself down.
    deliverer: Callable[[], Deliverer | None] = Deliverer.this_process
    # Request body bytes read into memory and not yet written out, across requests (raw.py).
    body_bytes_held: int = 0

    async def io(self, fn: Callable[..., T], *args: Any) -> T:
        """Run a blocking storage call on a worker thread.

        Not abandoned on cancellation: a storage call that has started finishes, so a
        client hanging up never leaves a half-done rename sequence behind. A write that fails
        for want of room raises :class:`StorageFull`.
        """
        call = functools.partial(_on_storage, self.storage.root, fn, *args)
        return await trio.to_thread.run_sync(call, limiter=self.io_limiter)

    def io_inline(self, fn: Callable[..., T], *args: Any) -> T:
        """Run a storage call that only looks names up (``stat``), on the loop.

        For those a worker thread costs more than the call: a ``to_thread`` round trip is
        ~40 us of CPU and two context switches, a blob HEAD's two stats ~25 us (measured on
        one core with another thread fsyncing beside it; wall p99 85 us, max 0.5 ms); path
        lookups take no directory lock. Inlining the two HEADs of a push saved ~0.8 ms of
        server CPU per image in ``compare.py --pin``. Creating a file is not for here: on a
        filesystem that scans for a free inode it held the loop ~0.4 ms per call under
        push load, for no CPU saved. A full disk raises :class:`StorageFull`, as in :meth:`io`.
        """
        return _on_storage(self.storage.root, fn, *args)

    async def emit(self, scope: MutableMapping[str, Any], *changes: tuple[Action, Target]) -> None:
        """Record this request's events in one commit; returns once they are durable."""
        await self._begin_emit(scope, changes).wait()

    def _begin_emit(
        self, scope: MutableMapping[str, Any], changes: Sequence[tuple[Action, Target]]
    ) -> PendingAppend:
        wanted = [(a, t) for a, t in changes if not a.is_pull or self.events.wants(a)]
        if not wanted:
            return APPENDED
        request = request_info(scope)
        who = identity(scope)
        actor = None if who.anonymous else Actor(who.name, who.method)
        return self.events.begin_record(
            [Event(action, target, self.source, actor, request) for action, target in wanted]
        )

    @contextlib.asynccontextmanager
    async def repository_change(
        self, scope: MutableMapping[str, Any], name: str
    ) -> AsyncIterator[list[tuple[Action, Target]]]:
        """Change repository ``name``: the block checks and changes the storage, and lists
        the change's events in the list it is given; returns once they are durable.

        The block runs holding the repository's lock, which every process on the storage
        root sees (:class:`RepositoryLocks`), and it is released only once the events are
        durable: each process appends through its own queue connection, and nothing orders
        their appends but this lock. So the event stream has a repository's changes in the
        order its storage had them, and replaying it gives what the registry serves.

        The wait for durability is shielded: a request cancelled then (a shutdown past its
        grace period) still holds the lock until its events are committed or have failed,
        so the next change cannot be queued ahead of them. The wait is bounded by the
        queue's own timeouts.
        """
        changes: list[tuple[Action, Target]] = []
        async with self.locks.hold(name):
            yield changes
            pending = self._begin_emit(scope, changes)
            with trio.CancelScope(shield=True):
                await pending.wait()

    def url(self, scope: MutableMapping[str, Any], path: str) -> str:
        """An absolute URL for ``path`` as the client addressed this registry.

        ``Host`` (or, from a trusted proxy, the forwarded host and scheme) is client-chosen:
        one that is not a plain host[:port] gives way to the address the registry listens on,
        so no header can make a ``Location`` point at a path or user of another site.
        """
        scheme, host = self.auth.proxies.forwarded_origin(
            scope.get("client"),
            header(scope, b"forwarded") or None,
            header(scope, b"x-forwarded-host") or None,
            header(scope, b"x-forwarded-proto") or None,
        )
        if scheme is None or scheme.lower() not in ("http", "https"):
            scheme = scope.get("scheme", "http")
        if host is None or not sane_host(host):
            host = header(scope, b"host")
        if not sane_host(host):
            host = self.source.addr
        return f"{scheme.lower()}://{host}{path}"


def _on_storage(root: Path, fn: Callable[..., T], *args: Any) -> T:
    """``fn(*args)``, on a worker thread, where a full disk can be measured without blocking."""
    try:
        return fn(*args)
    except OSError as exc:
        if exc.errno in DISK_FULL_ERRNOS:
            raise StorageFull(root, exc) from exc
        raise
