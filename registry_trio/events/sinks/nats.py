"""NATS transport: structured CloudEvents JSON on a subject, core NATS or JetStream.

nats-py is asyncio-only, so each sink owns one :class:`AsyncioThread` and talks to NATS only
there (the :class:`_Publisher` below lives entirely on that thread). A Trio ``send()`` is one
hop to that thread carrying the whole run of messages:

- **core** (``mode: core``): publish every message, then ``flush`` (a PING/PONG round trip)
  so that the server has accepted all of them; the run is delivered when the PONG comes back.
  Core NATS has no persistence: a subscriber that is not connected misses the message.
- **jetstream**: publish every message as a request (header ``Nats-Msg-Id`` = the event id,
  reply to this connection's ack inbox), pipelined, then gather the acks; the delivered prefix
  is the run of leading acked messages. (nats-py's ``publish_async`` does the same but leaves
  its future pending forever when the stream answers with an API error.)
  Redeliveries carry the same id, so a stream whose ``duplicate_window`` covers the retry
  horizon stores each event once.

The connection is made lazily by the first send (connect timeout = the sink's timeout) with
the configured credentials and TLS, and reconnects by itself for as long as the sink lives. A
send that finds it reconnecting waits for the reconnection, within the timeout. Every NATS
failure (refused, timed out, no responders, disconnected, an API error) is a ``RETRY``: the
server going away and coming back costs retries, never events. The one exception is a
message larger than the server's ``max_payload``, which no retry can deliver: ``REJECTED``,
so it goes to the dead-letter store (raise ``max_payload``, then replay).

Error texts name the failure only: never the address (it may carry ``user:password@``), the
credentials or the payload.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Sequence
from typing import Any

import nats
import nats.errors
import nats.js.errors
from nats.aio.client import Client

from ...config import SinkConfig
from ..asyncio_thread import AsyncioThread
from ..failures import describe_failure, sensitive_values
from ..natsconn import connect_options, new_client
from . import DELIVERED, Message, Outcome, Result

__all__ = ["NATSSink"]

log = logging.getLogger("registry_trio.events.sinks.nats")

# Pause between two reconnection attempts to the same server (nats-py's default is 2 s).
RECONNECT_WAIT = 0.5
# Messages per hop. The delivery loop hands over at most one ordered run (64) at a time; a
# larger run would still go out in one hop.
PER_HOP = 256


class _Publisher:
    """The NATS side of one sink. Every method runs on the sink's asyncio thread."""

    def __init__(self, config: SinkConfig, hidden: list[str]) -> None:
        self._name = config.name
        self._subject = str(config.channel)
        self._jetstream = config.mode == "jetstream"
        self._timeout = float(config.timeout)
        self._hidden = hidden
        self._config = config
        self._options = connect_options(config, f"registry-trio sink {config.name}")
        self._options["reconnect_time_wait"] = RECONNECT_WAIT
        self._nc: Client | None = None
        # JetStream acks come back on one wildcard inbox per connection, matched by token.
        self._ack_prefix = ""
        self._acks: dict[str, asyncio.Future[dict[str, Any]]] = {}
        self._next_token = 0
        self._closing = False
        self._lock: asyncio.Lock | None = None
        self._connected: asyncio.Event | None = None
        # Why connecting fails: the last error, and the last one the server itself sent
        # (an authorization violation says more than the connection reset that follows it).
        self._last_error = ""
        self._server_error = ""

    def _describe(self, exc: BaseException) -> str:
        return describe_failure(exc, self._hidden)

    # -- connection --------------------------------------------------------------------------

    async def _on_error(self, exc: Exception) -> None:
        self._last_error = self._describe(exc)
        if isinstance(exc, nats.errors.Error) and not isinstance(exc, nats.errors.TimeoutError):
            self._server_error = self._last_error
        log.debug("nats sink %s: %s", self._name, self._last_error)

    async def _on_disconnected(self) -> None:
        # The old connection is gone, and the acks it still owed us with it: fail them now
        # rather than at the timeout, so the run is retried as soon as we are back.
        acks, self._acks = self._acks, {}
        for ack in acks.values():
            if not ack.done():
                ack.set_exception(nats.errors.ConnectionReconnectingError())
        if self._closing:
            return
        if self._connected is not None and self._connected.is_set():
            self._connected.clear()
            log.warning("nats sink %s: disconnected; reconnecting", self._name)

    async def _on_reconnected(self) -> None:
        if self._connected is not None:
            self._connected.set()
        log.info("nats sink %s: reconnected", self._name)

    async def _client(self) -> Client:
        """The connected client: connects on first use, waits out a reconnection."""
        if self._lock is None:
            self._lock = asyncio.Lock()
            self._connected = asyncio.Event()
        assert self._connected is not None
        async with self._lock:
            if self._nc is None or self._nc.is_closed:
                self._nc = None
                self._last_error = self._server_error = ""
                nc = new_client(self._config)
                try:
                    await nc.connect(
                        **self._options,
                        error_cb=self._on_error,
                        disconnected_cb=self._on_disconnected,
                        reconnected_cb=self._on_reconnected,
                    )
                except BaseException:
                    # Cancelled by the timeout, or refused: drop the half-made connection.
                    await asyncio.shield(self._discard(nc))
                    raise
                if self._jetstream:
                    # Replayed by nats-py after a reconnection, like any subscription.
                    inbox = nc.new_inbox()
                    await nc.subscribe(f"{inbox}.*", cb=self._on_ack)
                    self._ack_prefix, self._acks = f"{inbox}.", {}
                self._nc = nc
                self._connected.set()
                log.info("nats sink %s: connected", self._name)
            nc = self._nc
        if not nc.is_connected:
            await self._connected.wait()
        return nc

    async def _discard(self, nc: Client) -> None:
        try:
            # Bounded: closing flushes, and a dead server must not hold up a shutdown.
            await asyncio.wait_for(nc.close(), self._timeout)
        except Exception:  # already broken; nothing else to release
            log.debug("closing a NATS connection failed", exc_info=True)

    async def close(self) -> None:
        self._closing = True
        nc, self._nc = self._nc, None
        if nc is not None and not nc.is_closed:
            # Whatever was not flushed is not acknowledged either: it stays in the outbox.
            await self._discard(nc)

    # -- sending -----------------------------------------------------------------------------

    async def send(self, messages: Sequence[Message]) -> tuple[int, Outcome]:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._timeout
        try:
            nc = await asyncio.wait_for(self._client(), self._timeout)
        except Exception as exc:
            reason = self._server_error or self._last_error or self._describe(exc)
            return 0, Outcome(Result.RETRY, f"cannot reach NATS: {reason}")
        if self._jetstream:
            return await self._send_jetstream(nc, messages, deadline)
        return await self._send_core(nc, messages, deadline)

    def _outcome(self, exc: BaseException) -> Outcome:
        if isinstance(exc, nats.errors.MaxPayloadError):
            return Outcome(Result.REJECTED, "message larger than the server's max_payload")
        return Outcome(Result.RETRY, self._describe(exc))

    async def _send_core(
        self, nc: Client, messages: Sequence[Message], deadline: float
    ) -> tuple[int, Outcome]:
        loop = asyncio.get_running_loop()
        published, failure = 0, DELIVERED
        for message in messages:
            if not nc.is_connected:
                failure = self._outcome(nats.errors.ConnectionReconnectingError())
                break
            try:
                await nc.publish(self._subject, message.body, headers=_headers(message))
            except Exception as exc:
                failure = self._outcome(exc)
                break
            published += 1
        if published == 0:
            return 0, failure
        try:
            # The PONG comes after the server has processed every PUB before the PING.
            timeout = max(deadline - loop.time(), 0.001)
            await nc.flush(timeout=timeout)  # type: ignore[arg-type]  # nats-py says int; float seconds work
        except Exception as exc:
            return 0, self._outcome(exc)
        return published, failure

    async def _on_ack(self, msg: Any) -> None:
        """A JetStream reply: a PubAck, an API error, or "no responders" (no stream)."""
        ack = self._acks.pop(msg.subject[len(self._ack_prefix) :], None)
        if ack is None or ack.done():
            return  # a reply to a publish we stopped waiting for
        if msg.headers and msg.headers.get("Status") == "503":
            ack.set_exception(nats.js.errors.NoStreamResponseError())
            return
        try:
            reply = json.loads(msg.data)
        except ValueError:
            ack.set_exception(nats.errors.ProtocolError("JetStream ack is not JSON"))
            return
        if "error" in reply:
            # Built here, not with APIError.from_error, which raises instead of returning
            # (nats-py 2.16) and would leave nats-py's own publish_async future hanging.
            error = reply["error"]
            ack.set_exception(
                nats.js.errors.APIError(
                    code=error.get("code"),
                    err_code=error.get("err_code"),
                    description=error.get("description"),
                )
            )
        else:
            ack.set_result(reply)

    async def _send_jetstream(
        self, nc: Client, messages: Sequence[Message], deadline: float
    ) -> tuple[int, Outcome]:
        loop = asyncio.get_running_loop()
        acks: list[asyncio.Future[dict[str, Any]]] = []
        tokens: list[str] = []
        failure = DELIVERED
        for message in messages:
            if not nc.is_connected:
                failure = self._outcome(nats.errors.ConnectionReconnectingError())
                break
            headers = _headers(message)
            headers["Nats-Msg-Id"] = message.id
            self._next_token += 1
            token = str(self._next_token)
            ack = self._acks[token] = loop.create_future()
            try:
                await nc.publish(
                    self._subject, message.body, reply=self._ack_prefix + token, headers=headers
                )
            except Exception as exc:
                self._acks.pop(token, None)
                failure = self._outcome(exc)
                break
            acks.append(ack)
            tokens.append(token)
        if acks:
            # Publishing is pipelined; the acks of the whole run are awaited together.
            await asyncio.wait(acks, timeout=max(deadline - loop.time(), 0.0))
        # When every ack came back, `failure` is what stopped the publishing (if anything).
        acked = 0
        for ack in acks:
            if not ack.done():
                failure = Outcome(Result.RETRY, "timed out waiting for the JetStream ack")
                break
            if (error := ack.exception()) is not None:
                failure = self._outcome(error)
                break
            acked += 1
        for token, ack in zip(tokens, acks, strict=True):
            self._acks.pop(token, None)
            if ack.done():
                ack.exception()  # retrieved: no "exception was never retrieved" noise
            else:
                ack.cancel()
        return acked, failure


def _headers(message: Message) -> dict[str, str]:
    # Structured mode: the content type is the only header, as zot sends it.
    content_type = message.headers.get("content-type", "application/cloudevents+json")
    return {"content-type": content_type}


class NATSSink:
    """The Transport for ``type: nats`` sinks; see the module doc."""

    per_hop = PER_HOP

    def __init__(self, config: SinkConfig) -> None:
        # A run is delivered once JetStream acknowledged each message, or core NATS answered
        # the flush after the run.
        self.acknowledgement = "JetStream ack" if config.mode == "jetstream" else "NATS flush"
        self._publisher = _Publisher(config, sensitive_values(config.address, config.credentials))
        self._thread = AsyncioThread(name=f"nats-sink {config.name}")

    async def send(self, messages: Sequence[Message]) -> tuple[int, Outcome]:
        if not messages:
            return 0, DELIVERED
        return await self._thread.run(self._publisher.send, list(messages))

    async def aclose(self) -> None:
        """Close the connection and stop the asyncio thread (also after a failed start)."""
        if self._thread.started:
            try:
                await self._thread.run(self._publisher.close)
            except RuntimeError:
                # nats-py's close, racing its own reconnection task during an outage, can end
                # up cancelled; closing the thread below releases whatever is left.
                log.debug("nats sink: closing the connection was cut short", exc_info=True)
            finally:
                await self._thread.aclose()
        else:
            await self._thread.aclose()
