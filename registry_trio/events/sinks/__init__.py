"""Sink transports: each turns ``(headers, body)`` into an :class:`Outcome`, nothing more.

Retries, ordering and dead letters live in :mod:`registry_trio.events.delivery`; a transport
only says what happened to one request.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Protocol

__all__ = ["Outcome", "Result", "Transport"]


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


class Transport(Protocol):
    async def send(self, headers: dict[str, str], body: bytes) -> Outcome: ...

    async def aclose(self) -> None: ...
