"""The ASGI application: one dispatcher that owns request ids, access logs and routing.

Every request gets an ``X-Request-Id`` (the id events carry as ``request.id``) and the
``Docker-Distribution-API-Version`` header here, once, whichever half then serves it: the
raw routes (:mod:`.blobs`, :mod:`.manifests`) or Quart (everything else). Who may call a
route is decided by :mod:`.access` for what was routed: here for a raw route, in Quart's
``before_request`` for the rest.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any, cast

import trio

from .. import oci
from ..tls import peer_name
from .access import KNOWN_METHODS, authorize, method_label
from .body import BodyClock
from .context import (
    CERTIFICATE_NAME_KEY,
    CLIENT_ADDR_KEY,
    REQUEST_ID_KEY,
    ROUTE_KEY,
    Registry,
    header,
    identity,
)
from .errors import RegistryError, error_response, to_registry_error
from .quart_app import create_quart_app
from .raw import ClientDisconnected, RawRequest
from .routes import match_raw

__all__ = ["create_app"]

# Set while Quart serves a request: its own task then reads the request body.
QUART_READS_KEY = "registry_trio.quart_reads"

DISCARD_DEADLINE = 10.0

access_log = logging.getLogger("registry_trio.access")
log = logging.getLogger("registry_trio.api")

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


class RegistryApp:
    def __init__(self, registry: Registry, nursery: trio.Nursery) -> None:
        self.registry = registry
        # Owns the short tasks that outlive a request whose connection is given up.
        self._nursery = nursery
        # A refused request's unread body is read and dropped up to this many bytes so the
        # connection can serve the next request (an oversize manifest keeps it); past it the
        # connection is closed instead, as Go's net/http (and so distribution) does, rather
        # than taking in a multi-gigabyte upload only to throw it away.
        self.drain_limit = 2 * registry.config.http.max_manifest_size
        # Quart types its arguments with Hypercorn's TypedDicts: at run time they are these
        # plain dicts, whose scope carries registry keys that no TypedDict names.
        self.quart = cast(ASGIApp, create_quart_app(registry))

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.quart(scope, receive, send)  # lifespan
            return
        rid = uuid.uuid4().hex
        scope[REQUEST_ID_KEY] = rid
        started = time.perf_counter()
        state = {"status": 0, "sent": 0, "received": 0, "abandoned": 0, "stalled": 0}
        body_done = trio.Event()
        body_clock = BodyClock(self.registry.config.http)

        def abandon() -> None:
            # The rest of the body will not be read: once the response is out, Hypercorn
            # closes the connection, after queueing http.disconnect behind the unread body
            # messages; this reader frees that queue (see _discard_until_closed). It starts
            # now, not after the response, in case the queue fills up meanwhile.
            if not state["abandoned"]:
                state["abandoned"] = 1
                self._nursery.start_soon(_discard_until_closed, receive)

        async def receive_in_time() -> dict[str, Any] | None:
            """The next message; None once the body is past its deadline (and abandoned)."""
            if body_done.is_set():
                return await receive()  # only a disconnect is left to come
            waiting_since = trio.current_time()
            with trio.move_on_at(body_clock.deadline()):
                message = await receive()
                size = len(message.get("body", b""))
                state["received"] += size
                body_clock.progressed(size, trio.current_time() - waiting_since)
                if message["type"] == "http.disconnect" or not message.get("more_body", False):
                    body_done.set()
                return message
            state["stalled"] = 1
            abandon()
            return None

        async def counting_receive() -> dict[str, Any]:
            message = await receive_in_time()
            if message is not None:
                return message
            if scope.get(QUART_READS_KEY):
                # Quart stops on a disconnect, cancelling a handler still waiting for the
                # body; the 408 is then sent below.
                return {"type": "http.disconnect"}
            raise body_clock.timeout_error()

        async def finish_request_body() -> None:
            # A response that ends before the request body did (a refused upload, an oversize
            # manifest) leaves Hypercorn unable to recycle or close the connection: its bounded
            # request queue stays full, or Quart's cancellation aborts the close. So the rest of
            # a small body is read and dropped first, and the connection stays usable; past
            # drain_limit, or past the body's deadline, the connection is given up instead.
            limit = state["received"] + self.drain_limit
            while not body_done.is_set() and not state["abandoned"]:
                if scope.get(QUART_READS_KEY):
                    await body_done.wait()  # Quart's own reader drains until the body ends
                elif state["received"] > limit:
                    abandon()
                else:
                    await receive_in_time()

        async def tagging_send(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                state["status"] = message["status"]
                message = dict(message)
                message["headers"] = [
                    *message.get("headers", ()),
                    (b"x-request-id", rid.encode()),
                    (b"docker-distribution-api-version", b"registry/2.0"),
                ]
                # Say so when the connection will be given up; a chunked body is only known
                # to be too long once drained that far, and then the connection just closes.
                if _body_left(scope, state["received"], body_done) > self.drain_limit:
                    message["headers"].append((b"connection", b"close"))
            elif message["type"] == "http.response.body":
                if scope["method"] != "HEAD":  # Hypercorn drops a HEAD response's body
                    state["sent"] += len(message.get("body", b""))
                if not message.get("more_body", False):
                    await finish_request_body()
                    # Hypercorn recycles or closes the connection inside this call, and in
                    # doing so hands the app http.disconnect, on which quart-trio cancels the
                    # very task making the call: unshielded, the close (or the keep-alive
                    # timer) was cut short and the connection stayed open for good.
                    with trio.CancelScope(shield=True):
                        await send(message)
                    return
            await send(message)

        try:
            await self._dispatch(scope, counting_receive, tagging_send)
            if state["stalled"] and not state["status"]:
                raise body_clock.timeout_error()  # Quart gave up on the body before answering
        except ClientDisconnected:
            state["status"] = state["status"] or 499
        except Exception as exc:
            error = to_registry_error(exc)
            if error is None:
                log.exception("unhandled error serving %s %s", scope["method"], scope["path"])
                error = RegistryError("UNKNOWN", 500, "internal server error; see the server log")
            if state["status"]:
                log.error("error after the response started (%s): %s", rid, error)
            else:
                status, headers, body = error_response(error)
                headers.append(("Content-Length", str(len(body))))
                await tagging_send(
                    {
                        "type": "http.response.start",
                        "status": status,
                        "headers": [(k.encode(), v.encode()) for k, v in headers],
                    }
                )
                await tagging_send({"type": "http.response.body", "body": body})
        finally:
            self._log_access(scope, state, time.perf_counter() - started)

    def _log_access(self, scope: Scope, state: dict[str, int], seconds: float) -> None:
        rid, addr = scope[REQUEST_ID_KEY], scope.get(CLIENT_ADDR_KEY, "")
        name = identity(scope).name
        # A client chooses the method and the path: neither may make the line unbounded.
        method, path = scope["method"][:32], scope["path"][:2048]
        status, received, sent = state["status"], state["received"], state["sent"]
        if access_log.isEnabledFor(logging.INFO):
            # What access_log.info() does, less the search of the stack for the caller's
            # frame: one line per request, so it is worth the few microseconds.
            record = access_log.makeRecord(
                access_log.name,
                logging.INFO,
                __file__,
                0,
                "%s %s %s %s %s %d %d %d %.1fms",
                (rid, addr, name or "-", method, path, status, received, sent, seconds * 1000),
                None,
                extra={
                    "request_id": rid,
                    "actor": name or None,
                    "addr": addr,
                    "method": method,
                    "path": path,
                    "status": status,
                    "bytes_in": received,
                    "bytes_out": sent,
                    "duration_ms": round(seconds * 1000, 3),
                },
            )
            access_log.handle(record)
        self.registry.metrics.observe_request(
            scope.get(ROUTE_KEY, "other"), method_label(method), status, received, sent, seconds
        )

    async def _dispatch(self, scope: Scope, receive: Receive, send: Send) -> None:
        # Resolved before routing: even a request that is refused is logged with its address.
        scope[CLIENT_ADDR_KEY] = self.registry.auth.proxies.client_address(
            scope.get("client"),
            header(scope, b"x-forwarded-for") or None,
            header(scope, b"forwarded") or None,
        )
        # Read here, on the task Hypercorn started for the request (see registry_trio.tls).
        scope[CERTIFICATE_NAME_KEY] = peer_name()
        if scope["method"] not in KNOWN_METHODS:
            # One answer for every route, before any of them (or a metrics label) sees it.
            raise RegistryError(
                "UNSUPPORTED", 501, f"method {scope['method'][:32]!r} is not implemented"
            )
        matched = match_raw(scope["path"], scope["method"])
        if matched is None:
            # Quart authorises what Werkzeug routes (see quart_app.authorize_route).
            scope[QUART_READS_KEY] = True
            await self.quart(scope, receive, send)
            return
        route, params = matched
        scope[ROUTE_KEY] = route.template
        await authorize(self.registry, scope, route.access, params["name"])
        name = oci.validate_name(params.pop("name"))
        await route.handlers[scope["method"]](
            RawRequest(self.registry, scope, receive, send, name, params)
        )


def _body_left(scope: Scope, received: int, body_done: trio.Event) -> int:
    """Request body bytes not yet read, as far as is known: a chunked body counts as 0."""
    if body_done.is_set():
        return 0
    length = header(scope, b"content-length")
    return int(length) - received if length else 0  # h11 has checked it is a number


async def _discard_until_closed(receive: Receive) -> None:
    """Take what Hypercorn still queues for an abandoned request body until the stream closes.

    Once the response is out, Hypercorn closes a connection whose request body never ended,
    but only after queueing ``http.disconnect`` for the app; with the bounded queue full of
    body messages nobody reads, that put would wait forever. This reader frees the queue; the
    disconnect follows as soon as the response is sent, so it runs for a moment. The deadline
    only guards against a server that never sends it.
    """
    with trio.move_on_after(DISCARD_DEADLINE):
        while (await receive())["type"] != "http.disconnect":
            pass


def create_app(registry: Registry, nursery: trio.Nursery) -> RegistryApp:
    return RegistryApp(registry, nursery)
