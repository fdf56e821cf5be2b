"""What operators see of a sink: one shape for the admin API and the offline CLI alike."""

from __future__ import annotations

import time
from typing import Any

from ..config import SinkConfig, redact_address
from .queue import DeadLetter, EventQueue

__all__ = ["dead_letter_json", "redact_address", "sink_status"]


async def sink_status(queue: EventQueue, sink: SinkConfig, in_flight: int) -> dict[str, Any]:
    counts = await queue.counts(str(sink.name))
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
