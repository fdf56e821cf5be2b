"""Raw ASGI routes: the request object and the route table the dispatcher matches first.

Why not Quart for these: Quart drains a request body into an unbounded buffer (no
backpressure: a slow disk lets a 1 GiB upload sit in memory), cuts any response at
``RESPONSE_TIMEOUT`` (a long blob download would be truncated), and costs a request context,
a body task and a response object per request: on the push path (blobs, uploads, manifests)
that overhead is a measurable part of the CPU per image. Handlers here read ``receive()``
themselves and send their response in two messages.
"""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass, field
from typing import Any, cast
from urllib.parse import parse_qs

import trio

from .context import Registry, header

__all__ = ["ClientDisconnected", "Handler", "RawRequest"]

# How long a batch of request body bytes gathers before it is written out: a body that streams
# in fills one in a few milliseconds, while a client that stalls leaves nothing held.
PAUSE = 0.05
# Body bytes held in memory across all requests (read, not yet written) past which a request
# writes its body out message by message: many clients sending at once, or stalling after
# a burst, cannot make the server hold a batch each.
HELD_LIMIT = 16 << 20


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
    # Body bytes read but not yet written (see read_whole).
    _unread: bytes = field(default=b"", init=False, repr=False)

    @property
    def method(self) -> str:
        return cast(str, self.scope["method"])  # ASGI: the method is a str

    def header(self, name: str) -> str | None:
        return header(self.scope, name.lower().encode()) or None

    def query(self, name: str) -> str | None:
        values = parse_qs(self.scope.get("query_string", b"").decode("latin-1")).get(name)
        return values[0] if values else None

    async def read_whole(self, limit: int) -> bytes | None:
        """The whole body, when it ends within about ``limit`` bytes and comes without pause.

        A body that fits (every small blob) is thus held whole before any disk work, and the
        handler can do that work in one trip to a worker thread. Otherwise None: what came is
        kept for :meth:`write_rest`, which writes it first.
        """
        data = await self._read(limit)
        self.registry.body_bytes_held -= len(data)
        if self.ended:
            return data
        self._unread = data
        return None

    async def write_rest(
        self, write: Callable[[bytes], object], batch: int, limit: float = math.inf
    ) -> int:
        """Write the rest of the body with ``write`` on a worker thread, about ``batch`` bytes
        at a time, until it ends or more than ``limit`` bytes are written: the bytes written.

        A body that pauses is written as far as it came: a client that stops sending holds
        no memory while the server waits for the rest.
        """
        written = 0
        while not self.ended and written <= limit:
            written += await self._write_batch(write, batch)
        return written

    async def _write_batch(self, write: Callable[[bytes], object], batch: int) -> int:
        # The batch lives in this frame only: nothing of it is held once it is written, and
        # it counts in ``registry.body_bytes_held`` until then.
        registry = self.registry
        if self._unread:
            data, self._unread = self._unread, b""
            registry.body_bytes_held += len(data)
        else:
            data = await self._read(batch)
        try:
            await registry.io(write, data)
        finally:
            registry.body_bytes_held -= len(data)
        return len(data)

    async def _read(self, limit: int) -> bytes:
        """Body bytes until about ``limit``, the end of the body, or a pause; they count in
        ``registry.body_bytes_held`` until the caller has done with them."""
        registry = self.registry
        chunks: list[bytes] = []
        size = 0

        async def take() -> None:
            nonlocal size
            message = await self.receive()
            if message["type"] == "http.disconnect":
                raise ClientDisconnected
            if chunk := message.get("body", b""):
                chunks.append(chunk)
                size += len(chunk)
                registry.body_bytes_held += len(chunk)
            self.ended = not message.get("more_body", False)

        try:
            await take()  # the first bytes: waited for as long as the dispatcher allows
            # The rest of a batch: what comes within PAUSE, unless bodies crowd memory.
            with trio.move_on_after(PAUSE):
                while not self.ended and size < limit and registry.body_bytes_held < HELD_LIMIT:
                    await take()
        except BaseException:
            registry.body_bytes_held -= size
            raise
        return chunks[0] if len(chunks) == 1 else b"".join(chunks)

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
