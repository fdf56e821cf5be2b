"""What operators see of a sink: one shape for the admin API and the offline CLI alike."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Any

from ..config import SinkConfig, redact_address
from .queue import DeadLetter, EventQueue

__all__ = ["DEAD_PAGE_MAX", "Deliverer", "dead_letter_json", "dead_letter_page", "sink_status"]


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
        "lastErrorAt": counts.last_error_at,
    }


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
