"""A real HTTP event receiver for tests: records what arrives, answers as told.

It runs on Hypercorn in the test's Trio loop, on 127.0.0.1, and can be told to answer with a
status, to take its time, or be stopped and restarted on the same port (a sink outage). Given a
``certfile``/``keyfile`` it serves https; with ``ca_certs`` and ``require_client_cert`` it also
refuses a client without a certificate that CA signed.
"""

from __future__ import annotations

import functools
import json
import ssl
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.trio import serve


@dataclass
class Received:
    headers: dict[str, str]
    body: bytes
    # The sender's (host, port): the same port on two requests means the same connection.
    client: tuple[str, int] | None = None

    def json(self) -> Any:
        return json.loads(self.body)


@dataclass
class HTTPSinkServer:
    status: int = 200
    delay: float = 0.0
    retry_after: str | None = None
    received: list[Received] = field(default_factory=list)
    port: int = 0
    # Every request that arrived whole, whatever it was answered (``received``: only 2xx).
    requests: list[Received] = field(default_factory=list)
    # TLS: serve https with this certificate; with ``require_client_cert`` a client must show
    # a certificate signed by ``ca_certs``.
    certfile: str | None = None
    keyfile: str | None = None
    ca_certs: str | None = None
    require_client_cert: bool = False
    _changed: trio.Event = field(default_factory=trio.Event)
    _shutdown: trio.Event | None = None
    _stopped: trio.Event | None = None

    @property
    def url(self) -> str:
        scheme = "https" if self.certfile else "http"
        return f"{scheme}://127.0.0.1:{self.port}/events"

    async def app(self, scope: dict[str, Any], receive: Callable, send: Callable) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                await send({"type": message["type"] + ".complete"})
                if message["type"] == "lifespan.shutdown":
                    return
        body = bytearray()
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return  # the sender died mid-request (a kill -9): nothing was delivered
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        if self.delay:
            await trio.sleep(self.delay)  # ok-sleep: simulates a slow receiver
        status = self.status
        headers = {k.decode(): v.decode() for k, v in scope["headers"]}
        peer = scope.get("client")
        client = (str(peer[0]), int(peer[1])) if peer else None
        self.requests.append(Received(headers, bytes(body), client))
        if 200 <= status < 300:
            self.received.append(Received(headers, bytes(body), client))
            self._changed.set()
            self._changed = trio.Event()
        response_headers = [(b"content-length", b"0")]
        if self.retry_after is not None:
            response_headers.append((b"retry-after", self.retry_after.encode()))
        await send({"type": "http.response.start", "status": status, "headers": response_headers})
        await send({"type": "http.response.body", "body": b""})

    async def start(self, nursery: trio.Nursery) -> None:
        config = HypercornConfig()
        config.bind = [f"127.0.0.1:{self.port}"]
        config.accesslog = None
        config.graceful_timeout = 0.1
        if self.certfile:
            config.certfile, config.keyfile = self.certfile, self.keyfile
            config.ca_certs = self.ca_certs
            if self.require_client_cert:
                config.verify_mode = ssl.CERT_REQUIRED
        self._shutdown = trio.Event()
        self._stopped = trio.Event()
        binds = await nursery.start(
            functools.partial(self._run, config, self._shutdown, self._stopped)
        )
        self.port = int(binds[0].rsplit(":", 1)[1])

    async def _run(
        self,
        config: HypercornConfig,
        shutdown: trio.Event,
        stopped: trio.Event,
        task_status: trio.TaskStatus[list[str]],
    ) -> None:
        try:
            await serve(self.app, config, shutdown_trigger=shutdown.wait, task_status=task_status)
        finally:
            stopped.set()

    async def stop(self) -> None:
        """Take the sink down: connections are refused until :meth:`start` again."""
        assert self._shutdown is not None and self._stopped is not None
        self._shutdown.set()
        await self._stopped.wait()

    def events(self) -> list[dict[str, Any]]:
        """Every event received, flattened across formats (batches, envelopes, single)."""
        out: list[dict[str, Any]] = []
        for item in self.received:
            content_type = item.headers.get("content-type", "")
            if "ce-id" in item.headers:
                out.append(
                    {
                        "id": item.headers["ce-id"],
                        "type": item.headers["ce-type"],
                        "data": item.json(),
                    }
                )
                continue
            doc = item.json()
            if content_type.startswith("application/vnd.docker.distribution.events.v1+json"):
                out.extend(doc["events"])
            elif isinstance(doc, list):
                out.extend(doc)
            else:
                out.append(doc)
        return out

    async def wait_for(
        self, predicate: Callable[[list[dict[str, Any]]], bool], within: float = 20
    ) -> list[dict[str, Any]]:
        """Wait until ``predicate(self.events())`` holds; fail the test at the deadline."""
        with trio.fail_after(within):
            while not predicate(events := self.events()):
                await self._changed.wait()
        return events
