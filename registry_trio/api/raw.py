"""Raw ASGI routes: the request object and the route table the dispatcher matches first.

Why not Quart for these: Quart drains a request body into an unbounded buffer (no
backpressure: a slow disk lets a 1 GiB upload sit in memory), cuts any response at
``RESPONSE_TIMEOUT`` (a long blob download would be truncated), and costs a request context,
a body task and a response object per request: on the push path (blobs, uploads, manifests)
that overhead is a measurable part of the CPU per image. Handlers here read ``receive()``
themselves and send their response in two messages.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable, Iterable, MutableMapping
from dataclasses import dataclass, field
from typing import Any, cast
from urllib.parse import parse_qs

from .context import Registry
from .errors import RegistryError

__all__ = ["ClientDisconnected", "Handler", "RawRequest", "RawRoute", "Routes", "match_route"]


class ClientDisconnected(Exception):
    pass


@dataclass
class RawRequest:
    registry: Registry
    scope: MutableMapping[str, Any]
    receive: Callable[[], Awaitable[dict[str, Any]]]
    send: Callable[[dict[str, Any]], Awaitable[None]]
    name: str
    params: dict[str, str]
    # Set once the last message of the request body has been received.
    ended: bool = field(default=False, init=False)

    @property
    def method(self) -> str:
        return cast(str, self.scope["method"])  # ASGI: the method is a str

    def header(self, name: str) -> str | None:
        wanted = name.lower().encode()
        headers: Iterable[tuple[bytes, bytes]] = self.scope["headers"]  # ASGI: byte pairs
        for key, value in headers:
            if key.lower() == wanted:
                return value.decode("latin-1")
        return None

    def query(self, name: str) -> str | None:
        values = parse_qs(self.scope.get("query_string", b"").decode("latin-1")).get(name)
        return values[0] if values else None

    async def read_some(self, limit: int) -> tuple[bytes, bool]:
        """Body bytes until ``limit`` are buffered or the body ends: ``(data, ended)``.

        A body that fits (every small blob) is thus held whole before any disk work, and the
        handler can do that work in one trip to a worker thread.
        """
        chunks: list[bytes] = []
        size = 0
        while not self.ended and size < limit:
            message = await self.receive()
            if message["type"] == "http.disconnect":
                raise ClientDisconnected
            if chunk := message.get("body", b""):
                chunks.append(chunk)
                size += len(chunk)
            self.ended = not message.get("more_body", False)
        return (chunks[0] if len(chunks) == 1 else b"".join(chunks)), self.ended

    async def respond(
        self, status: int, headers: list[tuple[str, str]] | None = None, body: bytes = b""
    ) -> None:
        headers = list(headers or [])
        if not any(k.lower() == "content-length" for k, _ in headers):
            headers.append(("Content-Length", str(len(body))))
        await self.send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [(k.encode(), v.encode()) for k, v in headers],
            }
        )
        await self.send({"type": "http.response.body", "body": body})


Handler = Callable[[RawRequest], Awaitable[None]]


class RawRoute:
    """One raw route: a path template, the handler per method.

    The template is the route's whole description: its pattern (``{name}`` is a repository
    name, which may hold slashes; any other ``{param}`` is one path segment; a trailing slash
    is optional, as clients differ) and its label in the metrics. Every raw route serves a
    repository, authorised for its ``name`` parameter.
    """

    def __init__(self, template: str, handlers: dict[str, Handler]) -> None:
        self.template = template
        self.handlers = handlers
        pattern = re.escape(template).replace(r"\{name\}", "(?P<name>.+)")
        pattern = re.sub(r"\\\{(\w+)\\\}", r"(?P<\1>[^/]+)", pattern)
        self.pattern = re.compile(f"^{pattern}?$" if pattern.endswith("/") else f"^{pattern}$")


Routes = list[RawRoute]


def match_route(routes: Routes, path: str, method: str) -> tuple[RawRoute, dict[str, str]] | None:
    """The raw route for ``path`` and its parameters, or None to let Quart serve the request.

    A known path with a method it does not take answers 405 rather than falling through.
    """
    for route in routes:
        match = route.pattern.match(path)
        if match is None:
            continue
        if method not in route.handlers:
            methods = ", ".join(route.handlers)
            raise RegistryError(
                "UNSUPPORTED",
                405,
                f"this endpoint takes {methods}",
                headers=(("Allow", methods),),
            )
        return route, match.groupdict()
    return None
