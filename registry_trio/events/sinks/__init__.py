"""Sink transports: each sends a run of messages and reports what happened, nothing more.

Retries, ordering and dead letters live in :mod:`registry_trio.events.delivery`; a transport
only says how many of the messages, in order, were delivered and why the next one was not.
That contract lets a transport batch per hop (NATS publishes a whole run in one call) while
the delivery loop stays the same for every sink.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

__all__ = ["Message", "Outcome", "Result", "Transport"]


class Result(enum.Enum):
    DELIVERED = "delivered"
    RETRY = "retry"  # timeouts, connection errors, 408, 429, 5xx
    REJECTED = "rejected"  # permanent: any other 4xx; goes to the dead-letter store


@dataclass(frozen=True)
class Outcome:
    result: Result
    error: str = ""
    # Seconds the receiver asked us to wait (Retry-After), if it did.
    retry_after: float | None = None
    # The sink's answer in short, for the delivery history ("HTTP 503"); None when none
    # came (refused, timed out) or the transport does not tell (see Transport.acknowledgement).
    status: str | None = None


DELIVERED = Outcome(Result.DELIVERED)


@dataclass(frozen=True)
class Message:
    headers: dict[str, str]
    body: bytes
    # The id receivers de-duplicate on: the event id (the first one for a batch).
    id: str


class Transport(Protocol):
    # How many messages one send() should carry: 1 for a transport that sends one request
    # per message (HTTP), more for one that pipelines a run in one hop (NATS). Delivery
    # checks for shutdown between hops, so a stop never waits on more than one hop.
    per_hop: int
    # What the sink's answer to a delivered message is called in the delivery history when
    # the outcome does not say ("JetStream ack"; a hop of several messages has one outcome).
    acknowledgement: str

    async def send(self, messages: Sequence[Message]) -> tuple[int, Outcome]:
        """Send in order; return how many leading messages were delivered, and the outcome
        of the first one that was not (``DELIVERED`` when all were)."""
        ...

    async def aclose(self) -> None: ...
