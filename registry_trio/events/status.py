"""What operators see of a sink: one shape for the admin API and the offline CLI alike.

Times are ISO-8601 UTC strings (``2026-11-23T11:30:00.123Z``); ages are seconds.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from ..config import SinkConfig, redact_address
from .queue import DeadLetter, EventQueue

__all__ = [
    "DEAD_PAGE_MAX",
    "Deliverer",
    "SinkNotChosen",
    "choose_sink",
    "dead_letter_json",
    "dead_letter_page",
    "iso_time",
    "sink_status",
]


class SinkNotChosen(Exception):
    """The sink named is not configured (``unknown``), or none was named among several."""

    def __init__(self, message: str, *, unknown: bool) -> None:
        super().__init__(message)
        self.unknown = unknown


def choose_sink(
    sinks: Sequence[SinkConfig], name: str | None, naming: str = "--sink"
) -> SinkConfig:
    """The sink called ``name``; without a name, the only one. The error lists the sinks,
    and says to name one with ``naming`` (the CLI's option, or the API's parameter)."""
    if name is None and len(sinks) == 1:
        return sinks[0]
    for sink in sinks:
        if sink.name == name:
            return sink
    configured = (
        f"configured sinks: {', '.join(s.name for s in sinks)}"
        if sinks
        else "no sinks are configured (extensions.events.sinks)"
    )
    if name is None:
        raise SinkNotChosen(f"name a sink with {naming}; {configured}", unknown=False)
    raise SinkNotChosen(f"unknown sink {name!r}; {configured}", unknown=True)


def iso_time(timestamp: float | None) -> str | None:
    """A Unix time as ISO-8601 UTC, to the millisecond; None stays None."""
    if timestamp is None:
        return None
    moment = datetime.fromtimestamp(timestamp, UTC)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


@dataclass(frozen=True)
class Deliverer:
    """The process delivering events: one per server, a worker when it runs several."""

    pid: int
    # Its worker number (1 to http.workers); None for a server that is one process.
    worker: int | None = None

    @classmethod
    def this_process(cls) -> Deliverer:
        return cls(os.getpid())

    def to_json(self) -> dict[str, Any]:
        return {"pid": self.pid, "worker": self.worker}


async def sink_status(queue: EventQueue, sink: SinkConfig, in_flight: int | None) -> dict[str, Any]:
    """``in_flight``: sends under way, as the delivering process knows them (None: unknown
    here)."""
    counts = await queue.counts(sink.name)
    now = time.time()
    return {
        "name": sink.name,
        "type": sink.type,
        "address": redact_address(sink.address),
        "format": sink.format,
        "pending": counts.pending,
        "inFlight": in_flight,
        "delivered": counts.delivered,
        "failedAttempts": counts.failed_attempts,
        "dead": counts.dead,
        "oldestPendingAge": None if counts.oldest_pending is None else now - counts.oldest_pending,
        "lastError": counts.last_error,
        "lastErrorAt": iso_time(counts.last_error_at),
        "lastDeliveredAt": iso_time(counts.last_delivered_at),
        # Whether a delivery was acknowledged after the last error; null without one.
        "recovered": _recovered(counts.last_error_at, counts.last_delivered_at),
    }


def _recovered(last_error_at: float | None, last_delivered_at: float | None) -> bool | None:
    if last_error_at is None:
        return None
    return last_delivered_at is not None and last_delivered_at > last_error_at


def dead_letter_json(letter: DeadLetter) -> dict[str, Any]:
    return {
        "seq": letter.seq,
        "id": letter.event.id,
        "action": str(letter.event.action),
        "repository": letter.event.target.repository,
        "attempts": letter.attempts,
        "lastError": letter.last_error,
        "event": letter.event.to_json(),
    }


# The most dead letters one page holds.
DEAD_PAGE_MAX = 1000


async def dead_letter_page(
    queue: EventQueue, sink: SinkConfig, limit: int, after: int
) -> dict[str, Any]:
    """One page of ``limit`` (1 to DEAD_PAGE_MAX, checked by the callers) of a sink's dead
    letters, as the admin API and the offline CLI both show it.

    ``next`` is the cursor to pass as ``after`` for the next page, and null on the last one:
    one letter more than asked is read to know, so a page that ends exactly at the last
    letter does not promise another.
    """
    letters = await queue.dead(sink.name, limit + 1, after)
    page = letters[:limit]
    return {
        "sink": sink.name,
        "deadLetters": [dead_letter_json(d) for d in page],
        "next": page[-1].seq if len(letters) > limit else None,
    }
