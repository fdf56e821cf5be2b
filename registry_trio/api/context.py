"""What every handler needs: the registry's shared state and the facts of one request."""

from __future__ import annotations

import functools
from collections.abc import Callable, MutableMapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

import trio

from ..config import Config
from ..events import Action, Actor, Event, EventRecorder, RequestInfo, Source, Target
from ..storage import FilesystemStorage

__all__ = ["REQUEST_ID_KEY", "Registry", "request_id", "request_info"]

T = TypeVar("T")

# Keys under which the dispatcher stores per-request facts in the ASGI scope.
REQUEST_ID_KEY = "registry_trio.request_id"
ACTOR_KEY = "registry_trio.actor"


def request_id(scope: MutableMapping[str, Any]) -> str:
    return scope[REQUEST_ID_KEY]


def _header(scope: MutableMapping[str, Any], name: bytes) -> str:
    for key, value in scope.get("headers", ()):
        if key.lower() == name:
            return value.decode("latin-1")
    return ""


def request_info(scope: MutableMapping[str, Any]) -> RequestInfo:
    """The request as events report it. ``addr`` is the TCP peer, never a client header."""
    client = scope.get("client")
    return RequestInfo(
        id=request_id(scope),
        addr=f"{client[0]}:{client[1]}" if client else "",
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
    source: Source
    # Bounds the threads doing disk I/O so a burst of requests cannot spawn hundreds.
    io_limiter: trio.CapacityLimiter
    # Upload ids with a request writing to them: one writer per session at a time.
    busy_uploads: set[str] = field(default_factory=set)

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
        actor: Actor | None = scope.get(ACTOR_KEY)
        await self.events.record(
            [Event(action, target, self.source, actor, request) for action, target in wanted]
        )

    def url(self, scope: MutableMapping[str, Any], path: str) -> str:
        """An absolute URL for ``path`` as the client addressed this registry."""
        host = _header(scope, b"host") or self.source.addr
        return f"{scope.get('scheme', 'http')}://{host}{path}"
