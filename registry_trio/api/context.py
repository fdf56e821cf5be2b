"""What every handler needs: the registry's shared state and the facts of one request."""

from __future__ import annotations

import functools
from collections.abc import Callable, MutableMapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

import trio

from ..auth import ANONYMOUS, Authenticator, Identity
from ..config import Config
from ..events import Action, Actor, Event, EventRecorder, RequestInfo, Source, Target
from ..events.delivery import Delivery
from ..events.queue import EventQueue
from ..metrics import Metrics
from ..storage import FilesystemStorage

__all__ = ["REQUEST_ID_KEY", "Registry", "identity", "request_id", "request_info"]

T = TypeVar("T")

# Keys under which the dispatcher stores per-request facts in the ASGI scope.
REQUEST_ID_KEY = "registry_trio.request_id"
IDENTITY_KEY = "registry_trio.identity"
CLIENT_ADDR_KEY = "registry_trio.client_addr"


def request_id(scope: MutableMapping[str, Any]) -> str:
    return scope[REQUEST_ID_KEY]


def identity(scope: MutableMapping[str, Any]) -> Identity:
    return scope.get(IDENTITY_KEY, ANONYMOUS)


def _header(scope: MutableMapping[str, Any], name: bytes) -> str:
    for key, value in scope.get("headers", ()):
        if key.lower() == name:
            return value.decode("latin-1")
    return ""


def request_info(scope: MutableMapping[str, Any]) -> RequestInfo:
    """The request as events report it.

    ``addr`` was resolved by the dispatcher: the TCP peer, or the forwarded address only when
    the peer is a trusted proxy.
    """
    return RequestInfo(
        id=request_id(scope),
        addr=scope.get(CLIENT_ADDR_KEY, ""),
        host=_header(scope, b"host"),
        method=scope["method"],
        useragent=_header(scope, b"user-agent"),
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
    # The event pipeline, when the events extension is on (the admin API reads them).
    queue: EventQueue | None = None
    delivery: Delivery | None = None
    # Upload ids with a request writing to them: one writer per session at a time.
    busy_uploads: set[str] = field(default_factory=set)
    # Request body bytes read into memory and not yet written out, across requests (raw.py).
    body_bytes_held: int = 0

    async def io(self, fn: Callable[..., T], *args: Any) -> T:
        """Run a blocking storage call on a worker thread.

        Not abandoned on cancellation: a storage call that has started finishes, so a
        client hanging up never leaves a half-done rename sequence behind.
        """
        return await trio.to_thread.run_sync(functools.partial(fn, *args), limiter=self.io_limiter)

    async def emit(self, scope: MutableMapping[str, Any], *changes: tuple[Action, Target]) -> None:
        """Record this request's events in one commit; returns once they are durable."""
        wanted = [(a, t) for a, t in changes if not a.is_pull or self.events.wants(a)]
        if not wanted:
            return
        request = request_info(scope)
        who = identity(scope)
        actor = None if who.anonymous else Actor(who.name, who.method)
        await self.events.record(
            [Event(action, target, self.source, actor, request) for action, target in wanted]
        )

    def url(self, scope: MutableMapping[str, Any], path: str) -> str:
        """An absolute URL for ``path`` as the client addressed this registry."""
        host = _header(scope, b"host") or self.source.addr
        return f"{scope.get('scheme', 'http')}://{host}{path}"
